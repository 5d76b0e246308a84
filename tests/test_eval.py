"""harness.evaluate: scores equal lm-eval's own, task versions reach the record, memoisation by the
model's fingerprint, task lists from cfg.eval, and the dataset preflight (offline: one clear message)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness import evaluate
from harness.errors import ConfigError
from harness.models import from_pretrained
from tests.conftest import compose_cfg

LIMIT = 20
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_evaluator(data, tiny_path):
    """The harness evaluator as the pipeline builds it, on LIMIT questions per task."""
    _, tokenizer = from_pretrained(tiny_path)
    return evaluate.build_evaluator(compose_cfg(f"eval.limit={LIMIT}", "eval.ppl_samples=16").eval, tokenizer, data)


def test_scores_equal_lm_eval_run_directly_on_the_saved_model(quick_evaluator, tiny_model, tiny_path, data):
    import lm_eval
    from lm_eval.tasks import TaskManager
    model, _ = tiny_model
    ours = quick_evaluator(model)
    direct = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={tiny_path},dtype=float32,max_length={data.max_length}",
        tasks=quick_evaluator.tasks, device="cpu", batch_size=64, limit=LIMIT, bootstrap_iters=0,
        task_manager=TaskManager(include_path=data.task_include_path, include_defaults=False))
    assert {t: ours[f"acc/{t}"] for t in quick_evaluator.tasks} == \
           {t: direct["results"][t]["acc,none"] for t in quick_evaluator.tasks}
    hazard = [t for t in quick_evaluator.tasks if "hazard" in t]
    assert ours["hazard_acc"] == pytest.approx(sum(ours[f"acc/{t}"] for t in hazard) / len(hazard))
    assert ours["retain_ppl"] > 1 and ours["forget_ppl"] > 1


def test_task_versions_are_filled(quick_evaluator, tiny_model):
    quick_evaluator(tiny_model[0])
    assert set(quick_evaluator.tasks) <= set(quick_evaluator.versions)
    assert all(v is not None for v in quick_evaluator.versions.values())


def test_unchanged_model_is_not_scored_again_a_changed_one_is(quick_evaluator, tiny_model, monkeypatch):
    calls = []
    real = quick_evaluator.evaluate
    monkeypatch.setattr(quick_evaluator, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    model, _ = tiny_model
    with torch.no_grad():
        model.lm_head.weight.mul_(1.0001)  # a state no other test evaluated
    first = quick_evaluator(model)
    assert quick_evaluator(model) == first and len(calls) == 1
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3  # one element of one tensor
    quick_evaluator(model)
    assert len(calls) == 2


def test_fingerprint_sees_one_element_in_both_modes(tiny_model):
    model, _ = tiny_model
    full, sampled = evaluate.model_fingerprint(model), evaluate.model_fingerprint(model, max_full_bytes=0)
    assert full.startswith("full:") and sampled.startswith("sampled:")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[3, 5] += 1e-4
    assert evaluate.model_fingerprint(model) != full
    assert evaluate.model_fingerprint(model, max_full_bytes=0) != sampled


def test_group_scored_with_its_size_and_versions(data, tiny_path, tmp_path):
    """A group (like mmlu) reports one acc weighted over its subtasks, sized by their questions."""
    group = {"group": "synthetic_hazard_all", "task": ["synthetic_hazard_split0", "synthetic_hazard_split1"],
             "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}], "metadata": {"version": 3}}
    (tmp_path / "group.yaml").write_text(json.dumps(group))
    model, tokenizer = from_pretrained(tiny_path)
    ev = evaluate.Evaluator(tokenizer, hazard_tasks=["synthetic_hazard_all"], utility_tasks=["synthetic_utility"],
                            include_path=[data.task_include_path, str(tmp_path)], ppl_texts=data.retain[:8],
                            max_length=data.max_length, limit=10)
    scores, sizes = ev.lm_eval_scores(model)
    assert sizes == {"synthetic_hazard_all": 20, "synthetic_utility": 10}
    assert set(scores) == {"acc/synthetic_hazard_all", "acc/synthetic_utility"}
    # lm-eval reports a group's version as a string, a task's as written in its YAML
    assert str(ev.versions["synthetic_hazard_all"]) == "3" and ev.versions["synthetic_hazard_split1"] == 1


def test_task_lists_come_from_cfg_eval(data):
    own = evaluate.resolve_tasks(compose_cfg().eval, data)
    assert own.hazard == sorted(set(data.hazard_tasks.values())) and own.utility == data.utility_tasks
    assert own.include_defaults is False
    paper = evaluate.resolve_tasks(compose_cfg("eval=paper").eval, data)
    assert paper.hazard == ["wmdp_bio"]
    assert paper.utility == ["mmlu", "winogrande", "arc_easy", "arc_challenge", "hellaswag"]
    assert paper.include_defaults is True
    with pytest.raises(ConfigError, match=r"eval.utility_tasks=\[\]"):
        evaluate.resolve_tasks(compose_cfg("eval.utility_tasks=[]").eval, data)


def test_preflight_names_a_missing_local_file(tmp_path):
    task = {"task": "local_copy", "dataset_path": "json", "output_type": "multiple_choice",
            "dataset_kwargs": {"data_files": {"test": str(tmp_path / "absent.jsonl")}}, "test_split": "test",
            "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}", "doc_to_target": "answer"}
    (tmp_path / "local_copy.yaml").write_text(json.dumps(task))
    with pytest.raises(ConfigError, match="'local_copy' needs dataset json.*absent.jsonl"):
        evaluate.check_tasks_available(["local_copy"], include_path=str(tmp_path), include_defaults=False)
    with pytest.raises(ConfigError, match="'nonexistent_task': no such task"):
        evaluate.check_tasks_available(["nonexistent_task"], include_path=str(tmp_path), include_defaults=False)
    generative = {**task, "task": "local_generative", "output_type": "generate_until"}
    (tmp_path / "local_generative.yaml").write_text(json.dumps(generative))
    with pytest.raises(ConfigError, match="'local_generative': output_type 'generate_until'; allowed multiple_choice"):
        evaluate.check_tasks_available(["local_generative"], include_path=str(tmp_path), include_defaults=False)


def test_preflight_offline_wmdp_fails_fast_with_the_message(tmp_path):
    """HF_DATASETS_OFFLINE=1 and an empty cache: the real wmdp_bio task YAML, one actionable line.
    Only lm-eval's wmdp folder is indexed (the full index of built-ins alone takes ~10 s)."""
    import lm_eval
    wmdp_dir = Path(lm_eval.__file__).parent / "tasks" / "wmdp"
    code = ("import sys\nfrom harness.errors import ConfigError\nfrom harness.evaluate import check_tasks_available\n"
            "try:\n"
            f"    check_tasks_available(['wmdp_bio'], include_path={str(wmdp_dir)!r}, include_defaults=False)\n"
            "except ConfigError as e:\n    print(e); sys.exit(2)\n")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert time.perf_counter() - t0 < 60
    message = out.stdout.strip()
    assert "eval task 'wmdp_bio' needs dataset cais/wmdp (config wmdp-bio)" in message
    assert "HF_DATASETS_OFFLINE=1" in message and "eval.include_path" in message


