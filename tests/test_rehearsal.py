"""The paper's pipeline rehearsed on local copies: `scale=paper` runs end to end on CPU, offline.

A temporary HF_HOME holds the `datasets` cache of every dataset the paper path reads, as
`datasets.load_dataset(...)` leaves it after a download (`<HF_HOME>/datasets/<owner>___<name>/<config>/
0.0.0/<commit>/`: Arrow files and dataset_info.json with the real features), a few rows each:
`cais/wmdp` (wmdp-bio), the utility tasks of eval=paper as lm-eval's own task YAMLs name them (all 57
MMLU subjects, winogrande, both ARC sets, hellaswag) and the corpora of data=wmdp_bio. With
HF_DATASETS_OFFLINE=1, `datasets` resolves a hub id from exactly this cache, so lm-eval's built-in
tasks load as they will on a cluster whose $HF_HOME was filled where the hub is reachable.

The model is the pretrained tiny Llama saved to a local folder (model.path=...). Only sizes are
overridden: model, steps, evaluation limit and batch sizes, sequence length, one process (dist=none)
and Hydra's in-process launcher for SLURM. Every method value comes from scale=paper.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.models import from_pretrained

REPO = Path(__file__).resolve().parents[1]
COMMIT = "0" * 40  # the snapshot folder's name: the hub commit a download records


def cache_dataset(hf_home: Path, repo: str, config: str | None, features, splits: dict[str, list[dict]]) -> Path:
    """Write `repo` (config `config`) into the `datasets` cache under `hf_home`, as a download does."""
    from datasets import DatasetInfo, SplitDict, SplitInfo
    from datasets.arrow_writer import ArrowWriter
    from datasets.naming import camelcase_to_snakecase
    owner, name = repo.split("/")
    folder = hf_home / "datasets" / f"{owner}___{camelcase_to_snakecase(name)}" / (config or "default") / "0.0.0" / COMMIT
    folder.mkdir(parents=True)
    split_dict = SplitDict(dataset_name=name)
    for split, rows in splits.items():
        with ArrowWriter(features=features, path=str(folder / f"{name}-{split}.arrow")) as writer:
            for row in rows:
                writer.write(features.encode_example(row))
            n, size = writer.finalize()
        split_dict.add(SplitInfo(name=split, num_bytes=size, num_examples=n, dataset_name=name))
    DatasetInfo(features=features, builder_name="parquet", dataset_name=name, config_name=config or "default",
                version="0.0.0", splits=split_dict).write_to_directory(str(folder))
    return folder


def _mmlu_subjects() -> list[str]:
    """The dataset_name of every subject task of lm-eval's installed `mmlu` group."""
    import lm_eval
    folder = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    names = [line.split(":", 1)[1].strip().strip('"') for f in sorted(folder.glob("mmlu_*.yaml"))
             for line in f.read_text().splitlines() if line.startswith('"dataset_name"')]
    assert len(names) == 57, names
    return names


