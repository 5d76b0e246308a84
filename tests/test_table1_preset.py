"""experiment=table1 as one job list: every optimizer runs its own learning-rate grid (the one documented
at the top of conf/attack/<name>.yaml), long enough to recover. Compose only, nothing trained."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from harness.errors import ConfigError
from runner.validate import validate
from tests.conftest import CONF_DIR, compose_cfg, compose_default

OPTIMIZERS = ("sgd", "adam", "sophia", "muon", "adahessian")
# scale=paper runs sharded (dist=paper): second-order optimizers' double backward cannot be (conf/scale/paper.yaml)
PAPER_OPTIMIZERS = ("sgd", "adam", "muon")


def documented_grid(name: str) -> set[float]:
    """The `Tiny-model grid: lr in {...}` line at the top of conf/attack/<name>.yaml."""
    text = (Path(CONF_DIR) / "attack" / f"{name}.yaml").read_text()
    values = re.search(r"Tiny-model grid: lr in \{([^}]*)\}", text).group(1)
    return {float(v) for v in values.split(",")}


def preset_jobs(*overrides: str) -> list[dict[str, str]]:
    """The jobs `python run.py -m experiment=table1 <overrides>` launches, as {key: value} overrides."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=table1", *overrides], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True)
    overrides = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    [jobs] = BasicSweeper.split_arguments(overrides, None)
    return [dict(item.split("=", 1) for item in job) for job in jobs]


def job_lrs(jobs: list[dict[str, str]], *overrides: str, steps: int,
            optimizers: tuple[str, ...] = OPTIMIZERS) -> dict[str, set[float]]:
    """{optimizer: the learning rates its jobs run at}."""
    assert {job["attack"] for job in jobs} == set(optimizers)
    lrs: dict[str, set[float]] = {}
    for name in optimizers:  # one compose per optimizer (compose is slow); each job's rank set on it
        cfg = compose_cfg("experiment=table1", f"attack={name}", *overrides)
        assert cfg.attack.steps == steps
        for job in (j for j in jobs if j["attack"] == name):
            cfg.table1.lr_rank = int(job["table1.lr_rank"])
            assert cfg.attack.optimizer.lr == cfg.lr  # the optimizer really gets it
            lrs.setdefault(name, set()).add(cfg.lr)
    return lrs


def test_each_optimizer_runs_its_own_documented_grid():
    jobs = preset_jobs()
    assert len(jobs) == 7 * len(OPTIMIZERS) * 4
    assert job_lrs(jobs, steps=150) == {name: documented_grid(name) for name in OPTIMIZERS}


def test_at_paper_scale_the_preset_composes_and_every_optimizer_runs_the_papers_grid():
    jobs = preset_jobs("scale=paper")
    assert len(jobs) == 7 * len(PAPER_OPTIMIZERS) * 3
    assert job_lrs(jobs, "scale=paper", steps=510, optimizers=PAPER_OPTIMIZERS) == {
        name: {1e-6, 1e-5, 3e-5} for name in PAPER_OPTIMIZERS}


def test_on_the_default_documents_world_the_preset_runs_the_tiny_grids_on_its_own_model_and_data():
    """The default documents world: Table 1 on the sturdier world, the same grids, its own model and results."""
    jobs = preset_jobs("scale=documents")
    assert len(jobs) == 7 * len(OPTIMIZERS) * 4
    assert job_lrs(jobs, "scale=documents", steps=150) == {name: documented_grid(name) for name in OPTIMIZERS}
    cfg = compose_default("experiment=table1")  # the default world
    assert (cfg.data.world.documents, cfg.data.max_length, cfg.model.spec.max_position_embeddings) == (6, 64, 64)
    assert compose_default("experiment=table1", "scale=tiny").data.world.documents == 0


def test_an_optimizer_without_a_grid_or_a_rank_past_it_is_named():
    with pytest.raises(ConfigError, match=r"attack=lion with experiment=table1: no learning-rate grid table1.grids.tiny.lion"):
        validate(compose_cfg("experiment=table1", "attack=lion"))
    with pytest.raises(ConfigError, match=r"table1.lr_rank=4: allowed 0..3 \(the adam grid at scale tiny\)"):
        validate(compose_cfg("experiment=table1", "table1.lr_rank=4"))
    validate(compose_cfg("experiment=table1", "attack=lion", "lr=1e-4"))  # an explicit lr needs no grid


@pytest.mark.parametrize("scale, defense", [("documents", "npo"), ("tiny", "npo"), ("tiny", "tar"), ("tiny", "repnoise")])
def test_long_budget_runs_each_defense_at_its_measured_lr(scale, defense):
    """Each world's unrecovered defenses, each optimizer at a point of its Table 1 grid measured on that world."""
    from hydra.core.hydra_config import HydraConfig
    grids = compose_cfg("experiment=table1").table1.grids.tiny
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for optimizer in OPTIMIZERS:
            cfg = compose("config", overrides=["experiment=long_budget", f"scale={scale}", f"defense={defense}",
                                               f"attack={optimizer}"], return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)  # the lr is looked up by the defense's config choice
            assert cfg.lr == cfg.long_budget.lrs[scale][defense][optimizer] and cfg.attack.steps == 600
            assert cfg.lr in grids[optimizer]
            assert defense in cfg.long_budget.defenses[scale].split(",")
            validate(cfg)


def test_long_budget_without_a_measured_lr_refuses_by_name():
    """The documents world recovers TAR in Table 1 (no long-budget lr), and scale=paper measured none."""
    from hydra.core.hydra_config import HydraConfig
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for overrides, key in ((["defense=tar"], "long_budget.lrs.documents.tar.sgd"),
                               (["scale=paper", "defense=npo"], "long_budget.lrs.paper.npo.sgd")):
            cfg = compose("config", overrides=["experiment=long_budget", "attack=sgd", *overrides], return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)
            with pytest.raises(ConfigError, match=f"no measured lr {key}; allowed documents: npo; tiny: npo, tar"):
                validate(cfg)
