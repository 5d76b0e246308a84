"""experiment=lr_window: the window search on synthetic outcomes, the preset at both scales (compose only),
and one small sweep through `run.py -m` that ends in a report."""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from runner.lr_window import DIVERGED, NOT_RECOVERED, RECOVERED, Ladder, find_window
from tests.conftest import CONF_DIR, SUITE_WORLD, TEST_OVERRIDES

REPO = Path(__file__).resolve().parents[1]


def synthetic(eta_star: float, eta_min: float | None, steps_at_min: int = 100):
    """† above eta_star; recovered from eta_min up (faster at larger lr); not recovered below."""
    def outcome(lr: float) -> dict:
        if lr > eta_star:
            return {"kind": DIVERGED, "step": 10, "hazard_acc": 0.3}
        if eta_min is not None and lr >= eta_min:
            return {"kind": RECOVERED, "step": max(10, int(steps_at_min * eta_min / lr)), "hazard_acc": 0.92}
        return {"kind": NOT_RECOVERED, "step": 100, "hazard_acc": 0.5}
    return outcome


def within(bracket_low: float, bracket_high: float, edge: float, resolution: float) -> bool:
    return bracket_low <= edge < bracket_high and math.log10(bracket_high / bracket_low) <= resolution + 1e-9


LADDER = Ladder(1e-6, 1e2, points_per_decade=1, resolution=0.25, extend=2, max_extension=6, points_per_round=2)


def test_diverges_above_eta_star_pins_eta_max_within_the_resolution():
    w = find_window(synthetic(eta_star=3.7e-3, eta_min=None), LADDER)
    assert within(w.eta_max, w.eta_max_above, 3.7e-3, 0.25) and not w.eta_max_censored
    assert w.empty and w.eta_min is None and w.decades is None and w.best_lr is None
    assert w.inversions == []
    # every run above η_max was †, every run at or below it was not
    assert all((p["kind"] == DIVERGED) == (p["lr"] > w.eta_max) for p in w.probes)


def test_recovers_above_eta_min_pins_both_edges_and_the_best_lr():
    w = find_window(synthetic(eta_star=2e-2, eta_min=4e-4), LADDER)
    assert within(w.eta_max, w.eta_max_above, 2e-2, 0.25)
    assert within(w.eta_min_below, w.eta_min, 4e-4, 0.25) and not w.eta_min_censored
    assert not w.empty and w.decades == pytest.approx(math.log10(w.eta_max / w.eta_min))
    fastest = min(p["step"] for p in w.probes if p["kind"] == RECOVERED)
    # the attacker-best lr: fewest steps; among equals (same accuracy), the smallest lr
    assert w.best_steps == fastest
    assert w.best_lr == min(p["lr"] for p in w.probes if p["kind"] == RECOVERED and p["step"] == fastest)
    assert len(w.probes) <= 16


def test_an_empty_window_when_the_stable_edge_falls_below_the_recovery_edge():
    w = find_window(synthetic(eta_star=1e-4, eta_min=3e-3), LADDER)
    assert w.empty and w.eta_min is None
    assert within(w.eta_max, w.eta_max_above, 1e-4, 0.25)
    assert {p["kind"] for p in w.probes} == {DIVERGED, NOT_RECOVERED}


def test_edges_beyond_the_ladder_move_the_range_then_are_censored():
    # † far below the ladder: found by extension, within max_extension
    w = find_window(synthetic(eta_star=5e-11, eta_min=None), LADDER)
    assert within(w.eta_max, w.eta_max_above, 5e-11, 0.25) and w.eta_max < LADDER.low
    # † below the floor: every run †, η_max unknown below the floor
    w = find_window(synthetic(eta_star=1e-14, eta_min=None), LADDER)
    assert w.eta_max is None and w.eta_max_censored and min(p["lr"] for p in w.probes) == LADDER.floor
    # never †: η_max is the ceiling, censored; recovering everywhere: η_min is the floor, censored
    w = find_window(synthetic(eta_star=math.inf, eta_min=0.0), LADDER)
    assert w.eta_max == LADDER.ceiling and w.eta_max_censored and w.eta_max_above is None
    assert w.eta_min == LADDER.floor and w.eta_min_censored and w.eta_min_below is None


def test_the_whole_ladder_runs_in_the_first_round_without_points_per_round():
    seen: list[float] = []
    ladder = Ladder(1e-4, 1e0, points_per_decade=2, resolution=0.5, points_per_round=None)

    def outcome(lr):
        seen.append(lr)
        return synthetic(eta_star=2e-2, eta_min=4e-4)(lr)
    find_window(outcome, ladder)
    assert seen[:9] == ladder.points() and len(ladder.points()) == 9