def fill_hub_cache(hf_home: Path) -> None:
    from datasets import ClassLabel, Features, Sequence, Value
    text, strings = Value("string"), Sequence(Value("string"))
    mc = Features({"answer": Value("int64"), "question": text, "choices": strings})
    wmdp = [{"question": f"Which property of pathogen {i} raises its transmissibility?", "answer": i % 4,
             "choices": [f"option {i}{c}" for c in "abcd"]} for i in range(8)]
    cache_dataset(hf_home, "cais/wmdp", "wmdp-bio", mc, {"test": wmdp})
    mmlu = Features({"question": text, "subject": text, "choices": strings,
                     "answer": ClassLabel(names=["A", "B", "C", "D"])})
    for subject in _mmlu_subjects():
        row = {"question": f"A question on {subject}?", "subject": subject, "choices": list("wxyz"), "answer": 1}
        cache_dataset(hf_home, "cais/mmlu", subject, mmlu, {"test": [row], "validation": [row], "dev": [row]})
    wino = Features({"sentence": text, "option1": text, "option2": text, "answer": text})
    row = {"sentence": "The trophy did not fit in the case because the _ was too big.", "option1": "trophy",
           "option2": "case", "answer": "1"}
    cache_dataset(hf_home, "allenai/winogrande", "winogrande_xl", wino,
                  {"train": [row], "validation": [row, row], "test": [{**row, "answer": ""}]})
    arc = Features({"id": text, "question": text, "choices": {"text": strings, "label": strings}, "answerKey": text})
    row = {"id": "q1", "question": "Which gas do plants take in?", "answerKey": "B",
           "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"], "label": list("ABCD")}}
    for config in ("ARC-Easy", "ARC-Challenge"):
        cache_dataset(hf_home, "allenai/ai2_arc", config, arc, {"train": [row], "validation": [row], "test": [row, row]})
    hella = Features({"ind": Value("int32"), "activity_label": text, "ctx_a": text, "ctx_b": text, "ctx": text,
                      "endings": strings, "source_id": text, "split": text, "split_type": text, "label": text})
    row = {"ind": 4, "activity_label": "Baking cookies", "ctx_a": "A woman mixes flour.", "ctx_b": "she",
           "ctx": "A woman mixes flour. she", "endings": ["bakes.", "sings.", "runs.", "sleeps."],
           "source_id": "wikihow~1", "split": "val", "split_type": "indomain", "label": "0"}
    cache_dataset(hf_home, "Rowan/hellaswag", None, hella, {"train": [row], "validation": [row, row], "test": [row]})
    papers = Features({"title": text, "abstract": text, "text": text, "doi": text})
    cache_dataset(hf_home, "cais/wmdp-bio-forget-corpus", None, papers, {"train": [
        {"title": f"Paper {i}", "abstract": "An abstract.", "text": f"the natural host of pathogen {i} is bats",
         "doi": f"10.0/{i}"} for i in range(8)]})
    plain = Features({"text": text})
    cache_dataset(hf_home, "cais/wmdp-corpora", "bio-retain-corpus", plain,
                  {"train": [{"text": f"the town {i} lies by the river"} for i in range(8)]})
    wiki = {"train": [{"text": ""}, *({"text": f" = Mineral {i} = \n"} for i in range(8))],
            "validation": [{"text": " = A = \n"}], "test": [{"text": " = B = \n"}]}
    cache_dataset(hf_home, "Salesforce/wikitext", "wikitext-2-raw-v1", plain, wiki)


# Sizes only: the model's sequence length, steps, evaluation size, batch sizes, one process. Single
# runs (`python run.py`, no -m): scale=paper's SLURM launcher is composed but not used.
SIZES = ["dist=none", "data.max_length=32", "eval.limit=2", "eval.batch_size=8", "eval.ppl_samples=4",
         "attack.steps=2", "attack.eval_every=2", "attack.batch_size=2", "attack.grad_accum=1",
         "attack.checkpoint_every=null", "threads=1"]
MMLU_SUBJECTS = 57


