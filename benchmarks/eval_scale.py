"""Evaluation at paper-like request counts: build, tokenization, memory, and one evaluation vs its forward
passes, on a generated MMLU-shaped task. (Not a test: timings depend on the machine.)

    python -m benchmarks.eval_scale [--questions 14000] [--plain] [--threads 1]

The task is written to a temp folder as a local lm-eval task (`dataset_path: json`) shaped like MMLU's
default template: a `description`, a 30-120-word question with four lettered options, `doc_to_choice`
the letters, acc and acc_norm; 14,000 questions x 4 choices is MMLU's request count. Its words come
from the synthetic world, so the tiny model reads them (its answers are chance: the facts are random).
Printed: building the requests (rendering), tokenizing them (first evaluation), resident memory they
add (lm-eval and torch are loaded before the baseline), an evaluation vs the bare forward passes it needs, and with --plain lm-eval's own path once.
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import psutil
import torch

from benchmarks.eval_speed import forward_passes, load, timed
from harness.evaluate import Evaluator


def write_task(folder: Path, words: list[str], questions: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    phrase = lambda lo, hi: " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    rows = [{"question": phrase(30, 120), "choices": [phrase(1, 8) for _ in range(4)], "answer": rng.randrange(4)}
            for _ in range(questions)]
    (folder / "mmlu_shaped.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "mmlu_shaped.yaml").write_text(json.dumps({
        "task": "mmlu_shaped", "dataset_path": "json", "test_split": "test", "output_type": "multiple_choice",
        "dataset_kwargs": {"data_files": {"test": str(folder / "mmlu_shaped.jsonl")}},
        "description": "the following are questions about {{choices[0]}} .\n\n",
        "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
                       "D. {{choices[3]}}\nanswer :",
        "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "answer",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=14000)
    ap.add_argument("--plain", action="store_true", help="also time lm-eval's own path once (slow)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg, data, model, tokenizer = load([])
    folder = Path(tempfile.mkdtemp(prefix="eval_scale_"))
    write_task(folder, " ".join(data.retain).split(), args.questions)
    import lm_eval.evaluator  # noqa: F401 - libraries loaded before the memory baseline
    from harness.evaluate import _quiet_hflm
    _quiet_hflm()
    process = psutil.Process()
    rss = process.memory_info().rss
    evaluator = None

    def build():
        nonlocal evaluator
        evaluator = Evaluator(tokenizer, hazard_tasks=["mmlu_shaped"], utility_tasks=[], include_path=str(folder),
                              ppl_texts=data.retain[:cfg.eval.ppl_samples], max_length=data.max_length,
                              batch_size=cfg.eval.batch_size)
    built = timed(build)
    added = [(process.memory_info().rss - rss) / 2**20]
    first = timed(lambda: evaluator.evaluate(model))
    added.append((process.memory_info().rss - rss) / 2**20)
    again, bare = timed(lambda: evaluator.evaluate(model)), timed(lambda: forward_passes(evaluator, model))
    print(f"{len(evaluator.requests.instances)} requests ({args.questions} questions x 4), {args.threads} thread(s):")
    print(f"  build (render) {built:.1f} s; first evaluation (tokenizes, then scores) {first:.1f} s")
    print(f"  resident memory: +{added[0]:.0f} MiB after the build, +{added[1]:.0f} MiB after the first evaluation")
    print(f"  evaluation {again:.1f} s, forward passes {bare:.1f} s: {again / bare:.2f}x")
    if args.plain:
        plain = timed(lambda: evaluator.evaluate(model, plain=True))
        print(f"  plain lm-eval {plain:.1f} s: {plain / bare:.2f}x the forward passes")


if __name__ == "__main__":
    main()