def test_the_descent_stops_at_runs_that_neither_recover_nor_diverge():
    """Top down, a run below the window ends the descent: the ladder below it is never run."""
    w = find_window(synthetic(eta_star=2e-2, eta_min=4e-4), LADDER)
    assert min(p["lr"] for p in w.probes) >= 1e-5  # the ladder reaches 1e-6


def test_patience_keeps_a_lone_damaged_run_under_the_edge_from_hiding_the_window():
    """Just under the † edge the model may break without †: a run that does not recover above a window."""
    base = synthetic(eta_star=2e-2, eta_min=1.3e-4)

    def damaged_band(lr):
        return {"kind": NOT_RECOVERED, "step": 100, "hazard_acc": 0.6} if 5e-3 < lr <= 2e-2 else base(lr)
    one_by_one = {**LADDER.__dict__, "points_per_round": 1}
    found = find_window(damaged_band, Ladder(**one_by_one))  # patience 2 (the default)
    assert not found.empty and within(found.eta_min_below, found.eta_min, 1.3e-4, 0.25)
    assert not any("between recovered runs" in s for s in found.inversions)  # no recovery above: no inversion
    missed = find_window(damaged_band, Ladder(**{**one_by_one, "patience": 1}))
    assert missed.empty  # documented: patience 1 trusts the first such run


def test_non_monotone_runs_keep_the_literal_definitions_and_are_named():
    """A † island below the edge and a failed recovery inside the window: η_max is still the largest run
    that is not †, η_min the smallest that recovered, and the inversions say which runs break the order."""
    base = synthetic(eta_star=2e-2, eta_min=4e-6)
    odd = {1e-3: DIVERGED, 1e-4: NOT_RECOVERED}

    def bumpy(lr):
        return {"kind": odd[lr], "step": 100, "hazard_acc": 0.5} if lr in odd else base(lr)
    w = find_window(bumpy, Ladder(1e-6, 1e2, points_per_decade=1, resolution=0.25, points_per_round=None))
    assert within(w.eta_max, w.eta_max_above, 2e-2, 0.25)
    assert within(w.eta_min_below, w.eta_min, 4e-6, 0.25)
    assert w.inversions == ["† at lr=0.001 below lr=0.01778, not †", "not_recovered at lr=0.0001 between recovered runs"]
    # an island on the only ladder point under the edge hides the edge: the literal η_max is below it
    hidden = find_window(lambda lr: DIVERGED if lr == 1e-2 else base(lr)["kind"], LADDER)
    assert hidden.eta_max < 1e-2 < 2e-2 and hidden.inversions == []


@pytest.mark.parametrize("seed", range(20))
def test_noisy_outcomes_end_with_well_formed_brackets(seed):
    """Outcomes flipped at random (each lr fixed once, as a run with a fixed seed is): the search ends
    within a bounded number of runs, and the edges are the literal ones of the runs made."""
    rng, base, flips = random.Random(seed), synthetic(eta_star=3e-2, eta_min=1e-3), {}

    def noisy(lr):
        if lr not in flips:
            flips[lr] = rng.choice([DIVERGED, RECOVERED, NOT_RECOVERED]) if rng.random() < 0.3 else base(lr)["kind"]
        return {"kind": flips[lr], "step": 20, "hazard_acc": 0.9}
    w = find_window(noisy, LADDER)
    assert len(w.probes) <= 40
    stable = [p["lr"] for p in w.probes if p["kind"] != DIVERGED]
    recovered = [p["lr"] for p in w.probes if p["kind"] == RECOVERED]
    assert w.eta_max == (max(stable) if stable else None)
    assert w.eta_min == (min(recovered) if recovered else None)
    assert w.empty == (not recovered)


def test_a_bad_ladder_or_outcome_is_refused():
    with pytest.raises(ValueError, match="0 < low < high"):
        Ladder(1e-2, 1e-3)
    with pytest.raises(ValueError, match="outcome kind 'exploded'"):
        find_window(lambda lr: "exploded", LADDER)


# The preset: compose only

def preset(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=["experiment=lr_window", *TEST_OVERRIDES, *overrides],
                       return_hydra_config=True)


def sweeper_of(cfg):
    from runner.lr_window_sweeper import LrWindowSweeper
    node = OmegaConf.to_container(cfg.hydra.sweeper, resolve=True)
    node.pop("_target_")
    return LrWindowSweeper(**node)


