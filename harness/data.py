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

from harness import synthetic
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

    def forget_texts(self, splits) -> list[str]:
        return [t for s in splits for t in self.forget[s]]

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


def synthetic_data(world: synthetic.WorldConfig, cache_dir: Path, max_length: int) -> Data:
    root = Path(cache_dir) / "synthetic" / world.key()
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):  # parallel jobs (and the tests' pretraining thread) write it once
        if not (root / "world.json").is_file():
            synthetic.write_world(world, root)
    tasks_dir = root / "tasks"
    tasks_dir.mkdir(exist_ok=True)
    hazard = {s: f"synthetic_hazard_split{s}" for s in range(world.n_splits)}
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
                max_length=max_length, root=root, concept_prompts=synthetic.concept_prompts(world))


def wmdp_data(cfg) -> Data:
    """WMDP-bio at paper scale: corpora from the hub (or local files), tasks from lm-eval's built-ins."""
    from datasets import load_dataset
    try:
        forget = load_dataset(cfg.forget_corpus.path, cfg.forget_corpus.name, split="train")["text"]
        retain = load_dataset(cfg.retain_corpus.path, cfg.retain_corpus.name, split="train")["text"]
        unrelated = load_dataset(cfg.unrelated_corpus.path, cfg.unrelated_corpus.name, split="train")["text"]
    except Exception as e:  # noqa: BLE001 - any loading failure means the same thing to the user
        raise ConfigError(f"data=wmdp_bio: could not load the WMDP corpora ({type(e).__name__}: {e}). "
                          "They need the Hugging Face hub or a local copy: set data.forget_corpus.path etc. "
                          "to local dataset folders, or use the embedded default data=synthetic.") from e
    # WMDP has no fact splits; the forget corpus is dealt round-robin into n_splits shards so the
    # held-out (RTT) protocol still has something to hold out.
    forget = [t for t in forget if t.strip()]
    shards = {s: forget[s::cfg.n_splits] for s in range(cfg.n_splits)}
    return Data(forget=shards, retain=[t for t in retain if t.strip()], unrelated=[t for t in unrelated if t.strip()],
                hazard_tasks={s: cfg.hazard_task for s in range(cfg.n_splits)}, utility_tasks=list(cfg.utility_tasks),
                task_include_path=None, max_length=cfg.max_length,
                concept_prompts={k: list(v) for k, v in (cfg.get("concept_prompts") or {}).items()})


def load_data(cfg, cache_dir: Path) -> Data:
    if cfg.name == "synthetic":
        world = synthetic.WorldConfig(**cfg.world)
        return synthetic_data(world, cache_dir, cfg.max_length)
    if cfg.name == "wmdp_bio":
        return wmdp_data(cfg)
    raise ConfigError(f"data.name={cfg.name!r}: allowed synthetic, wmdp_bio")
