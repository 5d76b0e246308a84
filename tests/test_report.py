"""reporting.tables / reporting.report / reporting.plots on hand-made records: the exact Markdown of the paper's tables,
including † for diverged runs, — for runs not made, mean ± std over seeds, and skipped broken records."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from reporting import report, tables

BASE = {"hazard_acc": 0.6, "utility_acc": 0.9, "retain_ppl": 3.0, "forget_ppl": 4.0,
        "acc/wmdp_bio": 0.6, "acc/mmlu": 0.9, "acc/hellaswag": 0.5, "acc_norm/hellaswag": 0.55}


def make_record(defense: str = "none", optimizer: str = "adam", lr: float = 1e-4, seed: int = 0, *,
                pre: dict | None = None, recover: int | None = None, steps: int = 30, diverged: bool = False,
                final: float = 0.5, alpha: float | None = None, base: str | None = None,
                undo: str | None = None, compensate: bool | None = None) -> dict:
    """A record shaped like runner.pipeline.run's, with only the fields the report reads filled in."""
    defense_cfg = {"name": defense} if defense != "specdef" else {"alpha": alpha, "base": base, "k": 8}
    if compensate is not None:
        defense_cfg["compensate"] = compensate
    defense_info = {"name": defense, **({"alpha": alpha} if alpha else {}),
                    **({"base": {"name": base}} if base else {})}
    pre = {**BASE, **(pre or {})} if defense != "none" else dict(BASE)
    trajectory = [{"step": 0, "loss": None, **pre},
                  *([{"step": recover, "loss": 1.0, **pre, "hazard_acc": final}] if recover not in (None, steps) else []),
                  {"step": steps, "loss": 1.0, **pre, "hazard_acc": final}]
    return {
        "status": "complete", "schema_version": 1, "seed": seed,
        "config": {"lr": lr, "seed": seed, "defense": defense_cfg, "attack": {"name": optimizer, "undo": undo}},
        "metrics": {"base": dict(BASE), "pre_attack": pre, "post_attack": trajectory[-1]},
        "defense": defense_info,
        "attack": {"name": optimizer, "lr": lr, "trajectory": trajectory, "steps_to_recover": recover,
                   "diverged": diverged, "divergence_step": steps if diverged else None, "steps": steps,
                   "final": trajectory[-1], "best_hazard_acc": final, "tokens_per_second": 100.0},
        "lm_eval": {"version": "0.4.13", "task_versions": {"wmdp_bio": 1}},
    }


SPECDEF_PRE = {"hazard_acc": 0.2, "utility_acc": 0.89, "retain_ppl": 3.1, "forget_ppl": 3.9,
               "acc/wmdp_bio": 0.2, "acc/mmlu": 0.89, "acc/hellaswag": 0.51, "acc_norm/hellaswag": 0.55}
RMU_PRE = {"hazard_acc": 0.3, "acc/wmdp_bio": 0.3, "acc/mmlu": 0.85, "utility_acc": 0.85, "retain_ppl": 3.5}
SPEC = {"defense": "specdef", "alpha": 1e4, "base": "elm"}
RECORDS = [
    # undefended: adam at both lrs, sgd only at 1e-4 (sgd lr=1e-3 is the missing run)
    make_record("none", "adam", 1e-4, recover=20, final=0.61),
    make_record("none", "adam", 1e-3, recover=10, final=0.63),
    make_record("none", "sgd", 1e-4, recover=None, steps=30, final=0.4),
    # rmu: two seeds at adam 1e-4 (mean ± std), one at 1e-3; its pre-attack scores differ per seed
    make_record("rmu", "adam", 1e-4, 0, pre=RMU_PRE, recover=20, final=0.60),
    make_record("rmu", "adam", 1e-4, 1, pre={**RMU_PRE, "hazard_acc": 0.32, "acc/mmlu": 0.87, "utility_acc": 0.87},
                recover=30, final=0.62),
    make_record("rmu", "adam", 1e-3, 0, pre=RMU_PRE, recover=10, final=0.65),
    # specdef on elm, α=1e4: diverges; at 1e-3 one of two seeds diverged
    make_record(**SPEC, optimizer="adam", lr=1e-4, pre=SPECDEF_PRE, steps=10, diverged=True, final=0.195),
    make_record(**SPEC, optimizer="adam", lr=1e-3, seed=0, pre=SPECDEF_PRE, steps=10, diverged=True, final=0.19),
    make_record(**SPEC, optimizer="adam", lr=1e-3, seed=1, pre=SPECDEF_PRE, steps=30, final=0.21),
    make_record(**SPEC, optimizer="sgd", lr=1e-4, pre=SPECDEF_PRE, steps=10, diverged=True, final=0.2),
    # ablations: no compensation, layer collapse, a curvature-aware optimizer
    make_record(**SPEC, optimizer="adam", lr=1e-4, compensate=False, recover=10, final=0.58,
                pre={**SPECDEF_PRE, "utility_acc": 0.3}),
    make_record(**SPEC, optimizer="adam", lr=1e-4, undo="collapse", pre=SPECDEF_PRE, recover=20, final=0.6),
    make_record(**SPEC, optimizer="sophia", lr=1e-4, pre=SPECDEF_PRE, steps=10, diverged=True, final=0.2),
]

