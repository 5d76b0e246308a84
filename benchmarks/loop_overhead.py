"""Overhead of the harness training loop over a minimal hand-written PyTorch loop.

Same tiny pretrained model (fresh copy of the same weights each run), same pre-encoded batches,
same optimizer (Adam), same number of steps; no evaluation. The two loops run alternately in one
process, `--repeats` times each, and the medians are compared, so drift in machine load (other
jobs on a shared box) hits both alike.

    python benchmarks/loop_overhead.py [--steps 100] [--repeats 7] [--batch-size 16] [--threads 1]

Prints per-run seconds, the medians and the ratio harness / minimal (target <= 1.05).
"""
from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import time

import torch

from experiments.common import tiny_setup
from harness.batches import batch_iterator
from harness.models import from_pretrained
from harness.train import lm_loss, train_loop


def load(batch_size: int, n_batches: int):
    """The cached tiny model and `n_batches` pre-encoded retain batches (tokenising stays out of the timing)."""
    path, data = tiny_setup()
    model, tokenizer = from_pretrained(path)
    batches = list(itertools.islice(batch_iterator(tokenizer, data.retain, batch_size, data.max_length, 0),
                                    n_batches))
    return model, batches


def run_harness(model, batches, steps: int, lr: float) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    t0 = time.perf_counter()
    train_loop(model, itertools.cycle(batches), lm_loss, [opt], steps=steps, desc="bench")
    return time.perf_counter() - t0


def run_minimal(model, batches, steps: int, lr: float) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    t0 = time.perf_counter()
    model.train()
    for batch in itertools.islice(itertools.cycle(batches), steps):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base, batches = load(args.batch_size, n_batches=32)
    runners = {"harness": run_harness, "minimal": run_minimal}
    times: dict[str, list[float]] = {name: [] for name in runners}
    run_minimal(copy.deepcopy(base), batches, 5, args.lr)  # warm-up: allocator, kernels, lazy imports
    for r in range(args.repeats):
        # alternate which loop goes first, so neither always runs right after the other
        order = list(runners) if r % 2 == 0 else list(reversed(runners))
        for name in order:
            times[name].append(runners[name](copy.deepcopy(base), batches, args.steps, args.lr))
    for name, ts in times.items():
        print(f"{name:8s} median {statistics.median(ts):.3f} s  runs " + " ".join(f"{t:.3f}" for t in ts))
    ratio = statistics.median(times["harness"]) / statistics.median(times["minimal"])
    print(f"steps={args.steps} batch_size={args.batch_size} threads={torch.get_num_threads()} "
          f"ratio harness/minimal = {ratio:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
