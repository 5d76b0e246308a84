"""The baselines on the embedded default: hazard / utility accuracy, retain perplexity and wall time.

    python -m experiments.baselines_table                       # none + the five baselines, ~5-10 min on 2 cores
    python -m experiments.baselines_table --methods rmu npo     # a subset
    python -m experiments.baselines_table threads=1 seed=1      # Hydra overrides for every run
    python -m experiments.baselines_table --methods none elm --out results/baselines_bylines threads=1 data.world.bylines=true

Each method is one `runner.pipeline.run` of `defense=<method> attack=none` with the defended-model
cache off (so the defense really trains and its wall time is measured), in a temporary run folder.
Writes results/baselines.{csv,md}. The tiny model's kernels are too small to gain from a second
thread; on a CPU shared with other work, one thread is often faster (`threads=1`).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Sequence

import pandas as pd

from runner.pipeline import run
from experiments.common import RESULTS_DIR, compose_config, write_table

METHODS = ("none", "rmu", "npo", "repnoise", "elm", "tar")


def compose_run(method: str, extra: Sequence[str] = ()):
    return compose_config([f"defense={method}", "attack=none", "cache_defended=false", "resume=false", *extra])


def measure(methods: Sequence[str], extra: Sequence[str] = ()) -> pd.DataFrame:
    rows = []
    for method in methods:
        with tempfile.TemporaryDirectory(prefix=f"baseline_{method}_") as run_dir:
            record = run(compose_run(method, extra), Path(run_dir))
        m = record["metrics"]["pre_attack"]
        rows.append({"method": method, "hazard accuracy": m["hazard_acc"], "utility accuracy": m["utility_acc"],
                     "retain perplexity": m["retain_ppl"], "wall time (s)": record["timings"]["defense"]})
    return pd.DataFrame(rows)


def write(df: pd.DataFrame, stem: Path, command: str, overrides: Sequence[str] = ()) -> list[Path]:
    notes = ["Embedded default: synthetic WMDP, tiny pretrained Llama (4 layers, hidden 128); 4-choice "
             "questions, chance 0.25. Accuracies and perplexity are of the defended model before any attack; "
             "wall time is the defense stage alone (model loading and evaluation excluded); hyperparameters "
             "in conf/defense/<method>.yaml."]
    title = "Baselines on the embedded default" + (f" ({' '.join(overrides)})" if overrides else "")
    return write_table(df, stem, title, notes, command=command, body=df.to_markdown(index=False, floatfmt=".3f"))


def relative(path: Path) -> str:
    """`path` as typed from the working directory, for a printed command."""
    path = path.resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "baselines", help="output stem (.csv and .md)")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides applied to every run, e.g. threads=1 seed=1")
    args = p.parse_args(argv)
    df = measure(args.methods, args.overrides)
    command = "python -m experiments.baselines_table " + " ".join(
        (["--methods", *args.methods] if list(args.methods) != list(METHODS) else [])
        + (["--out", relative(args.out)] if args.out != RESULTS_DIR / "baselines" else []) + list(args.overrides))
    world = [o for o in args.overrides if not o.startswith("threads=")]  # what changes the numbers, not the speed
    for path in write(df, args.out, command.strip(), world):
        print(f"wrote {path}")
    print(df.to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