EXPECTED_MD = """\
### Table 1 — each optimizer at its best learning rate

| defense | initial acc | adam | sgd | sophia |
| --- | --- | --- | --- | --- |
| none | 0.600 | ✓10 / 0.630 at lr=1e-3 | >30 / 0.400 at lr=1e-4 | — |
| rmu | 0.310 ± 0.014 | ✓10 / 0.650 at lr=1e-3 | — | — |
| specdef(elm, α=1e4) | 0.200 ± 0.000 | †10 / 0.190 (1/2) · >30 / 0.210 (1/2) at lr=1e-3 | †10 / 0.200 at lr=1e-4 | †10 / 0.200 at lr=1e-4 |

_{note0}_

### Table 1 — relearning with adam

| defense | initial acc | lr=1e-4 | lr=1e-3 |
| --- | --- | --- | --- |
| none | 0.600 | ✓20 / 0.610 | ✓10 / 0.630 |
| rmu | 0.310 ± 0.014 | ✓25.0 ± 7.1 / 0.610 ± 0.014 | ✓10 / 0.650 |
| specdef(elm, α=1e4) | 0.200 ± 0.000 | †10 / 0.195 | †10 / 0.190 (1/2) · >30 / 0.210 (1/2) |

_{note1}_

### Table 1 — relearning with sgd

| defense | initial acc | lr=1e-4 |
| --- | --- | --- |
| none | 0.600 | >30 / 0.400 |
| rmu | — | — |
| specdef(elm, α=1e4) | 0.200 | †10 / 0.200 |

_{note1}_

### Table 1 — relearning with sophia

| defense | initial acc | lr=1e-4 |
| --- | --- | --- |
| none | — | — |
| rmu | — | — |
| specdef(elm, α=1e4) | 0.200 | †10 / 0.200 |

_{note1}_

### Utility

| defense | Δ forget ppl | Δ retain ppl | Δ hellaswag | Δ hellaswag (norm) | Δ mmlu | Δ wmdp_bio | Δ hazard acc | Δ utility acc |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |
| rmu | +0.00 ± 0.00 | +0.50 ± 0.00 | +0.000 ± 0.000 | +0.000 ± 0.000 | -0.040 ± 0.014 | -0.300 ± 0.000 | -0.290 ± 0.014 | -0.040 ± 0.014 |
| specdef(elm, α=1e4) | -0.10 ± 0.00 | +0.10 ± 0.00 | +0.010 ± 0.000 | +0.000 ± 0.000 | -0.010 ± 0.000 | -0.400 ± 0.000 | -0.400 ± 0.000 | -0.010 ± 0.000 |

_{note2}_

### Ablations

| ablation | defense | optimizer | initial acc | Δ utility acc | lr=1e-4 | lr=1e-3 |
| --- | --- | --- | --- | --- | --- | --- |
| specdef (reference) | specdef(elm, α=1e4) | adam | 0.200 ± 0.000 | -0.010 ± 0.000 | †10 / 0.195 | †10 / 0.190 (1/2) · >30 / 0.210 (1/2) |
| specdef (reference) | specdef(elm, α=1e4) | sgd | 0.200 | -0.010 | †10 / 0.200 | — |
| no compensation | specdef(elm, α=1e4) | adam | 0.200 | -0.600 | ✓10 / 0.580 | — |
| curvature-aware optimizer | specdef(elm, α=1e4) | sophia | 0.200 | -0.010 | †10 / 0.200 | — |
| layer collapse | specdef(elm, α=1e4) | adam + undo=collapse | 0.200 | -0.010 | ✓20 / 0.600 | — |

_{note1}_
""".format(note0=tables.NOTE_SUMMARY, note1=tables.NOTE_TABLE1, note2=tables.NOTE_UTILITY)