def job_configs(sweeper, fixed, cells):
    """The config of each cell's first job, as the launcher composes it."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return [compose("config", overrides=[*TEST_OVERRIDES, *sweeper.job(fixed, cell, sweeper.ladder(cell).high)])
                for cell in cells]


def covering(cells):
    """A few cells in which every value of every axis appears."""
    chosen, seen = [], set()
    for cell in cells:
        if not set(cell.items()) <= seen:
            chosen.append(cell)
            seen |= set(cell.items())
    return chosen


def test_the_preset_composes_at_tiny_scale_and_its_jobs_validate():
    from runner.validate import validate
    sweeper = sweeper_of(preset())
    fixed, cells = sweeper.cells(["experiment=lr_window"])
    assert len(cells) == 6 * 6 + 3 * 6
    assert {c["attack"] for c in cells} == {"sgd", "adam", "sophia", "muon", "adahessian", "lion"}
    assert fixed == ["experiment=lr_window"]
    for cfg in job_configs(sweeper, fixed, covering(cells)):
        validate(cfg)
        assert cfg.defense._target_ == "specdef.defense.SpecDef" and cfg.defense.base == "rmu"
        assert cfg.attack.stop_when_recovered and cfg.threads == 1 and cfg.attack.steps == 100
    probes = sweeper.sharpness_cells(cells)
    assert len(probes) == 6 + 3
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        probe = compose("config", overrides=[*fixed, *[f"{k}={v}" for k, v in probes[-1].items()], *sweeper.sharpness])
    validate(probe)
    assert probe.attack.steps == 0 and probe.attack.sharpness_every == probe.attack.eval_every


def test_the_preset_composes_at_paper_scale_and_every_job_fits_its_memory_plan():
    from runner import memory_plan
    from runner.validate import validate
    cfg = preset("scale=paper")
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    sweeper = sweeper_of(cfg)
    fixed, cells = sweeper.cells(["experiment=lr_window", "scale=paper"])
    assert len(cells) == 5 * 4 + 2 * 4 and sweeper.sharpness is None
    ranks = cfg.hydra.launcher.tasks_per_node  # what each SLURM job gets (conf/hydra/launcher/slurm_paper.yaml)
    for job in job_configs(sweeper, fixed, covering(cells)):
        validate(job)
        assert job.attack.steps == 510 and job.model.name != "tiny"
        assert memory_plan.plan(job, ranks=ranks).fits, f"{job.attack.name} alpha={job.defense.alpha}"


def test_the_command_line_picks_cells_and_the_lr_is_the_sweepers():
    sweeper = sweeper_of(preset())
    fixed, cells = sweeper.cells(["experiment=lr_window", "defense.alpha=1e3", "attack=sgd,adam", "attack.undo=null",
                                  "attack.steps=20", "seed=0,1"])
    assert fixed == ["experiment=lr_window", "attack.steps=20"]
    assert len(cells) == 2 * 2 and {c["attack"] for c in cells} == {"sgd", "adam"} and {c["seed"] for c in cells} == {"0", "1"}
    with pytest.raises(ValueError, match="the learning rate is what this sweeper searches"):
        sweeper.cells(["experiment=lr_window", "lr=1e-3"])


@pytest.mark.parametrize("overrides, changed", [
    ([], []),
    (["scale=paper", "paths.output_root=/x", "resume=false"], []),
    (["attack=sgd,adam,sophia,muon,adahessian,lion"], []),     # the whole axis, spelled out
    (["attack=sgd"], ["attack=sgd"]),                         # one optimizer
    (["attack.undo=null"], ["attack.undo=null"]),              # the defended line only
    (["attack.steps=20"], ["attack.steps=20"]),                # a changed setting
])
def test_only_the_whole_preset_writes_results(overrides, changed):
    from reporting.callbacks import departures
    from reporting.lr_window import preset_axes
    from omegaconf import open_dict
    cfg = preset()
    with open_dict(cfg):  # compose refuses sweeps: the task overrides as a multirun records them
        cfg.hydra.overrides.task = ["experiment=lr_window", *overrides]
    assert departures(cfg, preset_axes(cfg)) == changed


# One small sweep, end to end

def test_a_one_cell_sweep_runs_through_run_py_and_reports(tmp_path, tiny_path):
    """SpecDef(rmu, α=1) against SGD, 20 steps, a 3-point ladder: the sweeper launches the runs, reads
    their records, writes lr_window.json, and the sweep-end callback builds the report in the sweep
    folder (a subset: results/ is left alone)."""
    results = REPO / "results" / "lr_window_tiny"
    before = sorted((p.name, p.stat().st_mtime) for p in results.glob("*")) if results.exists() else None
    cmd = [sys.executable, "run.py", "-m", "experiment=lr_window", *SUITE_WORLD, "defense.alpha=1", "attack=sgd", "attack.undo=null",
           "attack.steps=20", f"paths.output_root={tmp_path}", *TEST_OVERRIDES,
           "hydra.sweeper.scales.tiny.ladders.sgd=[1e-3,1e1]", "hydra.sweeper.points_per_decade=0.5",
           "hydra.sweeper.resolution=1", "hydra.sweeper.max_extension=0", "hydra.launcher.n_jobs=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    sweep = tmp_path / "sweeps" / "lr_window_tiny"
    summary = json.loads((sweep / "lr_window.json").read_text())
    [cell] = summary["cells"]
    assert cell["optimizer"] == "sgd" and cell["alpha"] == 1.0 and cell["base"] == "rmu" and cell["budget"] == 20
    probes = cell["window"]["probes"]
    assert {p["lr"] for p in probes} >= {1e-3, 0.1, 10.0} and summary["runs"] == len(probes) + 1
    assert all(p["kind"] in (RECOVERED, DIVERGED, NOT_RECOVERED) for p in probes)
    assert summary["sharpness"][0]["sigma1_H"] > 0
    assert f"lr_window: {summary['runs']} runs" in out.stdout
    report = sweep / "report"
    for name in ("README.md", "lr_window.csv", "runs.csv", "slopes.csv", "lr_window.png", "PROVENANCE.md"):
        assert (report / name).is_file(), name
    assert f"{summary['runs']} runs" in (report / "PROVENANCE.md").read_text()
    after = sorted((p.name, p.stat().st_mtime) for p in results.glob("*")) if results.exists() else None
    assert after == before


# The report, from a synthetic sweep (no runs)

def synthetic_summary(slopes: dict[str, float], alphas=(1, 10, 1e2, 1e3, 1e4, 1e5)) -> dict:
    """lr_window.json as the sweeper writes it, from synthetic outcomes: η* = 1e-2 α^slope, η_min 1e-4."""
    from runner.lr_window import Ladder, find_window
    ladder = Ladder(1e-7, 1e1, points_per_decade=1, resolution=0.25, max_extension=8, points_per_round=2)
    cells, sharp = [], []
    for undo in (None, "collapse"):
        for alpha in alphas:
            for name, slope in slopes.items():
                eta = 1e-2 * (alpha ** slope if undo is None else 1.0)
                w = find_window(synthetic(eta_star=eta, eta_min=1e-4), ladder)
                cells.append({"alpha": float(alpha), "optimizer": name, "undo": undo, "budget": 100, "base": "rmu",
                              "overrides": {}, "ladder": [ladder.low, ladder.high], "window": w.to_dict()})
            sharp.append({"alpha": float(alpha), "undo": undo, "sigma1_H": 400.0 * (alpha ** 2 if undo is None else 1)})
    return {"scale": "tiny", "arguments": ["experiment=lr_window"], "search": {}, "runs": 99, "rounds": 9,
            "wall_seconds": 600.0, "compute_seconds": 1100.0, "cells": cells, "sharpness": sharp}


def test_the_report_fits_the_planted_slopes_and_says_where_sgd_contradicts_the_theorem(tmp_path):
    from reporting.lr_window import slopes_frame, window_frame, write_report
    summary = synthetic_summary({"sgd": -2.0, "adam": -1.0})
    df = window_frame(summary)
    slopes = slopes_frame(df).set_index("what")
    assert slopes.loc["eta_max sgd", "slope"] == pytest.approx(-2.0, abs=0.1)
    assert slopes.loc["eta_max adam", "low"] <= -1.0 <= slopes.loc["eta_max adam", "high"]
    assert slopes.loc["2/sigma1(H)", "slope"] == pytest.approx(-2.0)
    files = write_report(summary, tmp_path / "out", "python run.py -m experiment=lr_window", frontier=1e5)
    assert all(p.is_file() for p in files)
    text = (tmp_path / "out" / "README.md").read_text()
    assert "**sgd: slope -2.00 [" in text and "steeper than the −1 Theorem 3 predicts" in text
    assert "adam: slope -1.00 [" in text and "consistent with −1" in text
    assert "| specdef | 1e5 | sgd | — | " in text and "empty" in text and "float32's frontier" in text
    assert "99 runs" in (tmp_path / "out" / "PROVENANCE.md").read_text()
    # the undone line keeps α = 1's window at every α
    undone = df[df["line"] == "undone (collapse)"]
    assert undone["eta_max"].nunique() == 1 and not undone["empty"].any()
