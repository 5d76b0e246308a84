"""Figures of a sweep (PNG, matplotlib Agg), written beside the tables by `reporting.report`.

- `headline.png` (`headline`, a sweep's report only): the README's figure: hazard accuracy vs step under Adam (or the first optimizer
  swept), one line per defense at the learning rate the summary table picks for it (the attacker's
  best), SpecDef dashed, the recovery threshold dotted.
- `hazard_<optimizer>.png`: hazard accuracy vs step, one line per defense x lr (mean over seeds; an x
  marks the last point of a diverged run).
- `loss_<optimizer>.png`: training loss vs step, same lines.
- `sigma1_vs_alpha.png` from `hessian_vs_alpha.csv` if present: columns `alpha` and one of
  `sigma1`, `sigma_1`, `sigma1_H`, `lambda_max` (first found); one line per value of `method`,
  `layer` or `dtype` if such a column exists.
- `drift_vs_alpha.png` from `precision_frontier.csv` if present: columns `alpha`, `dtype` and one of
  `rel_error`, `rel_logit_error`, `drift` (first found); one line per dtype.
Both CSVs are looked up in each of `csv_dirs` in order (a report passes the sweep folder). Columns
are matched case-insensitively; rows with non-numeric or non-positive values are dropped (log axes).
"""
from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from reporting.tables import best_lr, defense_label, defense_order, fmt_number, relearning_runs  # noqa: E402

log = logging.getLogger(__name__)

SIGMA_COLUMNS = ("sigma1", "sigma_1", "sigma1_h", "lambda_max")
DRIFT_COLUMNS = ("rel_error", "rel_logit_error", "drift")
GROUP_COLUMNS = ("method", "layer", "dtype")


def trajectory_frame(records) -> pd.DataFrame:
    """One row per evaluated point of every relearning run: optimizer, line label, step, metrics."""
    rows = []
    for _, rec in records:
        attack = rec.get("attack", {})
        if attack.get("name") in (None, "none"):
            continue
        label = f"{defense_label(rec)} lr={fmt_number(float(rec['config']['lr']))}"
        for point in attack.get("trajectory", []):
            rows.append({"optimizer": attack["name"], "line": label, "step": point["step"],
                         "diverged": bool(attack.get("diverged")),
                         "hazard_acc": _float(point.get("hazard_acc")), "loss": _float(point.get("loss"))})
    return pd.DataFrame(rows)


