"""The Hydra sweeper of experiment=lr_window: one learning-rate window search per cell, every cell's
pending runs launched together each round through the configured launcher (joblib here, SLURM at
scale=paper).

    python run.py -m experiment=lr_window                       (conf/experiment/lr_window.yaml)
    python run.py -m experiment=lr_window defense.alpha=1e3 attack=sgd     (one cell)

The cells are the product of the axes in `scales.<scale>.cells` (a list of products, so the undone
line can take fewer α than the defended one); an override on the command line replaces the axis of
the same key, as with Hydra's basic sweeper. Per cell, `runner.lr_window.WindowSearch` says which
learning rates to run; each run's verdict is its record's `attack.outcome` (result.json in the job's
folder), nothing re-derived here. Beside the cells, one run per cell of the other axes (α, undo), in the first
round, measures σ₁(H) of the attack's loss at the start (`scales.<scale>.sharpness`: its overrides, null for
none). The sweep writes `lr_window.json` into the sweep folder (every cell's window and runs, σ₁(H),
the run count and the wall time), which `reporting.lr_window` turns into tables and a figure.

Hydra only instantiates sweepers from the `hydra_plugins` package: the class registered there
(hydra_plugins/specdef_lr_window) is this one under that name.
"""
from __future__ import annotations

import itertools
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from harness.record import RECORD_NAME, read_record
from runner.lr_window import Ladder, WindowSearch

log = logging.getLogger(__name__)

SUMMARY_NAME = "lr_window.json"


class LrWindowSweeper(Sweeper):
    """One `WindowSearch` per cell; `scales[scale]` gives the cells, each optimizer's ladder and the σ₁(H)
    run's overrides; the other arguments are the search's (runner/lr_window.py: Ladder)."""

    def __init__(self, scale: str, scales: dict, points_per_decade: float = 1.0, resolution: float = 0.5,
                 extend: float = 2.0, max_extension: float = 6.0, points_per_round: int | None = None,
                 patience: int = 2, optimizer_axis: str = "attack", lr_key: str = "lr",
                 max_batch_size: int | None = None):
        super().__init__()
        if scale not in scales:
            raise ValueError(f"hydra.sweeper.scale={scale}: no entry in hydra.sweeper.scales ({', '.join(scales)})")
        chosen = scales[scale]
        self.scale, self.cell_products = scale, list(chosen["cells"])
        self.ladders = {k: tuple(v) for k, v in chosen["ladders"].items()}
        self.sharpness = list(chosen["sharpness"]) if chosen.get("sharpness") else None
        self.search = dict(points_per_decade=points_per_decade, resolution=resolution, extend=extend,
                           max_extension=max_extension, points_per_round=points_per_round, patience=patience)
        self.optimizer_axis, self.lr_key, self.max_batch_size = optimizer_axis, lr_key, max_batch_size
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher = None
        self.job_idx = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    # The cells

    def cells(self, arguments: Sequence[str]) -> tuple[list[str], list[dict[str, str]]]:
        """(overrides every job takes, the cells as {key: value}). A command-line key replaces the axis
        of the same key; a command-line sweep (a=1,2) of another key becomes an axis of every product."""
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader if self.hydra_context else None)
        given = {o.get_key_element(): _values(o) for o in parser.parse_overrides(list(arguments))}
        if self.lr_key in given:
            raise ValueError(f"{self.lr_key}= on the command line: the learning rate is what this sweeper searches")
        axes_keys = {k for product in self.cell_products for k in product}
        fixed = [f"{k}={v[0]}" for k, v in given.items() if k not in axes_keys and len(v) == 1]
        extra = {k: v for k, v in given.items() if k not in axes_keys and len(v) > 1}
        cells: list[dict[str, str]] = []
        for product in self.cell_products:
            axes = {k: given.get(k) or _values(parser.parse_override(f"{k}={v}")) for k, v in product.items()}
            for combo in itertools.product(*{**axes, **extra}.values()):
                cell = dict(zip([*axes, *extra], combo))
                if cell not in cells:
                    cells.append(cell)
        return fixed, cells

    def ladder(self, cell: dict[str, str]) -> Ladder:
        name = cell.get(self.optimizer_axis)
        if name not in self.ladders:
            raise ValueError(f"{self.optimizer_axis}={name}: no learning-rate ladder in hydra.sweeper.scales."
                             f"{self.scale}.ladders (has {', '.join(self.ladders)})")
        low, high = self.ladders[name]
        return Ladder(float(low), float(high), **self.search)

    def sharpness_cells(self, cells: list[dict[str, str]]) -> list[dict[str, str]]:
        """The cells without their optimizer axis, once each: σ₁(H) does not depend on the attacker."""
        if not self.sharpness:
            return []
        found: list[dict[str, str]] = []
        for cell in cells:
            rest = {k: v for k, v in cell.items() if k != self.optimizer_axis}
            if rest not in found:
                found.append(rest)
        return found

    # The sweep

    def sweep(self, arguments: list[str]) -> Any:
        t0 = time.perf_counter()
        fixed, cells = self.cells(arguments)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        searches = [WindowSearch(self.ladder(cell)) for cell in cells]
        first_jobs = [self.job(fixed, cell, s.ladder.high) for cell, s in zip(cells, searches)]
        self.validate_batch_is_legal(first_jobs)  # one job per cell: later jobs differ in lr only
        if self.config.get("plan"):
            self.show_plans(first_jobs, cells)
            return []
        probes = self.sharpness_cells(cells)
        returns, runs = self.search_rounds(fixed, cells, searches, probes)
        wall = time.perf_counter() - t0
        summary = self.summary(arguments, cells, searches, probes, runs, len(returns), wall)
        (sweep_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=1, default=str) + "\n")
        print(f"lr_window: {summary['runs']} runs ({len(probes)} of them measuring sigma_1(H)) in {len(returns)} "
              f"rounds, {wall / 60:.1f} min wall; {sweep_dir / SUMMARY_NAME}", flush=True)
        return returns

    def search_rounds(self, fixed, cells, searches, probes) -> tuple[list, dict]:
        """Round after round, every cell's pending runs as one launch (the σ₁(H) runs join the first);
        returns the launches' results and {"probes": [record], "cells": {cell index: first record},
        "seconds": run time summed over the records}."""
        probe_jobs = [[*fixed, *_overrides(cell), *self.sharpness] for cell in probes]
        returns, runs = [], {"probes": [], "cells": {}, "seconds": 0.0}
        while batch := [(i, lr) for i, s in enumerate(searches) for lr in s.pending()]:
            log.info("lr_window round %d: %d runs over %d cells", len(returns) + 1, len(batch), len({i for i, _ in batch}))
            results = self.launch(probe_jobs + [self.job(fixed, cells[i], lr) for i, lr in batch])
            returns.append(results)
            for ret in results[:len(probe_jobs)]:
                runs["probes"].append(job_record(ret))
                runs["seconds"] += _seconds(runs["probes"][-1])
            for (i, lr), ret in zip(batch, results[len(probe_jobs):]):
                record = job_record(ret)
                searches[i].record(lr, record["attack"]["outcome"])
                runs["cells"].setdefault(i, record)
                runs["seconds"] += _seconds(record)
            probe_jobs = []
        return returns, runs

    def show_plans(self, jobs: list[list[str]], cells: list[dict[str, str]]) -> None:
        """plan=true: each cell's memory plan, printed here and launched nowhere (at scale=paper each would
        be a SLURM job); cells with the same plan share one print. α does not change it, the optimizer
        and undo do."""
        from hydra.core.hydra_config import HydraConfig
        from harness.errors import ConfigError
        from runner import memory_plan  # lazy: torch, only for plans
        from runner.validate import validate
        plans: dict[str, list[str]] = {}
        for job, cell in zip(jobs, cells):
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, job)
            HydraConfig.instance().set_config(cfg)  # the ranks the launcher asks for, as the job would see them
            try:
                validate(cfg)
                text = memory_plan.plan(cfg).report()
            except ConfigError as e:
                text = f"error: {e}"
            plans.setdefault(text, []).append(" ".join(_overrides(cell)))
        for text, names in plans.items():
            print(f"{len(names)} cell(s): {'; '.join(names)}\n{text}\n", flush=True)

    def job(self, fixed: list[str], cell: dict[str, str], lr: float) -> list[str]:
        return [*fixed, *_overrides(cell), f"{self.lr_key}={lr!r}"]

    def launch(self, jobs: list[list[str]]) -> list[JobReturn]:
        """Every job of the list, in launcher batches of max_batch_size; a failed job stops the sweep
        after its batch ends (a rerun resumes from the records: resume=true)."""
        size = self.max_batch_size or len(jobs)
        results: list[JobReturn] = []
        for start in range(0, len(jobs), size):
            chunk = jobs[start:start + size]
            results += list(self.launcher.launch(chunk, initial_job_idx=self.job_idx))
            self.job_idx += len(chunk)
        for ret in results:
            _ = ret.return_value  # re-raises the job's exception, as Hydra's basic sweeper does
        return results

    def summary(self, arguments, cells, searches, probes, runs, rounds, wall) -> dict:
        return {
            "scale": self.scale, "arguments": list(arguments), "search": self.search,
            "runs": sum(len(s.outcomes) for s in searches) + len(probes), "rounds": rounds,
            "wall_seconds": round(wall, 1), "compute_seconds": round(runs["seconds"], 1),
            "cells": [{"overrides": cell, "ladder": [s.ladder.low, s.ladder.high], **labels(runs["cells"].get(i)),
                       "window": s.window().to_dict()}
                      for i, (cell, s) in enumerate(zip(cells, searches))],
            "sharpness": [{"overrides": cell, **labels(record), "sigma1_H": sigma1(record)}
                          for cell, record in zip(probes, runs["probes"])],
        }


