"""A run's own report: its one-row tables and its plots, written under `<run dir>/report` and
handed to the logger (`logger=wandb`: wandb.Table and wandb.Image in the run)."""
from __future__ import annotations

from pathlib import Path

from harness.record import RECORD_NAME


def log_run_report(logger, record: dict, run_dir: Path) -> list[Path]:
    """Build the run's report and log it; nothing is drawn for a logger that would drop it (`logger=none`)."""
    if not getattr(logger, "enabled", False):
        return []
    tables, images = write_run_report(record, run_dir)
    for name, frame in tables.items():
        logger.table(f"table/{name}", frame)
    for path in images:
        logger.image(f"plot/{path.stem}", path)
    return images


def write_run_report(record: dict, run_dir: Path) -> tuple[dict, list[Path]]:
    """({table name: frame}, plot paths) of one record, as a sweep's report builds them for many."""
    import pandas as pd  # lazy: pandas and matplotlib only for loggers that use them
    from reporting import plots, tables as report_tables
    path, out = Path(run_dir) / RECORD_NAME, Path(run_dir) / "report"
    tables = report_tables.build_tables(pd.DataFrame([report_tables.record_row(path, record)]))
    report_tables.write_tables(tables, out)
    return tables, plots.write_plots([(path, record)], out)
