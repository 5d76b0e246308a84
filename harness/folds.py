"""Deterministic question folds of a multiple-choice task, for held-out relearning (RTT) at paper scale.

Deeb & Roger (arXiv 2410.08827) split the evaluation questions into folds, fine-tune on the questions
of some folds with their answers and score the others. Here a question's fold follows from its key
alone, the question's text with its choices (`question_key`): the distinct keys are ranked by blake2b
and dealt round-robin, and every row takes its key's fold. So the folds are the same on every machine
and row order, balanced, and a question that appears twice (WMDP repeats some stems) never has one
copy relearned and the other held out.

The fold tasks are lm-eval's built-in task YAML (`include:` of the installed file, so prompt, target
and metric are lm-eval's own) plus `process_docs: !function harness.folds.fold_<i>_of_<k>`, which
lm-eval imports from this module; `write_fold_tasks` writes them into a folder for the TaskManager.
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path

_FOLD_FUNCTION = re.compile(r"fold_(\d+)_of_(\d+)")


def question_key(question: str, choices) -> str:
    """What decides a question's fold: its text and its choices (rows equal in both share a fold)."""
    return json.dumps([question, list(choices)])


def fold_indices(keys: list[str], fold: int, folds: int) -> list[int]:
    """Row indices of fold `fold` of `folds`, in the rows' order: distinct keys are dealt round-robin in
    blake2b order, and rows with equal keys go together."""
    if not 0 <= fold < folds:
        raise ValueError(f"fold {fold} of {folds}: allowed 0..{folds - 1}")
    ranked = sorted(set(keys), key=lambda k: (hashlib.blake2b(k.encode(), digest_size=8).hexdigest(), k))
    chosen = set(ranked[fold::folds])
    return [i for i, k in enumerate(keys) if k in chosen]


def select_fold(dataset, fold: int, folds: int):
    """A `datasets.Dataset` of questions reduced to one fold (lm-eval's `process_docs`)."""
    keys = [question_key(q, c) for q, c in zip(dataset["question"], dataset["choices"])]
    return dataset.select(fold_indices(keys, fold, folds))


def __getattr__(name: str):
    # lm-eval resolves `!function harness.folds.fold_2_of_5` by getattr on this module
    match = _FOLD_FUNCTION.fullmatch(name)
    if match is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return functools.partial(select_fold, fold=int(match[1]), folds=int(match[2]))


def fold_task_name(task: str, fold: int, folds: int) -> str:
    return f"{task}_fold{fold}_of_{folds}"


def builtin_task_yaml(task: str) -> Path:
    """The installed lm-eval YAML that defines `task` (read without indexing all ~14k built-ins)."""
    import lm_eval
    root = Path(lm_eval.__file__).parent / "tasks"
    for path in sorted(root.rglob(f"{task}.yaml")):
        return path
    raise FileNotFoundError(f"lm-eval has no built-in task file {task}.yaml under {root}")


def write_fold_tasks(task: str, folds: int, folder: Path) -> dict[int, str]:
    """Write one task YAML per fold of lm-eval's built-in `task` into `folder`; {fold: task name}."""
    folder.mkdir(parents=True, exist_ok=True)
    source = builtin_task_yaml(task)
    names = {}
    for fold in range(folds):
        names[fold] = fold_task_name(task, fold, folds)
        text = (f"include: {json.dumps(str(source))}  # lm-eval's own task: prompt, target, metric\n"
                f"task: {names[fold]}\n"
                f"process_docs: !function harness.folds.fold_{fold}_of_{folds}\n")
        target = folder / f"{names[fold]}.yaml"
        if not target.is_file() or target.read_text() != text:
            target.write_text(text)
    return names
