"""`scale=paper` runs each method with its authors' values (conf/defense_scale/paper/), and SpecDef at
that scale stores its release in a dtype that carries its α. Compose-only, plus SpecDef on the tiny model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import ListConfig, OmegaConf

from harness.errors import ConfigError
from runner.validate import validate
from specdef.defense import SpecDef, load_base_config
from tests.conftest import CONF_DIR, compose_cfg

# The originals' values, written out independently of the YAML (sources in conf/defense_scale/paper/*.yaml).
PAPER = {
    "rmu": {"layer_id": 7, "param_layers": [5, 6, 7], "steering_coef": 6.5, "alpha": 1200, "lr": 5e-5,
            "steps": 150, "batch_size": 4, "retain_corpus": "unrelated"},
    "npo": {"beta": 0.1, "npo_coeff": 1.0, "retain_coeff": 1.0, "lr": 1e-5, "weight_decay": 0.01,
            "batch_size": 4, "grad_accum": 8, "warmup_epochs": 1, "max_grad_norm": 1.0},
    "class_npo": {"beta": 0.1, "npo_coeff": 1.0, "retain_coeff": 1.0, "lr": 1e-5, "weight_decay": 0.01,
                  "batch_size": 4, "grad_accum": 8, "warmup_epochs": 1, "max_grad_norm": 1.0},
    "condition_number": {"lambda_well": 3e-6, "lambda_ill": 3e8, "lambda_diag": 1e-6, "lr": 1e-5, "momentum": 0.9,
                         "nesterov": True, "weight_decay": 0.0, "head_weight_decay": 2e-5, "label_smoothing": 0.1,
                         "last_blocks": 1, "dtype": "float64", "steps": 254, "batch_size": 64},
    "repnoise": {"alpha": 1, "beta": 0.001, "lr": 1e-4, "batch_size": 4, "warmup_ratio": 0.1},
    "elm": {"lora_layers": [4, 5, 6, 7], "lora_r": 256, "lora_alpha": 16, "lora_dropout": 0.05, "eta": 1000,
            "top_k": 50, "temperature": 1.2, "gamma": 3, "erase_coeff": 1, "retain_coeff": 1,
            "consistency_coeff": 1, "lr": 5e-5, "steps": 750, "batch_size": 4, "retain_soft": False},
    "tar": {"outer_steps": 750, "outer_lr": 2e-5, "warmup_steps": 32, "inner_steps": 64, "inner_subsample": 4,
            "adversary_lrs": [2e-6, 2e-5, 4e-5], "adversary_batch_size": 4, "batch_size": 8,
            "tr_grad_scale": 4.0, "schedule_lambda": 0.0625, "retain_scale": 1.0, "heldout_fraction": 0.2,
            "rm_lr": 2e-5},
    "imma": {"lr": 5e-6, "lr_defense": 2e-5, "steps": 1000, "batch_size": 1, "inner_steps": 1, "outer_steps": 1,
             "weight_decay": 1e-2, "max_grad_norm": 1.0},
    "imma_esd": {"lr": 5e-6, "lr_defense": 2e-5, "steps": 1000, "batch_size": 1, "inner_steps": 1, "outer_steps": 1,
                 "weight_decay": 1e-2, "max_grad_norm": 1.0, "base": "esd"},
    "esd": {"negative_guidance": 1.0, "start_guidance": 3.0, "iterations": 1000, "lr": 1e-5, "batch_size": 1,
            "ddim_steps": 50, "train_method": "noxattn"},
}
SPECDEF_PAPER = {"alpha": 1e4, "dtype": "float32", "strict_drift": True, "base_scale": "paper"}
SPECDEF_VARIANTS = {"specdef": None, "specdef_all_linear": None, "specdef_elm": "elm", "specdef_elm_all_linear": "elm",
                    "specdef_vit": None, "specdef_vit_npo": "class_npo",
                    "specdef_vit_cn": "condition_number", "specdef_unet": None, "specdef_unet_esd": "esd",
                    "specdef_sd": None, "specdef_sd_esd": "esd"}
DEFENSES = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "defense").glob("*.yaml"))


def _check(cfg, expected: dict, where: str) -> None:
    for key, value in expected.items():
        got = cfg[key]
        got = list(got) if hasattr(got, "__len__") and not isinstance(got, str) else got
        assert got == pytest.approx(value) if isinstance(value, (float, list)) else got == value, \
            f"{where}: {key}={got!r}, the original's {value!r}"


def test_every_defense_has_paper_values():
    """No trained defense reaches scale=paper with only its tiny-model values (a checkpoint has none)."""
    assert {d for d in DEFENSES if not d.startswith("checkpoint")} == {"none", *PAPER, *SPECDEF_VARIANTS}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_scale_runs_the_originals_values(name):
    _check(compose_cfg("scale=paper", f"defense={name}").defense, PAPER[name], f"scale=paper defense={name}")


@pytest.mark.parametrize("name", sorted(PAPER))
def test_tiny_scale_keeps_its_own_values(name):
    tiny = compose_cfg(f"defense={name}").defense
    assert any(tiny[k] != pytest.approx(v) if isinstance(v, float) else tiny[k] != v
               for k, v in PAPER[name].items() if k in tiny)


@pytest.mark.parametrize("name", sorted(SPECDEF_VARIANTS))
def test_specdef_at_paper_scale_is_precision_aware(name):
    cfg = compose_cfg("scale=paper", f"defense={name}").defense
    _check(cfg, SPECDEF_PAPER, f"scale=paper defense={name}")
    assert cfg.base == SPECDEF_VARIANTS[name]  # the variant's own keys survive
    tiny = compose_cfg(f"defense={name}").defense
    assert (tiny.dtype, tiny.strict_drift, tiny.base_scale) == (None, False, None)


def test_specdef_base_takes_the_scales_values():
    """SpecDef reads its base's config itself: at paper scale ELM runs with its authors' values."""
    _check(load_base_config("elm", {}, "paper"), PAPER["elm"], "base elm at paper scale")
    assert load_base_config("elm", {"lr": 1e-4}, "paper").lr == pytest.approx(1e-4)  # overrides still win
    assert load_base_config("elm", {}, None).lora_r == compose_cfg("defense=elm").defense.lora_r


def test_paper_scale_overrides_still_win():
    assert compose_cfg("scale=paper", "defense=rmu", "defense.layer_id=9").defense.layer_id == 9


class Trains:
    """A base defense that records being run."""
    name, runs = "trains", 0

    def __init__(self):
        self.info = {}

    def __call__(self, model, tokenizer, data):
        Trains.runs += 1
        return model


def test_alpha_the_dtype_cannot_carry_stops_before_the_base_trains(tiny_model, data):
    model, tok = tiny_model
    with pytest.raises(ConfigError, match=r"defense.alpha=1e\+09: float32 carries alpha up to about 8.4e\+04"):
        SpecDef(alpha=1e9, k=4, strict_drift=True, dtype="float32", base=Trains())(model, tok, data)
    assert Trains.runs == 0
    with pytest.raises(ConfigError, match="defense.dtype='fp8'"):
        SpecDef(alpha=10.0, k=4, dtype="fp8")


def test_alpha_the_dtype_cannot_carry_stops_at_validation():
    with pytest.raises(ConfigError, match=r"defense.alpha=1e\+09: float32 carries alpha up to about"):
        validate(compose_cfg("scale=paper", "defense=specdef", "defense.alpha=1e9"))
    with pytest.raises(ConfigError, match=r"defense.alpha=10000: bfloat16 carries alpha up to about 1.3"):
        validate(compose_cfg("scale=paper", "defense=specdef", "defense.dtype=null"))  # the model's bfloat16
    validate(compose_cfg("scale=paper", "defense=specdef_elm"))  # the paper's alpha in float32


def test_release_dtype_is_stored_and_recorded(tiny_model, data):
    """A float32 model defended with dtype=float64 is cast (exactly) and the record names the dtype."""
    model, tok = tiny_model
    defense = SpecDef(alpha=1e4, k=4, dtype="float64", strict_drift=True, drift_samples=4)
    model = defense(model, tok, data)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert defense.info["release_dtype"] == "float64"
    assert defense.info["drift"]["rel_logit_error"] < 1e-8  # float64 carries 1e4 with room to spare


def preset_jobs(experiment: str, *overrides: str) -> list[list[str]]:
    """The jobs `python run.py -m experiment=<experiment> <overrides>` launches, as override lists."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}", *overrides], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True)
    [jobs] = BasicSweeper.split_arguments(
        OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()]), None)
    return [[f"experiment={experiment}", *overrides, *job] for job in jobs]


