"""Relearning facts the model never saw: each optimizer over its documented lr grid.

    python -m experiments.relearn_grid                                   # the default world, ~10 min on 2 cores
    python -m experiments.relearn_grid --out results/relearn_grid_bylines data.world.bylines=true
    python -m experiments.relearn_grid --optimizers sgd adam             # a subset

The model is the tiny model pretrained without hazard split 1 (`model.spec.exclude_splits=[1]`), so
it answers split 1 near chance; each run fine-tunes on split 1 for the attack config's steps and
stops once split 1 reaches 0.8. This is the protocol behind the tuned learning rates in
conf/attack/<name>.yaml and tests/test_attacks.py, and it is how a change to the tiny model is checked
against them. Each run is one `runner.pipeline.run` in a temporary folder; writes <out>.{csv,md}.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Sequence

import pandas as pd

from experiments.baselines_table import relative
from harness.outcome import recovered_step
from runner.pipeline import run
from experiments.common import RESULTS_DIR, compose_config, write_table

# Each optimizer's tiny-model grid, as documented in conf/attack/<name>.yaml.
GRID = {
    "sgd": ["1e-3", "3e-3", "1e-2"],
    "adam": ["1e-4", "3e-4", "1e-3"],
    "sophia": ["3e-3", "1e-2", "2e-2"],
    "muon": ["3e-4", "1e-3", "3e-3"],
    "adahessian": ["1e-2", "2e-2", "4e-2"],
}
NAIVE = ["defense=none", "model.spec.exclude_splits=[1]", "attack.data.splits=[1]",
         "attack.recover_metric=relearned_acc", "attack.recover_threshold=0.8", "attack.stop_when_recovered=true",
         "cache_defended=false", "resume=false"]


def measure(optimizers: Sequence[str], extra: Sequence[str] = ()) -> pd.DataFrame:
    rows = []
    for name in optimizers:
        for lr in GRID[name]:
            with tempfile.TemporaryDirectory(prefix=f"relearn_{name}_") as run_dir:
                record = run(compose_config([f"attack={name}", f"lr={lr}", *NAIVE, *extra]), Path(run_dir))
            a = record["attack"]
            start_ppl = a["trajectory"][0]["retain_ppl"]
            rows.append({"optimizer": name, "lr": lr, "start acc": a["trajectory"][0]["relearned_acc"],
                         "steps to 0.8": recovered_step(a["outcome"]), "final acc": a["final"]["relearned_acc"],
                         "max retain ppl / start": max(p["retain_ppl"] for p in a["trajectory"]) / start_ppl,
                         "diverged": "†" if a["diverged"] else ""})
    return pd.DataFrame(rows)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizers", nargs="+", default=list(GRID), choices=list(GRID))
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "relearn_grid", help="output stem (.csv and .md)")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run, e.g. data.world.bylines=true")
    args = p.parse_args(argv)
    df = measure(args.optimizers, args.overrides)
    command = " ".join(["python -m experiments.relearn_grid",
                        *(["--optimizers", *args.optimizers] if list(args.optimizers) != list(GRID) else []),
                        *(["--out", relative(args.out)] if args.out != RESULTS_DIR / "relearn_grid" else []),
                        *args.overrides])
    print(write(df, args.out, command, args.overrides))


def write(df: pd.DataFrame, out: Path, command: str, overrides: Sequence[str] = ()) -> str:
    """<out>.csv and <out>.md; returns the Markdown table."""
    shown = df.assign(**{"steps to 0.8": [("never" if pd.isna(s) else str(int(s))) for s in df["steps to 0.8"]]})
    # tabulate would read "1e-3" as a number and print it with the float format
    table = shown.to_markdown(index=False, floatfmt=".2f", disable_numparse=[1, 3])
    title = "Relearning a never-seen hazard split" + (f" ({' '.join(overrides)})" if overrides else "")
    notes = ["Tiny model pretrained without hazard split 1; fine-tuning on split 1 (batch 64, evaluated every "
             "10 steps) until split 1 reaches 0.8 or the attack's steps run out. † = retain perplexity more "
             "than doubled (the run stops there)."]
    write_table(df, out, title, notes, command=command, body=table)
    return table


if __name__ == "__main__":
    main()
