"""The broken rule's perplexity factor, calibrated on the undefended model relearning what it knows.

    python -m experiments.dagger_calibration [--sweep DIR] [extra overrides ...]

Runs Table 1's undefended row (`run.py -m experiment=table1 defense=none`: every optimizer at each
learning rate of its tiny grid, 150 steps on the whole forget corpus, which the model already knows)
with the perplexity part of the broken rule switched off (`attack.dagger.ppl_factor=1e9`, so no run
stops on it), and reads from each run the largest retain-perplexity ratio to the start, the lowest
utility, the largest training loss over the first step's, and both rules' verdicts.

The factor is twice the largest ratio reached in the lower half of any grid (ranks 0 and 1), rounded
up: the undefended model's own narrow fine-tuning stays inside it with a margin of 2, as the paper's
"over 100 %" leaves an 8B model. Higher learning rates are shown, not used: there the undefended model
may itself break, which is what the rule is for. Writes results/dagger_calibration.{csv,md}.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

from experiments.common import REPO, RESULTS_DIR, compose_config, run_sweep, script_command, write_table
from reporting.tables import _get, load_records

LOWER_HALF = (0, 1)   # table1.lr_rank values the factor is calibrated on
MARGIN = 2.0


# Table 1's undefended row, the perplexity part of the broken rule off so that no run stops on it
SWEEP = ["experiment=table1", "defense=none", "attack.dagger.ppl_factor=1e9"]


def run_row(record: dict) -> dict:
    """What one undefended run did to the model, and each rule's verdict."""
    attack = record["attack"]
    trajectory = attack["trajectory"]
    start, first = trajectory[0], _get(attack, "extra.first_loss") or math.nan
    ratios = [p["retain_ppl"] / start["retain_ppl"] for p in trajectory]
    peak = max(range(len(ratios)), key=ratios.__getitem__)
    verdicts = _get(attack, "extra.dagger_by_rule", {})
    return {
        "optimizer": attack["name"], "lr_rank": _get(record, "config.table1.lr_rank"),
        "lr": _get(record, "config.lr"), "steps": attack["steps"],
        "max_ppl_ratio": ratios[peak], "at_step": trajectory[peak]["step"],
        "min_utility": min(p["utility_acc"] for p in trajectory), "start_utility": start["utility_acc"],
        "max_loss_ratio": max((p["loss"] / first for p in trajectory[1:] if p.get("loss") is not None),
                              default=math.nan),
        "final_hazard": trajectory[-1]["hazard_acc"],
        "legacy_dagger": _verdict(verdicts.get("legacy")), "broken_dagger": _verdict(verdicts.get("broken")),
    }


def _verdict(verdict: dict | None) -> str:
    if not verdict or verdict.get("step") is None:
        return "-"
    return f"†{verdict['step']} ({verdict['reason']})"


def calibrated_factor(df: pd.DataFrame) -> float:
    """Twice the largest ratio in the lower half of the grids, rounded up to an integer."""
    lower = df[df["lr_rank"].isin(LOWER_HALF)]
    return float(math.ceil(MARGIN * lower["max_ppl_ratio"].max()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, default=REPO / "outputs" / "dagger_calibration",
                        help="the sweep folder (runs already there are reused)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "dagger_calibration")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides of the sweep")
    args = parser.parse_args(argv)
    run_sweep(args.sweep, [*SWEEP, *args.overrides])
    df = pd.DataFrame([run_row(r) for _, r in load_records(args.sweep)])
    df = df.sort_values(["optimizer", "lr_rank"]).reset_index(drop=True)
    factor = calibrated_factor(df)
    declared = compose_config().attack.dagger.ppl_factor
    lower = df[df["lr_rank"].isin(LOWER_HALF)]
    notes = [
        f"Calibrated factor: {MARGIN:g} x the largest ratio in the lower half of the grids "
        f"({lower['max_ppl_ratio'].max():.3g}, {lower.loc[lower['max_ppl_ratio'].idxmax(), 'optimizer']}), "
        f"rounded up: **{factor:g}**. Declared in conf/attack/_base.yaml (attack.dagger.ppl_factor): {declared:g}"
        + ("." if declared == factor else " -- they differ: update the config and regenerate the tables."),
        f"Lower half of the grids: the broken rule fired on {(lower['broken_dagger'] != '-').sum()} of "
        f"{len(lower)} runs (perplexity part off), the legacy rule on {(lower['legacy_dagger'] != '-').sum()}.",
        "Runs: Table 1's preset (150 steps, 1 thread per job, 1 job at a time by default); the provenance above is "
        "of the script that launched and read them.",
        "max_ppl_ratio: the largest retain perplexity over the start's (at_step); max_loss_ratio: the "
        "largest evaluated training loss over the first step's; the dagger columns: each rule's first † "
        "with its reason, '-' for none.",
    ]
    write_table(df, args.out, "Calibration of the broken rule on the undefended model (Table 1's row)",
                notes, command=script_command("experiments.dagger_calibration", argv))
    print(df.to_string(index=False))
    print(notes[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