# (experiment, scale): the protocol values every job must run with, whatever scale=paper sets for Table 1.
PRESETS = {
    ("qi_durability", "paper"): {"attack.name": "adamw", "lr": 2e-5, "attack.steps": 1000,
                                 "attack.warmup_steps": 100, "attack.schedule": "cosine",
                                 "attack.batch_size * attack.grad_accum": 64},
    ("qi_durability", "tiny"): {"attack.name": "adamw", "lr": 1e-3, "attack.steps": 1000,
                                "attack.batch_size * attack.grad_accum": 64},
    ("lucki_lora", "paper"): {"attack.peft.r": 128, "attack.peft.lora_alpha": 16, "lr": 2e-4,
                              "attack.schedule": "linear", "attack.warmup_steps": 150, "attack.steps": 3000,
                              "attack.batch_size * attack.grad_accum": 1, "attack.data.n_samples": 1000},
    ("lucki_lora", "tiny"): {"attack.peft.r": 8, "attack.steps": 3000},
    ("rtt", "paper"): {"attack.name": "lion", "attack.recover_metric": "heldout_acc", "attack.data.splits": [0]},
    ("rtt", "tiny"): {"attack.name": "lion", "attack.recover_metric": "heldout_acc", "attack.steps": 85},
}


@pytest.mark.parametrize("experiment, scale", sorted(PRESETS))
def test_durability_presets_run_their_protocol(experiment, scale):
    jobs = preset_jobs(experiment, f"scale={scale}")
    seeds = {o for job in jobs for o in job if o.startswith("seed=")}
    assert len(seeds) == (5 if experiment == "qi_durability" else 0)
    cfg = compose_cfg(*jobs[-1])
    for key, value in PRESETS[experiment, scale].items():
        got = (cfg.attack.batch_size * cfg.attack.grad_accum if "*" in key else OmegaConf.select(cfg, key))
        got = list(got) if isinstance(got, ListConfig) else got
        assert got == (pytest.approx(value) if isinstance(value, float) else value), f"{experiment} {scale}: {key}"
    if experiment == "lucki_lora":
        assert {o for job in jobs for o in job if o.startswith("attack.data.source=")} == {
            "attack.data.source=forget", "attack.data.source=retain", "attack.data.source=unrelated"}
    if experiment == "rtt":
        assert "defense=none" in {o for job in jobs for o in job}  # recovery is relative to the original's