def _float(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _curves(frame: pd.DataFrame, metric: str, ylabel: str, title: str, path: Path) -> Path | None:
    data = frame.dropna(subset=[metric])
    if data.empty:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, line in data.groupby("line", sort=True):
        mean = line.groupby("step")[metric].mean()  # mean over seeds at each evaluated step
        (handle,) = ax.plot(mean.index, mean.values, marker=".", label=label)
        if line["diverged"].any():
            ax.plot(mean.index[-1], mean.values[-1], "x", color=handle.get_color(), markersize=9)
    ax.set(xlabel="attack step", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _column(frame: pd.DataFrame, names) -> str | None:
    lower = {c.lower(): c for c in frame.columns}
    return next((lower[n] for n in names if n in lower), None)


def _find_csv(name: str, csv_dirs) -> Path | None:
    return next((Path(d) / name for d in csv_dirs if (Path(d) / name).is_file()), None)


def _loglog(csv: Path, ycols, ylabel: str, title: str, path: Path, group_cols) -> Path | None:
    frame = pd.read_csv(csv)
    x, y = _column(frame, ("alpha",)), _column(frame, ycols)
    if x is None or y is None:
        log.warning("%s: needs columns alpha and one of %s; found %s", csv, list(ycols), list(frame.columns))
        return None
    group = _column(frame, group_cols)
    frame[x], frame[y] = pd.to_numeric(frame[x], errors="coerce"), pd.to_numeric(frame[y], errors="coerce")
    frame = frame[(frame[x] > 0) & (frame[y] > 0)].sort_values(x)
    if frame.empty:
        return None
    fig, ax = plt.subplots(figsize=(5, 4))
    groups = frame.groupby(group, sort=True) if group else [(None, frame)]
    for value, part in groups:
        mean = part.groupby(x)[y].mean()
        ax.plot(mean.index, mean.values, marker="o", label=None if value is None else f"{group}={value}")
    ax.set(xscale="log", yscale="log", xlabel="α", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3, which="both")
    if group:
        ax.legend(fontsize=8)
    return _save(fig, path)


def headline(records, frame: pd.DataFrame, path: Path, optimizer: str = "adam") -> Path | None:
    """Each defense's trajectory at its attacker-best lr (best_lr, as in the summary table); a star
    marks the step it was recovered at, an x the step it diverged at (†), whichever came first.
    `frame`: the records' rows (reporting.tables.frame_of)."""
    runs = relearning_runs(frame)
    if runs.empty:
        return None
    if optimizer not in set(runs["optimizer"]):
        optimizer = sorted(runs["optimizer"].unique())[0]
    runs = runs[runs["optimizer"] == optimizer]
    by_run = {str(p.parent): r for p, r in records}
    fig, ax = plt.subplots(figsize=(8.5, 4))
    threshold = None
    for defense in defense_order(runs):
        mine = runs[runs["defense"] == defense]
        lr = best_lr(mine)
        chosen = mine[mine["lr"] == lr]
        points = pd.DataFrame([pt for run in chosen["run"] for pt in by_run[run]["attack"].get("trajectory", [])])
        if points.empty:
            continue
        mean = points.groupby("step")["hazard_acc"].mean()
        specdef = defense.startswith("specdef")
        (handle,) = ax.plot(mean.index, mean.values, "--" if specdef else "-", marker=".",
                            linewidth=2 if specdef else 1.2, label=f"{defense} (lr {fmt_number(lr)})")
        for kind, marker in (("recovered", "*"), ("diverged", "x")):
            steps = chosen.loc[chosen["outcome"] == kind, "outcome_step"]
            if not steps.empty and steps.iloc[0] in mean.index:
                ax.plot(steps.iloc[0], mean[steps.iloc[0]], marker, color=handle.get_color(), markersize=11)
        config = by_run[chosen["run"].iloc[0]].get("config", {})
        threshold = threshold or config.get("attack", {}).get("recover_threshold")
    if threshold:
        ax.axhline(float(threshold), color="grey", linestyle=":", linewidth=1, label="recovery threshold")
    ax.set(xlabel="attack step", ylabel="hazard accuracy",
           title=f"Relearning with {optimizer}, each defense at its attacker-best lr\n"
                 "(*: recovered with the model intact; x: diverged first, †)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: lines fill the axes
    return _save(fig, path)


def write_plots(records, out: Path, csv_dirs=()) -> list[Path]:
    """All the figures the records and CSVs allow; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    traj = trajectory_frame(records)
    for optimizer, frame in (traj.groupby("optimizer", sort=True) if not traj.empty else []):
        written.append(_curves(frame, "hazard_acc", "hazard accuracy", f"relearning with {optimizer}",
                               out / f"hazard_{optimizer}.png"))
        written.append(_curves(frame, "loss", "training loss", f"relearning loss, {optimizer}",
                               out / f"loss_{optimizer}.png"))
    sigma = _find_csv("hessian_vs_alpha.csv", csv_dirs)
    if sigma:
        written.append(_loglog(sigma, SIGMA_COLUMNS, "σ₁(H)", "Hessian spectrum vs α",
                               out / "sigma1_vs_alpha.png", GROUP_COLUMNS))
    drift = _find_csv("precision_frontier.csv", csv_dirs)
    if drift:
        written.append(_loglog(drift, DRIFT_COLUMNS, "relative error", "function drift vs α",
                               out / "drift_vs_alpha.png", ("dtype",)))
    return [p for p in written if p is not None]
