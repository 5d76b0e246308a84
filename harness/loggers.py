"""Experiment loggers: `logger=none` and `logger=wandb` (offline unless configured otherwise).

A logger is used as a context manager so the run is closed in every case, exceptions included;
otherwise the jobs of a Hydra multirun merge into one wandb run.

What a wandb run receives: the resolved config (through `harness.record.redact`, so no API key or
token), per-step metrics (`log`), final metrics (`summary`), and at the end of a run the run's own
one-row tables (wandb.Table, `table`) and its plots (wandb.Image, `image`), which the runner builds
and hands over (runner/report.py): a logger only carries what it is given.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from harness.record import redact

log = logging.getLogger(__name__)


class NullLogger:
    """`logger=none`: every call is a no-op, so the pipeline never checks which logger it has."""
    enabled = False

    def start(self, config: dict, run_dir: Path) -> None: ...
    def log(self, metrics: dict, step: int | None = None) -> None: ...
    def summary(self, metrics: dict) -> None: ...
    def table(self, name: str, frame) -> None: ...
    def image(self, name: str, path: Path) -> None: ...
    def finish(self, failed: bool = False) -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.finish(failed=exc_type is not None)
        return False


class WandbLogger(NullLogger):
    """Weights & Biases. mode=offline (default) writes `<dir>/wandb/offline-run-*` and needs no account;
    mode=online syncs with the API key wandb finds in its own login or $WANDB_API_KEY."""
    enabled = True

    def __init__(self, project: str = "specdef-harness", entity: str | None = None, mode: str = "offline",
                 group: str | None = None, tags: list | None = None, dir: str | None = None):
        if mode not in ("offline", "online", "disabled"):
            from harness.errors import ConfigError
            raise ConfigError(f"logger.mode={mode!r}: allowed offline, online or disabled")
        self.kwargs = {"project": project, "entity": entity, "mode": mode, "group": group,
                       "tags": list(tags or [])}
        self.dir = dir
        self.run = None

    def start(self, config: dict, run_dir: Path) -> None:
        import wandb
        wandb_dir = Path(self.dir) if self.dir else Path(run_dir)
        wandb_dir.mkdir(parents=True, exist_ok=True)
        # keep wandb's caches beside the run rather than in $HOME
        os.environ.setdefault("WANDB_CACHE_DIR", str(wandb_dir / ".wandb_cache"))
        os.environ.setdefault("WANDB_DATA_DIR", str(wandb_dir / ".wandb_data"))
        # wandb copies sys.argv into wandb-metadata.json; a token given on the command line must not follow
        argv, sys.argv = sys.argv, redact(list(sys.argv))
        try:
            self.run = wandb.init(dir=str(wandb_dir), config=redact(config), reinit="finish_previous",
                                  name=Path(run_dir).name, **self.kwargs)
        finally:
            sys.argv = argv

    def log(self, metrics: dict, step: int | None = None) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def summary(self, metrics: dict) -> None:
        if self.run is not None:
            for k, v in redact(metrics).items():
                self.run.summary[k] = v

    def table(self, name: str, frame) -> None:
        if self.run is not None:
            import wandb
            self.run.log({name: wandb.Table(dataframe=frame.reset_index(drop=True).astype(str))})

    def image(self, name: str, path: Path) -> None:
        if self.run is not None:
            import wandb
            self.run.log({name: wandb.Image(str(path))})

    def finish(self, failed: bool = False) -> None:
        if self.run is not None:
            run, self.run = self.run, None  # cleared first: a failing finish is not retried on a dead run
            run.finish(exit_code=1 if failed else 0)