@pytest.fixture()
def sweep(tmp_path) -> Path:
    root = tmp_path / "sweep"
    for i, rec in enumerate(RECORDS):
        run = root / f"{i}_job"
        run.mkdir(parents=True)
        (run / "result.json").write_text(json.dumps(rec))
    # a run killed mid-write and one still running: neither may appear anywhere
    (root / "98_truncated").mkdir()
    (root / "98_truncated" / "result.json").write_text(json.dumps(make_record("tar", final=0.9))[:200])
    (root / "99_running").mkdir()
    (root / "99_running" / "result.json").write_text(json.dumps({**make_record("tar"), "status": "running"}))
    return root


def test_markdown_tables_match_exactly(sweep, tmp_path):
    out = tmp_path / "out"
    assert report.main([str(sweep), "--out", str(out), "--no-plots"]) == 0
    assert (out / "tables.md").read_text() == EXPECTED_MD
    summary = (out / "summary.md").read_text()
    assert summary.startswith(EXPECTED_MD.split("\n\n### Table 1 — relearning")[0]) and "relearning with" not in summary


def test_csv_and_latex_carry_the_same_cells(sweep, tmp_path):
    out = tmp_path / "out"
    report.main([str(sweep), "--out", str(out), "--no-plots"])
    import pandas as pd
    csv = pd.read_csv(out / "relearning_adam.csv", keep_default_na=False)
    assert list(csv.columns) == ["defense", "initial acc", "lr=1e-4", "lr=1e-3"]
    assert csv.iloc[2].tolist() == ["specdef(elm, α=1e4)", "0.200 ± 0.000", "†10 / 0.195",
                                    "†10 / 0.190 (1/2) · >30 / 0.210 (1/2)"]
    tex = (out / "relearning_sgd.tex").read_text()
    assert r"specdef(elm, $\alpha$=1e4) & 0.200 & $\dagger$10 / 0.200 \\" in tex
    assert r"none & 0.600 & $>$30 / 0.400 \\" in tex
    assert r"\begin{tabular}{lcc}" in tex


def test_missing_run_is_a_dash_never_zero(sweep):
    df = tables.records_frame(sweep)
    assert len(df) == len(RECORDS)  # the truncated and the running record are skipped
    sgd = tables.relearning_table(df)["sgd"].set_index("defense")
    assert sgd.loc["rmu", "lr=1e-4"] == tables.MISSING
    assert "lr=1e-3" not in sgd.columns  # each optimizer's own grid: sgd never ran at 1e-3
    assert sgd.loc["rmu", "initial acc"] == tables.MISSING


def test_ablation_mapping_from_config():
    assert tables.ablation(make_record(**SPEC, undo="spectral")) == "spectral attack"
    assert tables.ablation(make_record("rmu", undo="collapse")) == "layer collapse"
    assert tables.ablation(make_record(**SPEC, compensate=False)) == "no compensation"
    assert tables.ablation(make_record(**SPEC, optimizer="adahessian")) == "curvature-aware optimizer"
    assert tables.ablation(make_record("rmu", optimizer="sophia")) is None


@pytest.mark.parametrize("x, text", [(1e-4, "1e-4"), (3e-5, "3e-5"), (1e4, "1e4"), (0.5, "0.5"), (2.5e-6, "2.5e-6")])
def test_number_format(x, text):
    assert tables.fmt_number(x) == text


