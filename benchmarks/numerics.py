"""What a numerics pin costs and what it computes: the tiny model's pretraining recipe under each pin, side by
side in one run, and the first `python run.py` on a clean cache (shipped weights).

    python -m benchmarks.numerics                  # ms/step and weights hash per pin (~3 min on 2 cores)
    python -m benchmarks.numerics --run            # and `python run.py` (and threads=1) on a clean cache
    python -m benchmarks.numerics --steps 50 --rounds 1

Each variant runs the recipe's first `--steps` steps (harness/tiny.py, `stop_after`) in its own
subprocess with `--threads` threads; the variants alternate, `--rounds` times, and the median per step
is printed, so load from another job on the machine falls on all of them alike. `emulated avx2` is what
an AVX2-only machine computes natively (ATen's AVX2 kernels, MKL restricted to AVX2): its hash must be
the avx2 pin's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import numerics, synthetic, tiny
from harness.data import synthetic_data
from harness.models import tiny_spec
from harness.record import cpu_name
from experiments.common import compose_config

REPO = Path(__file__).resolve().parents[1]
# (label, pin, extra environment under the native pin)
VARIANTS = [("native", "native", {}), ("avx2 pin", "avx2", {}), ("scalar pin", "scalar", {}),
            ("emulated avx2 (native)", "native", {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"})]


def time_pins(steps: int, rounds: int, threads: int) -> list[dict]:
    cfg = compose_config()
    world, spec = synthetic.WorldConfig(**cfg.data.world), tiny_spec(cfg.model)
    data = synthetic_data(world, Path(cfg.paths.cache_dir).expanduser(), cfg.data.max_length)
    runs: dict[str, list] = {label: [] for label, *_ in VARIANTS}
    hashes: dict[str, set] = {label: set() for label, *_ in VARIANTS}
    kernels: dict[str, str] = {}
    for _ in range(rounds):
        for label, pin, extra in VARIANTS:
            if not numerics.available(pin):
                continue
            with tempfile.TemporaryDirectory(prefix="bench_numerics_") as tmp:
                report = tiny._pretrain_in_subprocess(world, spec, data.root, Path(tmp) / "m", pin, progress=False,
                                                      threads=threads, extra_env=extra, stop_after=steps)
                hashes[label].add(tiny.weights_digest(Path(tmp) / "m")[:16])
            runs[label].append(report["train_seconds"] / steps)
            kernels[label] = report["cpu_capability"]
    rows = []
    native = statistics.median(runs["native"]) if runs["native"] else None
    for label, pin, _ in VARIANTS:
        if not runs[label]:
            rows.append({"variant": label, "note": f"not available here ({numerics.why_unavailable(pin)})"})
            continue
        ms = statistics.median(runs[label]) * 1000
        rows.append({"variant": label, "ATen kernels": kernels[label], "ms/step": round(ms, 1),
                     "x native": round(ms / 1000 / native, 2) if native else None,
                     "weights": ",".join(sorted(hashes[label]))})
    return rows


def time_first_run(*overrides: str) -> dict:
    """`python run.py` on an empty cache (the tiny model copied from assets/tiny), wall time to the table."""
    with tempfile.TemporaryDirectory(prefix="bench_first_run_") as tmp:
        # a fresh clone: no cache and no record store (a stored record of the same config would be reused)
        env = {**os.environ, "SPECDEF_CACHE": str(Path(tmp) / "cache"), "SPECDEF_OUTPUTS": str(Path(tmp) / "outputs"),
               "WANDB_MODE": "offline",
               "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "run.py", *overrides], cwd=REPO, env=env,
                             capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        pretrained = "pretraining the tiny model" in out.stderr + out.stdout
    if out.returncode != 0:
        raise SystemExit(f"python run.py failed ({out.returncode}):\n{out.stderr[-2000:]}")
    if "exists; skipping it" in out.stderr + out.stdout:
        raise SystemExit("python run.py reused a stored record: the timing is not a first run")
    return {"seconds": round(seconds, 1), "pretrained": pretrained, "table": out.stdout.strip().splitlines()[-6:]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--run", action="store_true", help="also time python run.py on a clean cache")
    a = parser.parse_args(argv)
    print(f"{cpu_name()}, {os.cpu_count()} cores; {json.dumps(numerics.describe())}")
    print(f"tiny recipe, first {a.steps} steps, {a.threads} thread(s), median of {a.rounds} alternating rounds:")
    for row in time_pins(a.steps, a.rounds, a.threads):
        if "note" in row:
            print(f"  {row['variant']:<24} {row['note']}")
        else:
            print(f"  {row['variant']:<24} {row['ATen kernels']:<8} {row['ms/step']:>7.1f} ms/step  "
                  f"{row['x native']:.2f}x native  weights {row['weights']}")
    if a.run:
        # the default thread count (all cores) and one thread: on a busy machine OpenMP's spin-waits
        # make two-thread ops of the tiny model several times slower than one thread
        for overrides in ([], ["threads=1"]):
            first = time_first_run(*overrides)
            print(f"{' '.join(['python run.py', *overrides])} on a clean cache: {first['seconds']} s "
                  f"({'pretrained the tiny model' if first['pretrained'] else 'shipped weights, no pretraining'})")
            print("\n".join("  " + line for line in first["table"][-5:]))


if __name__ == "__main__":
    main()