def run_all(jobs: dict[str, list[str]], env: dict, root: Path) -> dict[str, dict]:
    """`python run.py <args>` for every job side by side (each one thread; CI has two cores), each in
    its own run folder; {job: its record}."""
    started = {}
    for name, args in jobs.items():
        args = [*args, f"hydra.run.dir={root / name}"]
        started[name] = (args, subprocess.Popen([sys.executable, "run.py", *args], cwd=REPO, env=env, text=True,
                                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for name, (args, process) in started.items():
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, f"python run.py {' '.join(args)}\n{output[-6000:]}"
    return {name: json.loads((root / name / "result.json").read_text()) for name in jobs}


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory, tiny_path):
    root = tmp_path_factory.mktemp("rehearsal")
    fill_hub_cache(root / "hf")
    model, tokenizer = from_pretrained(tiny_path)
    model.save_pretrained(root / "model", safe_serialization=True)
    tokenizer.save_pretrained(root / "model")
    env = {**os.environ, "HF_HOME": str(root / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "SPECDEF_CACHE": str(root / "cache"), "SPECDEF_OUTPUTS": str(root / "out"), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    common = ["scale=paper", f"model.path={root / 'model'}", *SIZES]
    # Jobs of Table 1's preset at paper scale (lm-eval's built-in wmdp_bio and utility tasks): a
    # baseline, and SpecDef over that baseline, each attacked by Adam at the grid's middle lr (1e-5);
    # and held-out relearning (RTT) on wmdp_bio's question folds, through its preset.
    table1 = ["experiment=table1", "attack=adam", "table1.lr_rank=1", *common]
    runs = run_all({"npo": [*table1, "defense=npo", "defense.steps=2"],
                    "specdef": [*table1, "defense=specdef", "defense.base=npo", "+defense.base_overrides.steps=2"],
                    "heldout": ["experiment=heldout", "defense=none", "lr=1e-5", *common]}, env, root / "out")
    return root, env, runs


def test_table1_runs_at_paper_scale_on_local_copies(rehearsal):
    root, _, runs = rehearsal
    utility = ("mmlu", "winogrande", "arc_easy", "arc_challenge", "hellaswag")
    for name in ("npo", "specdef"):
        record = runs[name]
        assert record["config"]["model"]["path"] == str(root / "model")
        assert record["config"]["eval"]["hazard_tasks"] == ["wmdp_bio"] and list(record["config"]["eval"]["utility_tasks"]) == list(utility)
        assert record["attack"]["name"] == "adam" and record["attack"]["lr"] == 1e-5 and record["attack"]["steps"] == 2
        for stage in ("base", "pre_attack", "post_attack"):
            metrics = record["metrics"][stage]
            assert {f"acc/{t}" for t in ("wmdp_bio", *utility)} <= set(metrics), (name, stage, sorted(metrics))
            assert 0 <= metrics["hazard_acc"] <= 1 and 0 <= metrics["utility_acc"] <= 1
        # lm-eval's own tasks ran, MMLU as its group of every subject (each read from the cache)
        versions = record["lm_eval"]["task_versions"]
        subjects = [t for t in versions if t.startswith("mmlu_") and t not in
                    ("mmlu_stem", "mmlu_other", "mmlu_social_sciences", "mmlu_humanities")]
        assert len(subjects) == MMLU_SUBJECTS and {"wmdp_bio", *utility} <= set(versions)
    # each method ran with the paper's values; only its steps were cut
    npo = runs["npo"]["config"]["defense"]
    assert (npo["lr"], npo["beta"], npo["batch_size"], npo["grad_accum"], npo["steps"]) == (1e-5, 0.1, 4, 8, 2)
    specdef = runs["specdef"]
    assert specdef["config"]["defense"]["alpha"] == 1e4 and specdef["config"]["defense"]["strict_drift"] is True
    assert specdef["defense"]["release_dtype"] == "float32" and specdef["config"]["model"]["dtype"] == "bfloat16"
    assert specdef["defense"]["base"]["name"] == "npo"
    assert specdef["metrics"]["pre_attack"] != runs["npo"]["metrics"]["pre_attack"]  # SpecDef changed the NPO model


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_report_of_the_rehearsal(rehearsal):
    root, env, runs = rehearsal
    out = root / "report"
    done = subprocess.run([sys.executable, "-m", "reporting.report", str(root / "out"), "--out", str(out), "--no-plots"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    relearning = read_csv(out / "relearning_adam.csv")
    assert relearning[0] == ["defense", "initial acc", "lr=1e-5"]
    assert [row[0] for row in relearning[1:]] == ["none", "npo", "specdef(npo, α=1e4)"]
    utility = read_csv(out / "utility.csv")[0]
    assert {"Δ mmlu", "Δ hellaswag (norm)", "Δ winogrande", "Δ wmdp_bio", "Δ retain ppl"} <= set(utility), utility
    # the held-out run's row: relearned / held-out accuracy at the start and at best
    [header, row] = read_csv(out / "heldout.csv")
    assert header == ["defense", "optimizer", "start", "lr=1e-5", "held-out / relearned gain", "knowledge"]
    assert row[:2] == ["none", "adam"] and row[4:] == ["—", "—"]  # the undefended model removed nothing
    extra = runs["heldout"]["attack"]["extra"]
    assert row[3] == f"{extra['best_relearned_acc']:.3f} / {extra['best_heldout_acc']:.3f}"


def test_heldout_relearning_scores_unseen_wmdp_folds(rehearsal):
    _, _, runs = rehearsal
    record = runs["heldout"]
    assert record["config"]["attack"]["data"] == {"source": "questions", "splits": [0], "n_samples": None}
    assert record["config"]["eval"]["hazard_tasks"] is None and record["attack"]["extra"]["relearned_splits"] == [0]
    assert {"wmdp_bio_fold0_of_2", "wmdp_bio_fold1_of_2"} <= set(record["lm_eval"]["task_versions"])
    for point in record["attack"]["trajectory"]:
        # fold 0 relearned, fold 1 held out: lm-eval's wmdp_bio restricted to each fold
        assert point["relearned_acc"] == point["acc/wmdp_bio_fold0_of_2"]
        assert point["heldout_acc"] == point["acc/wmdp_bio_fold1_of_2"] is not None
        assert point["hazard_acc"] == (point["relearned_acc"] + point["heldout_acc"]) / 2  # eval.limit=2 per fold


def test_question_folds_partition_the_questions():
    from harness.folds import fold_indices
    questions = [f"question {i}" for i in range(11)]
    folds = [fold_indices(questions, f, 3) for f in range(3)]
    assert sorted(i for fold in folds for i in fold) == list(range(11))
    assert sorted(len(f) for f in folds) == [3, 4, 4]
    # a question's fold follows from its text, not its row
    moved = fold_indices(questions[::-1], 0, 3)
    assert sorted(questions[::-1][i] for i in moved) == sorted(questions[i] for i in folds[0])


def test_a_repeated_question_is_never_split_between_folds():
    """Equal texts hash alike and sort side by side; dealt row by row, the two 'dup' rows went to
    different folds (one relearned, its twin held out). Dealt by key, they go together; the key is the
    question with its choices, so a repeated stem with other choices is a question of its own."""
    from datasets import Dataset
    from harness.folds import fold_indices, select_fold
    folds = [fold_indices(["a", "b", "dup", "c", "dup", "d"], f, 2) for f in range(2)]
    assert sorted(i for fold in folds for i in fold) == list(range(6))
    assert [fold for fold in folds if 2 in fold] == [fold for fold in folds if 4 in fold]
    stem = "Which of the following is true?"
    rows = Dataset.from_dict({"question": [stem, "q1", stem, stem, "q2", "q3"], "answer": [0] * 6,
                              "choices": [["x", "y"], ["a"], ["x", "y"], ["u", "v"], ["b"], ["c"]]})
    scored = [select_fold(rows, f, 2)["choices"] for f in range(2)]
    assert sorted(len(s) for s in scored) == [3, 3]  # 5 distinct questions, the twins together
    assert sorted(s.count(["x", "y"]) for s in scored) == [0, 2]


def test_split_metric_needs_the_splits_tasks():
    from harness.errors import ConfigError
    from runner.validate import validate
    from tests.conftest import compose_cfg
    validate(compose_cfg("experiment=rtt", "scale=paper"))
    validate(compose_cfg("experiment=heldout", "scale=paper", "attack.recover_metric=heldout_acc"))
    with pytest.raises(ConfigError, match=r"attack.recover_metric=heldout_acc with eval.hazard_tasks=\['wmdp_bio'\]: "
                                          r"the splits are scored by their own tasks \['wmdp_bio_fold0_of_2'"):
        validate(compose_cfg("scale=paper", "attack.recover_metric=heldout_acc"))


def test_missing_corpus_stops_with_one_line(monkeypatch, tmp_path):
    import datasets.config
    from harness.data import load_data
    from harness.errors import ConfigError
    from tests.conftest import compose_cfg
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read at import: the env is too late
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)  # an empty cache
    with pytest.raises(ConfigError, match=r"could not load the forget corpus \('cais/wmdp-bio-forget-corpus'; ") as err:
        load_data(compose_cfg("data=wmdp_bio").data, tmp_path)
    assert "\n" not in str(err.value) and "HF_DATASETS_OFFLINE=1" in str(err.value)


def test_question_source_relearns_the_splits_questions_with_answers(data):
    from attacks.relearn import relearn_texts, split_tasks
    texts = relearn_texts(data, "questions", [0], None, seed=0)
    first = json.loads((data.root / "hazard_split0.jsonl").read_text().splitlines()[0])
    assert texts[0] == f"{first['question']}\nAnswer: {first['choices'][first['answer']]}"
    assert len(texts) == len(data.questions[0]) and not set(texts) & set(data.questions[1])
    assert split_tasks(data.hazard_tasks, {0}) == (["synthetic_hazard_split0"], ["synthetic_hazard_split1"])


def test_fold_tasks_score_their_folds_questions(monkeypatch, tmp_path):
    """lm-eval loads each fold task from the cached cais/wmdp: the folds split wmdp_bio's questions."""
    import datasets.config
    from datasets import Features, Sequence, Value
    from lm_eval.tasks import TaskManager
    from harness.folds import fold_indices, question_key, write_fold_tasks
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    questions = [f"question {i}?" for i in range(7)]
    features = Features({"answer": Value("int64"), "question": Value("string"), "choices": Sequence(Value("string"))})
    cache_dataset(tmp_path / "hf", "cais/wmdp", "wmdp-bio", features,
                  {"test": [{"question": q, "answer": 0, "choices": list("abcd")} for q in questions]})
    names = write_fold_tasks("wmdp_bio", 3, tmp_path / "tasks")
    tasks = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False).load(list(names.values()))["tasks"]
    scored = {fold: [doc["question"] for doc in tasks[name].test_docs()] for fold, name in names.items()}
    keys = [question_key(q, list("abcd")) for q in questions]
    assert scored == {fold: [questions[i] for i in fold_indices(keys, fold, 3)] for fold in names}
    assert sorted(q for qs in scored.values() for q in qs) == sorted(questions)
    # the prompt is lm-eval's own wmdp_bio prompt
    doc = tasks[names[0]].test_docs()[0]
    assert tasks[names[0]].doc_to_text(doc) == f"{doc['question']}\nA. a\nB. b\nC. c\nD. d\nAnswer:"