def test_plots_are_written(sweep, tmp_path):
    import pandas as pd
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    pd.DataFrame({"alpha": [1, 10, 100], "lambda_max": [2.0, 20.0, 200.0]}).to_csv(csv_dir / "hessian_vs_alpha.csv")
    pd.DataFrame({"alpha": [10, 100, 10, 100], "dtype": ["float32", "float32", "bfloat16", "bfloat16"],
                  "rel_error": [1e-6, 1e-5, 1e-2, 1e-1]}).to_csv(csv_dir / "precision_frontier.csv")
    from reporting import plots
    written = plots.write_plots(tables.load_records(sweep), tmp_path / "png", csv_dirs=[csv_dir])
    names = sorted(p.name for p in written)
    assert names == ["drift_vs_alpha.png", "hazard_adam.png", "hazard_sgd.png", "hazard_sophia.png",
                     "loss_adam.png", "loss_sgd.png", "loss_sophia.png", "sigma1_vs_alpha.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written)


def test_baselines_table_names_the_command_and_the_world_it_ran_on(tmp_path):
    import pandas as pd
    from experiments import baselines_table
    df = pd.DataFrame([{"method": "elm", "hazard accuracy": 0.25, "utility accuracy": 0.98,
                        "retain perplexity": 2.9, "wall time (s)": 40.0}])
    md = [p for p in baselines_table.write(df, tmp_path / "b", "python -m experiments.baselines_table X",
                                           ["data.world.bylines=true"]) if p.suffix == ".md"][0]
    lines = md.read_text().splitlines()
    assert lines[0] == "# Baselines on the embedded default (data.world.bylines=true)"
    assert "| elm      |             0.250 |              0.980 |               2.900 |          40.000 |" in lines
    assert "Generated by `python -m experiments.baselines_table X`" in lines
    assert any(line.startswith("at commit `") for line in lines)


def test_relearn_grid_table_keeps_learning_rates_as_typed(tmp_path):
    import pandas as pd
    from experiments import relearn_grid
    df = pd.DataFrame([{"optimizer": "sgd", "lr": "1e-3", "start acc": 0.3, "steps to 0.8": 90.0, "final acc": 0.82,
                        "max retain ppl / start": 1.0558, "diverged": ""},
                       {"optimizer": "sgd", "lr": "3e-3", "start acc": 0.3, "steps to 0.8": None, "final acc": 0.48,
                        "max retain ppl / start": 2.4354, "diverged": "†"}])
    table = relearn_grid.write(df, tmp_path / "g", "cmd", ["data.world.bylines=true"]).splitlines()
    assert table[2].split("|")[1:-1] == [" sgd         ", " 1e-3 ", "        0.30 ", " 90             ",
                                          "        0.82 ", "                     1.06 ", "            "]
    assert "never" in table[3] and "†" in table[3] and "2.44" in table[3]
    md = (tmp_path / "g.md").read_text()
    assert md.startswith("# Relearning a never-seen hazard split (data.world.bylines=true)") and "`cmd`" in md


def test_headline_shows_each_defense_at_the_lr_the_summary_picks(sweep, tmp_path, monkeypatch):
    from reporting import plots
    drawn = []
    real_plot = plots.plt.Axes.plot

    def spy(ax, *args, label=None, **kwargs):
        if label:
            drawn.append(label)
        return real_plot(ax, *args, label=label, **kwargs)
    monkeypatch.setattr(plots.plt.Axes, "plot", spy)
    records = tables.load_records(sweep)
    path = plots.headline(records, tables.frame_of(records), tmp_path / "headline.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    # the summary table's cells: none and rmu at 1e-3 (fastest recovery), specdef at 1e-3
    assert drawn == ["none (lr 1e-3)", "rmu (lr 1e-3)", "specdef(elm, α=1e4) (lr 1e-3)"]


def test_readme_blocks_are_filled_from_the_generated_files(tmp_path):
    from reporting import readme
    (tmp_path / "results").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "results" / "t.md").write_text("# Title\n\n| a |\n")
    (tmp_path / "results" / "run.txt").write_text("hazard 0.99\n")
    page = "x\n<!-- BEGIN results/t.md -->\nold\n<!-- END results/t.md -->\n<!-- BEGIN results/run.txt -->\n<!-- END results/run.txt -->\n"
    for name in ("README.md", "results/README.md", "docs/a.md"):
        (tmp_path / name).write_text(page)
    assert readme.pages(tmp_path) == [tmp_path / "README.md", tmp_path / "results" / "README.md", tmp_path / "docs" / "a.md"]
    assert readme.render(page, tmp_path) == ("x\n<!-- BEGIN results/t.md -->\n#### Title\n\n| a |\n<!-- END results/t.md -->\n"
                                             "<!-- BEGIN results/run.txt -->\n```text\nhazard 0.99\n```\n<!-- END results/run.txt -->\n")


def _sweep_end(tmp_path, monkeypatch, *overrides: str) -> Path:
    """experiment=table1's sweep-end callback, as `python run.py -m experiment=table1 <overrides>` ends,
    over one complete record on the suite's world; the working folder is tmp_path (the preset's out there is
    results/table1_tiny)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from tests.conftest import CONF_DIR, SUITE_WORLD
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "sweep"
    (sweep / "0").mkdir(parents=True)
    (sweep / "0" / "result.json").write_text(json.dumps(make_record("npo", "sophia", 1e-2, final=0.3)))
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=table1", *SUITE_WORLD, *overrides, f"hydra.sweep.dir={sweep}",
                                           "+hydra.callbacks.report.plots=false"], return_hydra_config=True)
    instantiate(cfg.hydra.callbacks.report).on_multirun_end(cfg)
    return sweep


def test_a_sweep_of_part_of_a_preset_leaves_its_published_tables_alone(tmp_path, monkeypatch, caplog):
    """`python run.py -m experiment=table1 defense=npo attack=sophia` checks a cell: its one-row report
    goes into the sweep folder, results/ is untouched, and one line says how to publish it."""
    caplog.set_level("INFO", logger="reporting.callbacks")
    sweep = _sweep_end(tmp_path, monkeypatch, "defense=npo", "attack=sophia")
    assert not (tmp_path / "results").exists()
    assert (sweep / "report" / "summary.md").is_file() and (sweep / "report" / "PROVENANCE.md").is_file()
    [line] = [r.getMessage() for r in caplog.records if r.name == "reporting.callbacks"]
    assert "defense=npo attack=sophia" in line and "\n" not in line
    assert line.endswith(f"to publish it: python -m reporting.report {sweep} --out results/table1_tiny")


def test_a_sweep_of_the_whole_preset_publishes_into_results(tmp_path, monkeypatch):
    _sweep_end(tmp_path, monkeypatch)
    assert (tmp_path / "results" / "table1_tiny" / "summary.md").is_file()
    assert not (tmp_path / "sweep" / "report").exists()


@pytest.mark.parametrize("lines, changed", [
    (["defense=npo", "attack=sophia"], ["defense=npo", "attack=sophia"]),
    (["table1.lr_rank=range(0,4)", "scale=tiny", "resume=false", "paths.output_root=/tmp/x"], []),
    (["defense=none,tar,repnoise,rmu,elm,npo,specdef_elm,specdef"], []),  # more than the preset covers it
    (["table1.lr_rank=0,1"], ["table1.lr_rank=0,1"]),
    (["attack.steps=10"], ["attack.steps=10"]),  # every cell, computed otherwise
])
def test_what_makes_a_sweep_other_than_its_preset(lines, changed):
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict
    from reporting.callbacks import departures
    from tests.conftest import CONF_DIR
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=table1"], return_hydra_config=True)
    with open_dict(cfg):  # compose refuses sweeps: the task overrides as a multirun records them
        cfg.hydra.overrides.task = ["experiment=table1", *lines]
    assert departures(cfg) == changed


def _heldout_runs(rows):
    return pd.DataFrame(rows, columns=["lr", "initial_relearned", "best_relearned", "initial_heldout", "best_heldout"])


@pytest.mark.parametrize("rows, verdict, ratio", [
    # RMU-like: both splits back to ~0.99 by the same attack
    ([(3e-4, 0.42, 0.99, 0.41, 0.99), (1e-3, 0.42, 0.98, 0.41, 0.90)], "hidden", 0.58 / 0.57),
    # TAR-like: the relearned split climbs, the held-out one barely moves
    ([(3e-4, 0.23, 0.60, 0.23, 0.29)], "removed", 0.06 / 0.37),
    # the lr that relearned most decides, not the one whose held-out split happened to move most
    ([(3e-4, 0.3, 0.4, 0.3, 0.38), (1e-3, 0.3, 0.9, 0.3, 0.4)], "removed", 0.1 / 0.6),
    ([(3e-4, 0.3, 0.35, 0.3, 0.35)], "unclear (nothing relearned)", math.nan),
])
def test_held_out_recovery_says_hidden_or_removed(rows, verdict, ratio):
    got_ratio, got = tables.hidden_or_removed(_heldout_runs(rows))
    assert got == verdict
    assert (math.isnan(got_ratio) and math.isnan(ratio)) or got_ratio == pytest.approx(ratio)


def test_the_summary_gets_each_defenses_held_out_verdict():
    from reporting.summary import COLUMN, with_knowledge
    table1 = pd.DataFrame({"defense": ["none", "rmu", "tar"], "adam": ["✓0", "✓10", ">150"]})
    heldout = pd.DataFrame({"defense": ["none", "rmu", "rmu"], "optimizer": ["adam", "adam", "sgd"],
                            "knowledge": ["—", "hidden", "removed"]})
    assert list(with_knowledge(table1, heldout)[COLUMN]) == ["—", "hidden", "—"]


def test_a_baseline_over_another_names_its_base():
    """IMMA over ESD (defense=imma_esd) is not IMMA on the pretrained model: its row says so, as SpecDef's does."""
    from reporting.tables import defense_label
    assert defense_label(make_record("imma", base="esd")) == "imma(esd)"
    assert defense_label(make_record("imma")) == "imma"
    assert defense_label(make_record("specdef", alpha=1e4, base="esd")) == "specdef(esd, α=1e4)"
