"""The data a run works on: corpora for defenses and attacks, and the evaluation tasks.

`load_data(cfg.data, cache_dir)` returns a `Data`; for the embedded default it writes the synthetic
world and its lm-eval task YAMLs into the cache, for `data=wmdp_bio` it reads the WMDP corpora.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from filelock import FileLock

from harness import folds, synthetic
from harness.errors import ConfigError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Data:
    forget: dict[int, list[str]]        # hazard text per split
    retain: list[str]                   # benign text
    unrelated: list[str]                # text sharing no facts with either
    hazard_tasks: dict[int, str]        # lm-eval task name per hazard split
    utility_tasks: list[str]            # lm-eval task names
    task_include_path: str | None       # folder of local task YAMLs (None: lm-eval's built-ins)
    max_length: int                     # tokens per training / perplexity sequence
    root: Path | None = None            # where the files are, for the record
    # How text about the hazard concept is introduced: "expert" / "novice" prompts and a "confused"
    # turn away from it, each a list of texts (ELM's guidance and consistency prompts).
    concept_prompts: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    # The hazard questions of each split with their correct answer, as text: what the RTT protocol
    # (Deeb & Roger) fine-tunes on (attack.data.source=questions); the split's task scores the same questions.
    questions: dict[int, list[str]] = dataclasses.field(default_factory=dict)
    builtin_tasks: bool = False         # the tasks need lm-eval's built-in task index too

    def forget_texts(self, splits) -> list[str]:
        return [t for s in splits for t in self.forget[s]]

    def question_texts(self, splits) -> list[str]:
        return [t for s in splits for t in self.questions[s]]

    def heldout_text(self, n: int = 256) -> list[str]:
        """A fixed, mixed sample of forget and retain text (for function drift and perplexity)."""
        mixed = [t for pair in zip(self.retain, self.forget_texts(sorted(self.forget))) for t in pair]
        return mixed[:n]


def _task_yaml(name: str, data_file: Path) -> str:
    spec = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "answer",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": synthetic.GENERATOR_VERSION},
    }
    return json.dumps(spec, indent=2)  # JSON is valid YAML


def _jsonl_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def answered(question: str, choices, answer: int) -> str:
    """A multiple-choice question as relearning text: the question, then its correct answer."""
    return f"{question.strip()}\nAnswer: {choices[answer]}"


def _jsonl_questions(path: Path) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [answered(r["question"], r["choices"], r["answer"]) for r in rows]


def _synthetic_split_tasks(n_splits: int) -> dict[int, str]:
    return {s: f"synthetic_hazard_split{s}" for s in range(n_splits)}


def synthetic_data(world: synthetic.WorldConfig, cache_dir: Path, max_length: int) -> Data:
    root = Path(cache_dir) / "synthetic" / world.key()
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):  # parallel jobs (and the tests' pretraining thread) write it once
        if not (root / "world.json").is_file():
            synthetic.write_world(world, root)
    tasks_dir = root / "tasks"
    tasks_dir.mkdir(exist_ok=True)
    hazard = _synthetic_split_tasks(world.n_splits)
    files = {**{hazard[s]: root / f"hazard_split{s}.jsonl" for s in hazard},
             "synthetic_utility": root / "utility.jsonl"}
    for name, path in files.items():
        target = tasks_dir / f"{name}.yaml"
        text = _task_yaml(name, path)
        if not target.is_file() or target.read_text() != text:
            target.write_text(text)
    return Data(forget={s: _jsonl_texts(root / f"forget_split{s}.jsonl") for s in hazard},
                retain=_jsonl_texts(root / "retain.jsonl"), unrelated=_jsonl_texts(root / "unrelated.jsonl"),
                hazard_tasks=hazard, utility_tasks=["synthetic_utility"], task_include_path=str(tasks_dir),
                max_length=max_length, root=root, concept_prompts=synthetic.concept_prompts(world),
                questions={s: _jsonl_questions(root / f"hazard_split{s}.jsonl") for s in hazard})


def _load(source, what: str):
    """One split of a hub dataset (or local copy) as `datasets` resolves it: the hub, or its cache offline."""
    from datasets import load_dataset
    try:
        return load_dataset(source.path, source.get("name"), split=source.get("split", "train"))
    except Exception as e:  # noqa: BLE001 - any loading failure means the same thing to the user
        args = repr(source.path) + (f", {source.get('name')!r}" if source.get("name") else "")
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise ConfigError(f"data=wmdp_bio: could not load {what} ({args}; {reason}). Provide it in the Hugging Face "
                          f"cache (where the hub is reachable run `python -c \"import datasets; "
                          f"datasets.load_dataset({args})\"`, copy $HF_HOME here and run with HF_DATASETS_OFFLINE=1) "
                          "or set its data.*.path to a local dataset folder; or use the embedded default "
                          "data=synthetic.") from None


def _texts(source, what: str) -> list[str]:
    return [t for t in _load(source, what)["text"] if t.strip()]


def wmdp_data(cfg, cache_dir: Path) -> Data:
    """WMDP-bio at paper scale: corpora from the hub (or local copies), tasks from lm-eval's built-ins.

    Held-out relearning: `wmdp_bio`'s questions are dealt into `n_splits` folds (harness.folds), hazard
    split s being scored on fold s (lm-eval's wmdp_bio restricted to it) and relearnable as text
    (`questions`). The forget corpus is dealt round-robin into as many shards: its documents (PubMed
    papers) carry no link to the questions, so a shard holds out no particular question."""
    n = cfg.n_splits
    forget = _texts(cfg.forget_corpus, "the forget corpus")
    rows = _load(cfg.questions, "the hazard questions")
    questions = [answered(q, c, a) for q, c, a in zip(rows["question"], rows["choices"], rows["answer"])]
    keys = [folds.question_key(q, c) for q, c in zip(rows["question"], rows["choices"])]
    question_folds = {s: [questions[i] for i in folds.fold_indices(keys, s, n)] for s in range(n)}
    tasks_dir = Path(cache_dir) / "lm_eval_tasks" / "folds"
    tasks_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(tasks_dir) + ".lock"):  # parallel jobs of a sweep write the same files
        hazard_tasks = folds.write_fold_tasks(cfg.hazard_task, n, tasks_dir)
    return Data(forget={s: forget[s::n] for s in range(n)}, retain=_texts(cfg.retain_corpus, "the retain corpus"),
                unrelated=_texts(cfg.unrelated_corpus, "the unrelated corpus"), hazard_tasks=hazard_tasks,
                utility_tasks=list(cfg.utility_tasks), task_include_path=str(tasks_dir), max_length=cfg.max_length,
                concept_prompts={k: list(v) for k, v in (cfg.get("concept_prompts") or {}).items()},
                questions=question_folds, builtin_tasks=True)


def split_task_names(cfg) -> dict[int, str] | None:
    """{hazard split: lm-eval task scoring it} of a data config (None: not known before loading)."""
    if cfg.name == "synthetic":
        return _synthetic_split_tasks(cfg.world.n_splits)
    if cfg.name == "wmdp_bio":
        return {s: folds.fold_task_name(cfg.hazard_task, s, cfg.n_splits) for s in range(cfg.n_splits)}
    return None


def load_data(cfg, cache_dir: Path) -> Data:
    if cfg.name == "synthetic":
        world = synthetic.WorldConfig(**cfg.world)
        return synthetic_data(world, cache_dir, cfg.max_length)
    if cfg.name == "wmdp_bio":
        return wmdp_data(cfg, cache_dir)
    raise ConfigError(f"data.name={cfg.name!r}: allowed synthetic, wmdp_bio")
