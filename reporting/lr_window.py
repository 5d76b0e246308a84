"""experiment=lr_window's report: the learning-rate window per (α, optimizer), and how η_max moves with α.

    python -m reporting.lr_window outputs/sweeps/lr_window_tiny [--out results/lr_window_tiny]

Reads the sweep's `lr_window.json` (runner/lr_window_sweeper.py: each cell's window, the runs behind it,
σ₁(H) per α, the run count and wall time) and writes into --out (default <sweep>/report):
- `README.md`: the table (η_min, η_max, the window or "empty", steps to recover at the attacker-best lr,
  2/σ₁(H)), the fitted slopes of log η_max against log α per optimizer with their 95 % intervals, and
  what they say about Theorem 3's prediction (about −1 for SGD), plainly, where they contradict it;
- `lr_window.csv` (one row per cell, the brackets included), `runs.csv` (every run: lr, verdict, step),
  `slopes.csv`;
- `lr_window.png`: (a) log-log η_max against α per optimizer, the measured 2/σ₁(H) beside it, the undone
  line (attack.undo=collapse) dotted, float32's frontier marked; (b) steps to recover at the best lr
  against α, a cross where the window has closed;
- `PROVENANCE.md` (reporting.provenance) with the sweep's run count and wall time.
The verdict of each run is its record's `attack.outcome.kind`, carried by the summary; nothing here
re-derives it, and nothing here needs torch.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from hydra.experimental.callback import Callback

from reporting.tables import fmt_number

log = logging.getLogger(__name__)

SUMMARY_NAME = "lr_window.json"  # written by runner/lr_window_sweeper.py
SGD_SLOPE = -1.0                 # Theorem 3: σ₁(H) grows at least like α, so GD's stable lr (< 2/σ₁) falls like 1/α
DEFENDED, UNDONE = "specdef", "undone (collapse)"


def load_summary(sweep_dir: Path) -> dict | None:
    path = Path(sweep_dir) / SUMMARY_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def _line(undo) -> str:
    return UNDONE if undo not in (None, "null", "None") else DEFENDED


def window_frame(summary: dict) -> pd.DataFrame:
    """One row per cell: its labels, the window with its brackets, the attacker-best lr, 2/σ₁(H)."""
    two_over = {(s["alpha"], _line(s["undo"])): 2.0 / s["sigma1_H"]
                for s in summary.get("sharpness", []) if s.get("sigma1_H")}
    rows = []
    for cell in summary["cells"]:
        w = cell["window"]
        line = _line(cell["undo"])
        rows.append({
            "line": line, "alpha": cell["alpha"], "optimizer": cell["optimizer"], "budget": cell.get("budget"),
            "eta_min": w["eta_min"], "eta_min_below": w["eta_min_below"], "eta_min_censored": w["eta_min_censored"],
            "eta_max": w["eta_max"], "eta_max_above": w["eta_max_above"], "eta_max_censored": w["eta_max_censored"],
            "empty": w["empty"], "decades": w["decades"], "best_lr": w["best_lr"], "best_steps": w["best_steps"],
            "best_hazard_acc": w["best_hazard_acc"], "two_over_sigma1": two_over.get((cell["alpha"], line)),
            "runs": len(w["probes"]), "lowest_lr_run": min(p["lr"] for p in w["probes"]),
            "inversions": "; ".join(w["inversions"]),
        })
    return pd.DataFrame(rows).sort_values(["line", "optimizer", "alpha"], kind="stable").reset_index(drop=True)


def runs_frame(summary: dict) -> pd.DataFrame:
    """Every run of the sweep: its cell, lr and verdict (the record's attack.outcome)."""
    rows = [{"line": _line(c["undo"]), "alpha": c["alpha"], "optimizer": c["optimizer"], **p}
            for c in summary["cells"] for p in c["window"]["probes"]]
    rows += [{"line": _line(s["undo"]), "alpha": s["alpha"], "optimizer": "sigma1_H run", "lr": None,
              "kind": None, "sigma1_H": s["sigma1_H"]} for s in summary.get("sharpness", [])]
    return pd.DataFrame(rows)


def loglog_fit(x: Sequence[float], y: Sequence[float], level: float = 0.95) -> dict:
    """Least squares of log10 y on log10 x: slope, intercept and the slope's t-interval (n >= 3)."""
    from scipy import stats
    lx, ly = np.log10(np.asarray(x, float)), np.log10(np.asarray(y, float))
    n = len(lx)
    if n < 2 or np.ptp(lx) == 0:
        return {"slope": math.nan, "low": math.nan, "high": math.nan, "intercept": math.nan, "n": n}
    slope, intercept = np.polyfit(lx, ly, 1)
    low = high = math.nan
    if n >= 3:
        resid = ly - (slope * lx + intercept)
        se = math.sqrt(float(resid @ resid) / (n - 2) / float(((lx - lx.mean()) ** 2).sum()))
        half = stats.t.ppf(0.5 + level / 2, n - 2) * se
        low, high = slope - half, slope + half
    return {"slope": float(slope), "low": low, "high": high, "intercept": float(intercept), "n": n}


def fitted(df: pd.DataFrame) -> pd.DataFrame:
    """The cells whose η_max is bracketed (a run not † and a † run above it): censored ones carry a bound only."""
    return df[df["eta_max"].notna() & ~df["eta_max_censored"].astype(bool)]


def slopes_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Per optimizer (defended line): the slope of log η_max on log α; then 2/σ₁(H)'s."""
    rows = []
    for name, cells in fitted(df[df["line"] == DEFENDED]).groupby("optimizer", sort=True):
        rows.append({"what": f"eta_max {name}", "optimizer": name, **loglog_fit(cells["alpha"], cells["eta_max"]),
                     "alphas": " ".join(fmt_number(a) for a in cells["alpha"])})
    sharp = df[(df["line"] == DEFENDED) & df["two_over_sigma1"].notna()].drop_duplicates("alpha")
    if len(sharp):
        rows.append({"what": "2/sigma1(H)", "optimizer": None, **loglog_fit(sharp["alpha"], sharp["two_over_sigma1"]),
                     "alphas": " ".join(fmt_number(a) for a in sharp["alpha"])})
    return pd.DataFrame(rows)


def fmt_slope(row) -> str:
    if math.isnan(row["slope"]):
        return f"— (n={row['n']})"
    if math.isnan(row["low"]):
        return f"{row['slope']:.2f} (n={row['n']}, no interval)"
    return f"{row['slope']:.2f} [{row['low']:.2f}, {row['high']:.2f}] (n={row['n']})"


def verdicts(slopes: pd.DataFrame) -> list[str]:
    """Plain sentences, one per optimizer: its slope against −1 (Theorem 3's prediction for SGD) and
    against 2/σ₁(H)'s. Theorem 3 bounds σ₁(H) from below by a multiple of α, so for gradient descent
    η_max can fall no slower than 1/α: a slope above −1 (shallower) contradicts it; one below (steeper)
    is not "about −1" either, and the page says so, beside how fast 2/σ₁(H) itself falls."""
    sharp = slopes[slopes["what"] == "2/sigma1(H)"]
    sharp_row = sharp.iloc[0] if len(sharp) else None
    out = []
    for _, row in slopes[slopes["optimizer"].notna()].iterrows():
        name, s = row["optimizer"], fmt_slope(row)
        if math.isnan(row["low"]):
            out.append(f"{name}: slope {s}: too few α with a bracketed η_max for an interval.")
            continue
        sgd = name == "sgd"
        if row["low"] <= SGD_SLOPE <= row["high"]:
            text = f"{name}: slope {s}, consistent with −1" + (", Theorem 3's prediction." if sgd else ".")
        elif row["high"] < SGD_SLOPE:
            text = (f"**sgd: slope {s}, steeper than the −1 Theorem 3 predicts**: η_max falls faster than 1/α."
                    if sgd else f"{name}: slope {s}, steeper than −1.")
        else:
            text = (f"**sgd: slope {s} contradicts Theorem 3**: η_max falls slower than 1/α, which the theorem's "
                    "bound on σ₁(H) rules out for gradient descent." if sgd
                    else f"{name}: slope {s}, shallower than −1: it gains on the curvature.")
        if sharp_row is not None and not math.isnan(sharp_row["low"]):
            tracks = row["low"] <= sharp_row["slope"] <= row["high"]
            text += (f" It {'tracks' if tracks else 'does not track'} 2/σ₁(H), whose slope is {fmt_slope(sharp_row)}.")
        if sgd and not row["low"] <= SGD_SLOPE <= row["high"]:
            text += " The runs behind it: the sgd rows of runs.csv."
        out.append(text)
    return out


def cell_eta_max(row) -> str:
    if row["eta_max"] is None or pd.isna(row["eta_max"]):
        return f"< {fmt_number(row['lowest_lr_run'])} (all †)"
    return ("≥ " if row["eta_max_censored"] else "") + fmt_number(row["eta_max"])


def cell_eta_min(row) -> str:
    if row["eta_min"] is None or pd.isna(row["eta_min"]):
        return "—"
    return ("≤ " if row["eta_min_censored"] else "") + fmt_number(row["eta_min"])


def cell_window(row) -> str:
    return "empty" if row["empty"] else f"{row['decades']:.1f} decades"


def cell_steps(row) -> str:
    if row["best_lr"] is None or pd.isna(row["best_lr"]):
        return "—"
    return f"✓{int(row['best_steps'])} at lr={fmt_number(row['best_lr'])}"


def markdown_table(df: pd.DataFrame) -> str:
    head = "| line | α | optimizer | η_min | η_max | window | steps to recover (best lr) | 2/σ₁(H) | runs |"
    lines = [head, "| --- " * 9 + "|"]
    for _, r in df.iterrows():
        two = fmt_number(r["two_over_sigma1"]) if pd.notna(r["two_over_sigma1"]) else "—"
        mark = " ¹" if r["inversions"] else ""
        lines.append(f"| {r['line']} | {fmt_number(r['alpha'])} | {r['optimizer']}{mark} | {cell_eta_min(r)} | "
                     f"{cell_eta_max(r)} | {cell_window(r)} | {cell_steps(r)} | {two} | {r['runs']} |")
    return "\n".join(lines)


def readme(summary: dict, df: pd.DataFrame, slopes: pd.DataFrame, frontier: float | None) -> str:
    base = next((c["base"] for c in summary["cells"] if c.get("base")), "its base")
    budget = df["budget"].dropna().max() if "budget" in df else None
    parts = [
        "# The learning-rate window against α",
        f"SpecDef over {base}, relearning on the forget corpus for at most {fmt_number(budget) if budget else '?'} "
        "steps. η_max: the largest learning rate whose run is not † (diverged); η_min: the smallest that "
        "recovers within the budget; the window is empty when no learning rate recovers (SpecDef has won "
        "at that α). Steps: to recover at the attacker-best learning rate. 2/σ₁(H): the step size at which "
        "gradient descent without momentum stops being stable (heavy-ball momentum β moves it to 2(1+β)/σ₁(H): "
        "SGD here has β = 0.9), σ₁(H) measured on the attack's loss at the start, on the defended model. "
        "η_max reads `≥ x` where no run up to x was †, `< x` where every run down to x was †; η_min `≤ x` "
        "where the smallest learning rate run still recovered.",
        "![η_max and steps to recover against α](lr_window.png)",
        markdown_table(df),
    ]
    notes = [f"¹ {r['optimizer']} at α={fmt_number(r['alpha'])} ({r['line']}): runs out of monotone order: "
             f"{r['inversions']}." for _, r in df[df["inversions"] != ""].iterrows()]
    if notes:
        parts.append("\n".join(notes))
    parts.append("## Slopes of log η_max against log α (95 % t-interval)")
    parts.append("\n".join(f"- {v}" for v in verdicts(slopes)) or "- no α with a bracketed η_max.")
    if frontier and (df["alpha"] >= frontier).any():
        parts.append(f"α = {fmt_number(frontier)} is float32's frontier (results/precision_frontier.md): the "
                     "defended model computes its function there only up to a rounding drift that grows with α.")
    return "\n\n".join(parts) + "\n"


def plot(df: pd.DataFrame, slopes: pd.DataFrame, path: Path, frontier: float | None = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {name: f"C{i}" for i, name in enumerate(sorted(df["optimizer"].unique()))}
    fits = {r["optimizer"]: r for _, r in slopes.iterrows() if r["optimizer"]}
    for name, color in colors.items():
        _eta_max_line(ax, df[(df["optimizer"] == name) & (df["line"] == DEFENDED)], color,
                      f"{name} (slope {fmt_slope(fits[name])})" if name in fits else name)
        undone = df[(df["optimizer"] == name) & (df["line"] == UNDONE) & df["eta_max"].notna()]
        ax.loglog(undone["alpha"], undone["eta_max"], "d:", color=color, mfc="none", alpha=0.8)
        _steps_line(bx, df[(df["optimizer"] == name) & (df["line"] == DEFENDED)], color, name)
        done = df[(df["optimizer"] == name) & (df["line"] == UNDONE) & df["best_steps"].notna()]
        bx.semilogx(done["alpha"], done["best_steps"], "d:", color=color, mfc="none", alpha=0.8)
    sharp = df[(df["line"] == DEFENDED) & df["two_over_sigma1"].notna()].drop_duplicates("alpha").sort_values("alpha")
    ax.loglog(sharp["alpha"], sharp["two_over_sigma1"], "s--", color="black", label="2/σ₁(H), measured")
    ax.plot([], [], "d:", color="gray", mfc="none", label="undone (attack.undo=collapse)")
    budget = df["budget"].dropna().max() if df["budget"].notna().any() else None
    if budget:
        bx.axhline(budget, color="gray", lw=0.8, ls="--")
        bx.text(bx.get_xlim()[0], budget, " budget", va="bottom", fontsize=7, color="gray")
    for a in (ax, bx):
        if frontier:
            a.axvline(frontier, color="gray", lw=0.8, ls="-.")
            a.text(frontier, 0.02, " float32\n frontier", transform=a.get_xaxis_transform(), fontsize=7, color="gray")
        a.set_xlabel("α")
    ax.set_ylabel("η_max (largest lr not †)")
    ax.set_title("(a) the stable learning rate against α")
    ax.legend(fontsize=6.5, loc="upper right")
    bx.set_ylabel("steps to recover at the best lr")
    bx.set_title("(b) convergence-rate control; × window closed")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _eta_max_line(ax, cells: pd.DataFrame, color: str, label: str) -> None:
    """Bracketed η_max as points with their bracket; bounds as triangles (▼ every run †, ▲ none †)."""
    cells = cells.sort_values("alpha")
    ok = fitted(cells)
    upper = (ok["eta_max_above"] - ok["eta_max"]).clip(lower=0)
    ax.errorbar(ok["alpha"], ok["eta_max"], yerr=[np.zeros(len(ok)), upper], fmt="o-", color=color, ms=4,
                capsize=2, label=label)
    ax.set_xscale("log"), ax.set_yscale("log")
    below = cells[cells["eta_max"].isna()]
    ax.scatter(below["alpha"], below["lowest_lr_run"], marker="v", color=color)
    above = cells[cells["eta_max"].notna() & cells["eta_max_censored"].astype(bool)]
    ax.scatter(above["alpha"], above["eta_max"], marker="^", color=color)


def _steps_line(bx, cells: pd.DataFrame, color: str, label: str) -> None:
    cells = cells.sort_values("alpha")
    open_ = cells[~cells["empty"].astype(bool)]
    bx.semilogx(open_["alpha"], open_["best_steps"], "o-", color=color, ms=4, label=label)
    closed = cells[cells["empty"].astype(bool)]
    budget = cells["budget"].dropna().max() if cells["budget"].notna().any() else None
    if budget and len(closed):
        bx.scatter(closed["alpha"], [budget] * len(closed), marker="x", color=color, s=40)


def write_report(summary: dict, out: Path, command: str, frontier: float | None = None,
                 notes: Sequence[str] = (), threads: int | None = 1) -> list[Path]:
    from reporting.provenance import write_provenance
    out.mkdir(parents=True, exist_ok=True)
    df = window_frame(summary)
    slopes = slopes_frame(df)
    paths = {"csv": out / "lr_window.csv", "runs": out / "runs.csv", "slopes": out / "slopes.csv",
             "png": out / "lr_window.png", "md": out / "README.md"}
    df.to_csv(paths["csv"], index=False)
    runs_frame(summary).to_csv(paths["runs"], index=False)
    slopes.to_csv(paths["slopes"], index=False)
    plot(df, slopes, paths["png"], frontier)
    paths["md"].write_text(readme(summary, df, slopes, frontier))
    s = summary
    cost = (f"{s['runs']} runs ({len(s.get('sharpness', []))} measuring σ₁(H)) in {s['rounds']} rounds, "
            f"{s['wall_seconds'] / 60:.1f} min wall; {s.get('compute_seconds', 0) / 60:.1f} min of run time "
            "summed over the records (a record resumed from the store counts its first run's).")
    search = ", ".join(f"{k}={v}" for k, v in s.get("search", {}).items())
    prov = write_provenance(out, command, threads=threads,
                            notes=[cost, f"Search: {search} (conf/hydra/sweeper/lr_window.yaml).", *notes])
    return [*paths.values(), prov]


def preset_axes(config) -> dict[str, str]:
    """The preset's swept axes at the sweep's scale, each key with every value any of its cell products
    takes (conf/experiment/lr_window.yaml: hydra.sweeper.scales.<scale>.cells)."""
    axes: dict[str, list[str]] = {}
    for product in config.hydra.sweeper.scales[config.hydra.sweeper.scale].cells:
        for key, values in product.items():
            axes.setdefault(key, [])
            axes[key] += [v for v in str(values).split(",") if v not in axes[key]]
    return {key: ",".join(values) for key, values in axes.items()}


class ReportOnSweepEnd(Callback):
    """`on_multirun_end` of experiment=lr_window: the report into `out` (results/lr_window_<scale>) when
    the sweep ran the whole preset; a part of it or a changed setting (reporting.callbacks.departures,
    the rule every preset's report follows) keeps its report in <sweep>/report and says how to publish it."""

    def __init__(self, out: str | None = None, frontier: float | None = None):
        self.out, self.frontier = out, frontier

    def on_multirun_end(self, config, **kwargs) -> None:
        from reporting.callbacks import departures, out_chosen
        sweep_dir = Path(config.hydra.sweep.dir)
        summary = load_summary(sweep_dir)
        if summary is None:  # plan=true prints plans only; otherwise the sweep stopped before its end
            (log.info if config.get("plan") else log.warning)("no %s under %s; no report built", SUMMARY_NAME, sweep_dir)
            return
        published = Path(self.out) if self.out else sweep_dir / "report"
        changed = [] if out_chosen(config) else departures(config, preset_axes(config))
        out = sweep_dir / "report" if changed else published
        task = list(config.hydra.overrides.task)
        n_jobs = config.hydra.launcher.get("n_jobs")
        write_report(summary, out, " ".join(["python run.py -m", *task]), self.frontier,
                     threads=config.get("threads"), notes=[
                         f"Jobs ran {n_jobs or 'as the launcher scheduled them'} at a time, each with the thread "
                         "count above.",
                         f"Rebuilt from the sweep with `python -m reporting.lr_window {sweep_dir} --out {out}`."])
        if changed and out != published:
            log.warning("not the preset's whole grid (%s): report in %s, %s left as it was; to publish it: "
                        "python -m reporting.lr_window %s --out %s", " ".join(changed), out, published, sweep_dir,
                        published)
        print(f"lr_window report: {out}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reporting.lr_window", description=__doc__.split("\n")[0])
    parser.add_argument("sweep", type=Path, help=f"the sweep folder holding {SUMMARY_NAME}")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default <sweep>/report)")
    parser.add_argument("--frontier", type=float, default=1e5, help="α of float32's frontier (marked; 0: none)")
    args = parser.parse_args(argv)
    summary = load_summary(args.sweep)
    if summary is None:
        print(f"error: no {SUMMARY_NAME} under {args.sweep}")
        return 1
    out = args.out or args.sweep / "report"
    command = " ".join(["python -m reporting.lr_window", *(sys.argv[1:] if argv is None else argv)])
    for path in write_report(summary, out, command, args.frontier or None):
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
