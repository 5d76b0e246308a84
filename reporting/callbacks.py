"""Hydra callback: build the tables and plots when a sweep ends, with the provenance of the build."""
from __future__ import annotations

import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

# Command-line overrides that leave a preset's jobs computing what they compute: which preset and
# scale (they name its `out`), where things are written, how jobs are launched, and whether finished
# jobs are skipped.
NEUTRAL = ("experiment", "scale", "paths", "logger", "resume", "cache_defended", "hydra")


class ReportOnSweepEnd(Callback):
    """`on_multirun_end`: `python -m reporting.report <sweep dir> --out <out>` plus a PROVENANCE.md
    saying which command and commit produced the tables.

    A preset's `out` (results/<experiment>_<scale>) holds its published tables: a sweep that is not the
    preset's whole grid (a cell checked with `defense=npo attack=sophia`, a changed setting) writes its
    report into the sweep folder instead and says in one line how to publish it. An `out` given on the
    command line (hydra.callbacks.report.out=...) is used as it is."""

    def __init__(self, out: str | None = None, plots: bool = True):
        self.out = out
        self.plots = plots

    def destination(self, config: DictConfig) -> tuple[Path, Path, list[str]]:
        """(where the report goes, the preset's published folder, the overrides that keep it from there)."""
        sweep_dir = Path(config.hydra.sweep.dir)
        out = Path(self.out) if self.out else sweep_dir / "report"
        changed = [] if out == sweep_dir / "report" or out_chosen(config) else departures(config)
        return (sweep_dir / "report" if changed else out), out, changed

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from reporting import report
        sweep_dir = Path(config.hydra.sweep.dir)
        out, published, changed = self.destination(config)
        args = [str(sweep_dir), "--out", str(out)] + ([] if self.plots else ["--no-plots"])
        if report.main(args) != 0:
            log.warning("no complete records under %s; no report built", sweep_dir)
            return
        from reporting.provenance import write_provenance
        command = " ".join(["python", "run.py", "-m", *config.hydra.overrides.task])
        n_jobs = config.hydra.launcher.get("n_jobs")
        write_provenance(out, command, threads=config.get("threads"), notes=[
            f"Jobs ran {n_jobs or 'one'} at a time, each with the thread count above.",
            f"Tables rebuilt from the records with `python -m reporting.report {sweep_dir} --out {out}`."])
        if changed:
            log.warning("not the preset's whole grid (%s): report in %s, %s left as it was; to publish it: "
                        "python -m reporting.report %s --out %s", " ".join(changed), out, published, sweep_dir, published)
        else:
            log.info("report of the sweep written to %s", out)


class ReportWithSampleGrids(ReportOnSweepEnd):
    """ReportOnSweepEnd, plus each job's sample grid (the diffusion runner's `samples.png`: the same seeded draws
    from the undefended, the defended and the attacked model) copied to `<out>/grids/<defense>[_<base>]_<attack>_lr<lr>.png`."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        import json
        import shutil
        super().on_multirun_end(config, **kwargs)
        out = self.destination(config)[0]
        for grid in sorted(Path(config.hydra.sweep.dir).glob("*/samples.png")):
            record = grid.with_name("result.json")
            if not record.is_file():
                continue
            r = json.loads(record.read_text())
            defense = r["defense"]["name"] + (f"_{r['defense']['base']['name']}" if r["defense"].get("base") else "")
            name = f"{defense}_{r['attack']['name']}_lr{r['attack']['lr']:g}.png"
            (out / "grids").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(grid, out / "grids" / name)


def departures(config: DictConfig, axes: dict[str, str] | None = None) -> list[str]:
    """The command-line overrides by which this sweep is not its preset's whole grid: one that narrows a
    swept axis (`axes`, {key: comma list}; default `hydra.sweeper.params`), or sets anything else but the
    NEUTRAL keys. Empty: the whole preset."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    parser = OverridesParser.create()
    axes = config.hydra.sweeper.params if axes is None else axes
    grid = dict(_values(parser, f"{key}={value}") for key, value in axes.items())
    changed = []
    for line in config.hydra.overrides.task:
        key, values = _values(parser, line)
        if key in grid:
            if grid[key] is None or values is None or not grid[key] <= values:
                changed.append(line)
        elif key.split(".")[0].split("/")[0] not in NEUTRAL:
            changed.append(line)
    return changed


def _values(parser, line: str) -> tuple[str, set | None]:
    """(key, the values an override sweeps, or its one value); None where they cannot be listed (an interval)."""
    override = parser.parse_override(line)
    try:
        return override.key_or_group, set(override.sweep_iterator() if override.is_sweep_override() else
                                          [override.value()])
    except Exception:  # noqa: BLE001 - values that cannot be listed or compared count as "not covered"
        return override.key_or_group, None


def out_chosen(config: DictConfig) -> bool:
    """Whether the command line named the report's folder (then it is where the user wants it)."""
    return any(line.split("=", 1)[0].lstrip("+~") == "hydra.callbacks.report.out"
               for line in config.hydra.overrides.hydra)
