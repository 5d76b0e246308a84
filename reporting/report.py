"""Tables and plots of a sweep: `python -m reporting.report <dir> [--out <dir>] [--wandb]`.

Reads every complete `result.json` under <dir> (incomplete/truncated ones are skipped) and writes,
into --out (default <dir>/report), each table of `reporting.tables` as Markdown (`tables.md`), LaTeX
(`<table>.tex`) and CSV (`<table>.csv`), plus the plots of `reporting.plots`.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pandas as pd

from harness.outcome import DAGGER_RULES
from harness.record import RECORD_NAME
from reporting.tables import build_tables, frame_of, load_records, write_tables


def log_to_wandb(tables: dict[str, pd.DataFrame], images: list[Path], out: Path, mode: str, project: str) -> None:
    """The sweep's tables (wandb.Table) and plots (wandb.Image) as one wandb run."""
    from harness.loggers import WandbLogger
    with WandbLogger(project=project, mode=mode, group="report") as logger:
        logger.start({"report_dir": str(out)}, out)
        for name, frame in tables.items():
            logger.table(f"table/{name}", frame)
        for path in images:
            logger.image(f"plot/{path.stem}", path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reporting.report", description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="folder searched recursively for result.json")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default <root>/report)")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.add_argument("--wandb", action="store_true", help="also log the tables and plots to wandb")
    parser.add_argument("--wandb-mode", default="offline", choices=["offline", "online"])
    parser.add_argument("--wandb-project", default="specdef-harness")
    parser.add_argument("--dagger-rule", default=None, choices=list(DAGGER_RULES),
                        help="read every run under this dagger rule (default: the rule each run used)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = args.out or args.root / "report"
    records = load_records(args.root)
    try:
        df = frame_of(records, args.dagger_rule)
    except ValueError as error:
        print(f"error: {error}")
        return 1
    if df.empty:
        print(f"error: no complete {RECORD_NAME} under {args.root}")
        return 1
    tables = build_tables(df)
    written = write_tables(tables, out)
    images = [] if args.no_plots else _plots(records, df, args.root, out)
    if args.wandb:
        log_to_wandb(tables, images, out, args.wandb_mode, args.wandb_project)
    print(f"{len(df)} runs -> {len(tables)} tables, {len(images)} plots in {out}")
    for path in written + images:
        print(f"  {path}")
    return 0


def _plots(records, df: pd.DataFrame, root: Path, out: Path) -> list[Path]:
    from reporting import plots  # lazy: matplotlib only when plots are drawn
    written = plots.write_plots(records, out, csv_dirs=[root])
    return [p for p in [plots.headline(records, df, out / "headline.png")] if p] + written


if __name__ == "__main__":
    raise SystemExit(main())