def test_table1_jobs_at_paper_scale_carry_the_paper_values():
    """What `python run.py -m experiment=table1 scale=paper` runs: each defense's job with its values."""
    jobs = [job for job in preset_jobs("table1", "scale=paper") if "defense=rmu" in job or "defense=specdef_elm" in job]
    rmu = compose_cfg(*next(job for job in jobs if "defense=rmu" in job)).defense
    _check(rmu, PAPER["rmu"], "table1 scale=paper defense=rmu")
    specdef = compose_cfg(*next(job for job in jobs if "defense=specdef_elm" in job)).defense
    _check(specdef, SPECDEF_PAPER, "table1 scale=paper defense=specdef_elm")


def test_utility_table_measures_every_alpha_at_paper_scale():
    """The utility table records the drift of alphas float32 cannot carry instead of refusing them."""
    jobs = preset_jobs("utility", "scale=paper")
    cfgs = [compose_cfg(*job).defense for job in jobs]
    assert sorted(c.alpha for c in cfgs) == [1e3, 1e5, 1e9]
    assert all(c.strict_drift is False and c.dtype == "float32" for c in cfgs)


@pytest.mark.parametrize("launcher, target", [(None, "SlurmLauncher"), ("local", "JoblibLauncher"),
                                              ("basic", "BasicLauncher")])
def test_paper_scale_composes_with_every_launcher(launcher, target):
    overrides = ["experiment=table1", "scale=paper", *([f"hydra/launcher={launcher}"] if launcher else [])]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    if launcher is None:  # SLURM sized by the memory plan (tests/test_distributed.py checks the numbers)
        assert cfg.hydra.launcher.tasks_per_node == cfg.hydra.launcher.gpus_per_node == 3