# ---------------------------------------------------------------------------------------------
# Requests built once: the fast path equals lm-eval's plain `evaluate`
# ---------------------------------------------------------------------------------------------

def _fast_equals_plain(ev, model) -> dict:
    fast = ev.evaluate(model)
    assert fast == ev.evaluate(model, plain=True)
    return fast


def test_fast_path_equals_plain_lm_eval_on_tiny_and_specdef_model(quick_evaluator, tiny_model):
    """Same accuracies and perplexities to the last bit as lm-eval's own `evaluate` with tokenization
    from scratch, on the tiny model and after SpecDef (whose compensated function drifts in float32)."""
    from specdef import apply_specdef
    model, _ = tiny_model
    plain = _fast_equals_plain(quick_evaluator, model)
    assert set(plain) == {*(f"acc/{t}" for t in quick_evaluator.tasks), "hazard_acc", "utility_acc",
                          "retain_ppl", "forget_ppl"}
    apply_specdef(model, alpha=1e4, k=8, layers=["model.layers.*.mlp.down_proj"])
    defended = _fast_equals_plain(quick_evaluator, model)
    assert defended["retain_ppl"] != plain["retain_ppl"]  # float32 drift: a different model state was scored


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _write_local_tasks(folder: Path, data) -> None:
    """Local copies of the paper's kinds of tasks over the synthetic world (`dataset_path: json`):
    - `local_bench`, a group of groups like mmlu: `local_carriers` (a tag of two tasks) and
      `local_organs` (a list of two tasks); leaf tasks include a template, carry a `description` and
      a `doc_to_choice` list (every value of their subject, eight choices) with an integer target;
    - `local_arc`, arc-style: choices and target by Jinja (`{{choices.text}}`,
      `{{choices.label.index(answerKey)}}`), scored by acc and acc_norm;
    - `local_winogrande`: lm-eval's winogrande YAML and its Python functions, partial-context scoring
      (several contexts, one continuation)."""
    import lm_eval
    rows = [json.loads(line) for s in (0, 1) for line in (data.root / f"hazard_split{s}.jsonl").read_text().splitlines()]
    template = {"dataset_path": "json", "test_split": "test", "output_type": "multiple_choice",
                "doc_to_text": "{{question}}", "doc_to_target": "label", "metadata": {"version": 2},
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    (folder / "_template.yaml").write_text(json.dumps(template))
    leaves = {"local_host": ("host", "local_carrier_tasks"), "local_transmission": ("transmission", "local_carrier_tasks"),
              "local_target": ("target", None), "local_treatment": ("treatment", None)}
    for task, (subject, tag) in leaves.items():
        docs = [r for r in rows if r["subject"] == f"hazard/{subject}"]
        pool = sorted({c for r in docs for c in r["choices"]})
        file = _jsonl(folder / f"{task}.jsonl", [{"question": r["question"], "label": pool.index(r["choices"][r["answer"]])}
                                                  for r in docs])
        spec = {"include": "_template.yaml", "task": task, "doc_to_choice": pool,
                "description": f"the following are questions about the {subject} of a pathogen .\n\n",
                "dataset_kwargs": {"data_files": {"test": file}}, **({"tag": tag} if tag else {})}
        (folder / f"{task}.yaml").write_text(json.dumps(spec))
    weighted = [{"metric": "acc", "weight_by_size": True}]
    groups = {"local_carriers": ["local_carrier_tasks"], "local_organs": ["local_target", "local_treatment"],
              "local_bench": ["local_carriers", "local_organs"]}
    for group, members in groups.items():
        (folder / f"{group}.yaml").write_text(json.dumps({"group": group, "task": members, "metadata": {"version": 1},
                                                           "aggregate_metric_list": weighted}))
    utility = [json.loads(line) for line in (data.root / "utility.jsonl").read_text().splitlines()]
    arc = [{"question": r["question"], "answerKey": "ABCD"[r["answer"]],
            "choices": {"text": r["choices"], "label": list("ABCD")}} for r in utility]
    (folder / "local_arc.yaml").write_text(json.dumps({
        "task": "local_arc", "dataset_path": "json", "test_split": "test", "output_type": "multiple_choice",
        "dataset_kwargs": {"data_files": {"test": _jsonl(folder / "arc.jsonl", arc)}},
        "doc_to_text": "{{question}}", "doc_to_choice": "{{choices.text}}",
        "doc_to_target": "{{choices.label.index(answerKey)}}", "metadata": {"version": 1},
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")]}))
    # winogrande: "the famous dish of _ is soup ." with the true town and another one
    facts = [m for t in data.retain if (m := re.match(r"^(the .* of )(\w+)( is .*)$", t))]
    wino = [{"sentence": f"{m[1]}_{m[3]}", "option1": m[2] if i % 2 else facts[i - 7][2],
             "option2": facts[i - 7][2] if i % 2 else m[2], "answer": "1" if i % 2 else "2"}
            for i, m in enumerate(facts) if facts[i - 7][2] != m[2]]
    source = Path(lm_eval.__file__).parent / "tasks" / "winogrande"
    shutil.copy(source / "preprocess_winogrande.py", folder)
    yaml = (source / "default.yaml").read_text()
    for line, new in {"task: winogrande": "task: local_winogrande", "dataset_path: allenai/winogrande": "dataset_path: json",
                      "dataset_name: winogrande_xl": "dataset_kwargs: {data_files: {validation: %s}}"
                      % _jsonl(folder / "wino.jsonl", wino), "training_split: train": ""}.items():
        assert line in yaml, line
        yaml = yaml.replace(line, new)
    (folder / "local_winogrande.yaml").write_text(yaml)


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory, data) -> Path:
    folder = tmp_path_factory.mktemp("local_tasks")
    _write_local_tasks(folder, data)
    return folder


def test_local_copies_of_paper_tasks_groups_and_subtasks(local_tasks, tiny_path, data):
    """Groups of groups, tags, descriptions, list choices, acc_norm and partial-context scoring: the
    fast path equals lm-eval's plain one; groups are sized over their subtasks."""
    model, tokenizer = from_pretrained(tiny_path)
    ev = evaluate.Evaluator(tokenizer, hazard_tasks=["local_bench"], utility_tasks=["local_arc", "local_winogrande"],
                            include_path=str(local_tasks), ppl_texts=data.retain[:8], max_length=data.max_length,
                            limit=12)
    scores = _fast_equals_plain(ev, model)
    assert set(scores) == {"acc/local_bench", "acc/local_arc", "acc_norm/local_arc", "acc/local_winogrande",
                           "hazard_acc", "utility_acc", "retain_ppl"}
    _, sizes = ev.lm_eval_scores(model)
    assert sizes == {"local_bench": 48, "local_arc": 12, "local_winogrande": 12}
    assert {"local_carriers", "local_organs", "local_host", "local_treatment"} <= set(ev.versions)
    # the tiny model knows these facts: scores far above chance (1/8, 1/4, 1/2) mean the prompts reached it intact
    assert scores["acc/local_bench"] > 0.5 and scores["acc/local_arc"] > 0.8 and scores["acc/local_winogrande"] > 0.8


def test_requests_built_and_tokenized_once_and_shared(data, tiny_path, tiny_model, monkeypatch):
    """A second evaluation renders and tokenizes nothing; an evaluator of the same tasks and limit with
    its own copy of the tokenizer shares the requests and their token ids; another limit does not."""
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.task import ConfigurableTask
    calls = {"build": 0, "encode": 0}
    real_build, real_encode = ConfigurableTask.build_all_requests, TemplateLM._encode_pair
    monkeypatch.setattr(ConfigurableTask, "build_all_requests",
                        lambda *a, **k: calls.__setitem__("build", calls["build"] + 1) or real_build(*a, **k))
    monkeypatch.setattr(TemplateLM, "_encode_pair",
                        lambda *a, **k: calls.__setitem__("encode", calls["encode"] + 1) or real_encode(*a, **k))
    cfg = compose_cfg("eval.limit=7", "eval.ppl_samples=4").eval
    first = evaluate.build_evaluator(cfg, from_pretrained(tiny_path)[1], data)
    model, _ = tiny_model
    first.evaluate(model)
    assert calls == {"build": 3, "encode": 3 * 7 * 4}
    with torch.no_grad():
        model.lm_head.weight.mul_(1.01)  # a new model state
    second = evaluate.build_evaluator(cfg, from_pretrained(tiny_path)[1], data)
    assert second.evaluate(model) == first.evaluate(model)
    assert second.requests is first.requests and len(first.requests.tokens) == 1
    assert calls == {"build": 3, "encode": 3 * 7 * 4}
    other = evaluate.build_evaluator(compose_cfg("eval.limit=5", "eval.ppl_samples=4").eval, first.tokenizer, data)
    assert other.requests is not first.requests


def test_edited_task_file_is_read_again(tmp_path, tiny_path, data):
    """Requests are shared by the tasks' source files: rewriting a data file builds them again."""
    model, tokenizer = from_pretrained(tiny_path)
    rows = [json.loads(line) for line in (data.root / "utility.jsonl").read_text().splitlines()]
    task = {"task": "local_edit", "dataset_path": "json", "test_split": "test", "output_type": "multiple_choice",
            "dataset_kwargs": {"data_files": {"test": _jsonl(tmp_path / "q.jsonl", rows[:10])}},
            "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}", "doc_to_target": "answer"}
    (tmp_path / "local_edit.yaml").write_text(json.dumps(task))

    def score():
        ev = evaluate.Evaluator(tokenizer, hazard_tasks=["local_edit"], utility_tasks=[], include_path=str(tmp_path),
                                ppl_texts=data.retain[:4], max_length=data.max_length)
        return ev.lm_eval_scores(model)
    scores, sizes = score()
    assert scores["acc/local_edit"] > 0.8 and sizes == {"local_edit": 10}
    _jsonl(tmp_path / "q.jsonl", [{**r, "answer": (r["answer"] + 1) % 4} for r in rows[:9]])  # wrong answers
    scores, sizes = score()
    assert scores["acc/local_edit"] < 0.2 and sizes == {"local_edit": 9}