def job_record(ret: JobReturn) -> dict:
    """The complete record the job wrote into its own folder."""
    path = Path(ret.hydra_cfg.hydra.runtime.output_dir) / RECORD_NAME
    record = read_record(path)
    if record is None:
        raise RuntimeError(f"job {ret.overrides}: no complete record at {path}")
    return record


def labels(record: dict | None) -> dict:
    """What the report groups by, read from a run's record: α, optimizer, undo, the step budget, the base."""
    if record is None:
        return {"alpha": None, "optimizer": None, "undo": None, "budget": None, "base": None}
    config = record["config"]
    return {"alpha": float(config["defense"].get("alpha", 1.0)), "optimizer": record["attack"]["name"],
            "undo": config["attack"].get("undo"), "budget": config["attack"].get("steps"),
            "base": config["defense"].get("base")}


def sigma1(record: dict) -> float | None:
    """σ₁(H) at the start of the attack: the first evaluated point's λ_max (attack.sharpness_every)."""
    first = record["attack"]["trajectory"][0]
    return first.get("lambda_max")


def _seconds(record: dict) -> float:
    """The run's own time by stage (a record resumed from the store carries its first run's)."""
    return float(sum(record.get("timings", {}).values()))


def _values(override) -> list[str]:
    """The values of a parsed override as strings (one for a plain override, several for a sweep)."""
    if override.is_sweep_override():
        return [str(v) for v in override.sweep_string_iterator()]
    return [override.get_value_element_as_str()]


def _overrides(cell: dict[str, str]) -> list[str]:
    return [f"{k}={v}" for k, v in cell.items()]
