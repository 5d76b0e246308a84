"""Each baseline's tiny-scale strength by a declared rule (conf/calibration/baselines.yaml).

    python -m experiments.calibrate_baselines [--methods rmu npo ...] [--sweeps DIR]

For each baseline, one `run.py -m defense=<m> attack=none defense.<knob>=<grid>` sweep (2 jobs, one
thread each; runs already in --sweeps are reused), then the rule picks a value: the weakest whose
defended model has hazard <= target_hazard with a utility drop <= max_utility_drop from the
undefended model. Writes results/calibration.{csv,md}, and says where the composed config (conf/defense/<m>.yaml,
and conf/defense_scale/<scale>/<m>.yaml under scale=) declares another value.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from experiments.common import CONF_DIR, REPO, RESULTS_DIR, compose_config, run_sweep, script_command, write_table
from reporting.tables import _get, load_records

RULES = CONF_DIR / "calibration" / "baselines.yaml"


def sweep(method: str, key: str, grid: list[float], folder: Path, extra: list[str]) -> None:
    values = ",".join(repr(float(v)) for v in grid)
    run_sweep(folder, [f"defense={method}", "attack=none", f"defense.{key}={values}", "threads=1", *extra])


def rows_of(method: str, key: str, folder: Path) -> list[dict]:
    rows = []
    for _, record in load_records(folder):
        base, defended = record["metrics"]["base"], record["metrics"]["pre_attack"]
        rows.append({"defense": method, "knob": key, "value": float(_get(record, f"config.defense.{key}")),
                     "hazard": defended["hazard_acc"], "utility": defended["utility_acc"],
                     "utility_drop": base["utility_acc"] - defended["utility_acc"],
                     "retain_ppl": defended["retain_ppl"], "defense_seconds": record["timings"]["defense"]})
    return rows


def choose(df: pd.DataFrame, target_hazard: float, max_drop: float) -> tuple[float, bool]:
    """(chosen value, whether it meets the target) for one defense's grid rows."""
    within = df[df["utility_drop"] <= max_drop + 1e-9].sort_values("value")
    meets = within[within["hazard"] <= target_hazard]
    if len(meets):
        return float(meets["value"].iloc[0]), True
    if len(within):
        return float(within.sort_values(["hazard", "value"])["value"].iloc[0]), False
    return math.nan, False


def main(argv=None) -> int:
    rules = OmegaConf.to_container(OmegaConf.load(RULES))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(rules["knobs"]), choices=list(rules["knobs"]))
    parser.add_argument("--sweeps", type=Path, default=REPO / "outputs" / "calibration")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "calibration")
    parser.add_argument("extra", nargs="*", help="Hydra overrides added to every run")
    args = parser.parse_args(argv)
    rows, summary = [], []
    scale = compose_config(args.extra).scale.name
    knobs = {**rules["knobs"], **rules.get("scales", {}).get(scale, {})}
    for method in args.methods:
        key, grid = knobs[method]["key"], knobs[method]["grid"]
        sweep(method, key, grid, args.sweeps / method, args.extra)
        # a grid extended later leaves the same value's run under an older job folder too: one row per value
        mine = pd.DataFrame(rows_of(method, key, args.sweeps / method)).drop_duplicates("value").sort_values("value")
        value, met = choose(mine, rules["target_hazard"], rules["max_utility_drop"])
        declared = float(compose_config([f"defense={method}", *args.extra]).defense[key])
        mine["chosen"] = mine["value"] == value
        rows.append(mine)
        summary.append({"defense": method, "knob": key, "chosen": value, "meets target": met,
                        "declared in the config": declared, "agrees": math.isclose(declared, value)})
    df, table = pd.concat(rows, ignore_index=True), pd.DataFrame(summary)
    notes = [f"Rule (conf/calibration/baselines.yaml): the weakest grid value with hazard <= "
             f"{rules['target_hazard']} and a utility drop <= {rules['max_utility_drop']} from the undefended "
             "model; where none meets it, the lowest hazard within the utility bound (meets target: false).",
             "## Chosen values\n\n" + table.to_markdown(index=False)]
    where = f"under {' '.join(args.extra)}" if args.extra else "on the embedded default"
    write_table(df, args.out, f"Baseline strength {where}, by rule", notes,
                command=script_command("experiments.calibrate_baselines", argv))
    print(df.to_string(index=False))
    print(table.to_string(index=False))
    return 0 if table["agrees"].all() else 2


if __name__ == "__main__":
    sys.exit(main())
