"""The diffusion track's embedded default: the tiny class-conditioned UNet pretrained on the image world, its
sampled evaluation scored by the tiny ViT, SpecDef on the UNet, ESD and the relearning attack through the one
training loop.

The pretrained UNet is built once per cache (~4 min on one core the first time, a checksummed load after),
the ViT likewise (tests/test_vision.py's)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.diffusion_eval import DiffusionEvaluator
from harness.errors import ConfigError
from harness.images import ImageWorldConfig
from harness.tiny_unet import TinyUNetSpec, ensure_tiny_unet, load_tiny_unet, untrained, world_data
from harness.tiny_vit import TinyViTSpec, ensure_tiny_vit, load_tiny_vit
from tests.conftest import CACHE_DIR, compose_cfg

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
WORLD, SPEC = ImageWorldConfig(), TinyUNetSpec()
FAST = {"samples_per_class": 8, "sampling_steps": 10}  # what the in-process tests sample with


@pytest.fixture(scope="session")
def diffusion_data():
    return world_data(WORLD, SPEC)


@pytest.fixture(scope="session")
def unet_path():
    return ensure_tiny_unet(WORLD, SPEC, CACHE_DIR)


@pytest.fixture(scope="session")
def classifier():
    return load_tiny_vit(ensure_tiny_vit(WORLD, TinyViTSpec(), CACHE_DIR))


@pytest.fixture(scope="session")
def evaluator(diffusion_data, classifier):
    return DiffusionEvaluator(diffusion_data, classifier, **FAST)


@pytest.fixture(scope="session")
def pretrained_metrics(unet_path, evaluator):
    return evaluator(load_tiny_unet(unet_path)[0])


def unet(path):
    return load_tiny_unet(path)[0]


# The pretrained denoiser

def test_pretrained_unet_draws_every_class(pretrained_metrics):
    """Its samples are classified as the class asked for well above chance (1/8), on both sides."""
    assert pretrained_metrics["hazard_acc"] >= 0.8 and pretrained_metrics["utility_acc"] >= 0.8
    assert pretrained_metrics["retain_ppl"] < 0.2  # held-out denoising MSE (1.0: predicting zeros)


def test_untrained_unet_draws_nothing(evaluator):
    metrics = evaluator(untrained(SPEC, WORLD))
    assert metrics["utility_acc"] < 0.5 and metrics["retain_ppl"] > 0.5


def test_scores_are_reproducible(unet_path, evaluator, pretrained_metrics):
    assert evaluator(unet(unet_path)) == pretrained_metrics


def test_unet_cache_is_checksummed(unet_path):
    from harness.manifest import verify_manifest
    assert verify_manifest(unet_path) is None and "weights_sha256" in (unet_path / "manifest.json").read_text()
    assert unet_path.parent.name == "tiny_unet" and (unet_path / "scheduler_config.json").is_file()


# SpecDef on the UNet

def test_specdef_on_unet_is_exact(unet_path, diffusion_data):
    """Same noise prediction to float tolerance, with every attention projection and the time MLP amplified."""
    from omegaconf import OmegaConf
    from specdef.core import specdef_modules
    from specdef.defense import SpecDef
    layers = list(OmegaConf.load(CONF / "defense" / "specdef_unet.yaml").layers)
    model = unet(unet_path)
    batch = _batch(diffusion_data)
    with torch.no_grad():
        reference = model(batch["sample"], batch["timestep"], class_labels=batch["class_labels"]).sample
    defense = SpecDef(alpha=1e4, k=8, layers=layers)
    model = defense(model, None, diffusion_data)
    with torch.no_grad():
        defended = model(batch["sample"], batch["timestep"], class_labels=batch["class_labels"]).sample
    names = sorted(dict(specdef_modules(model)))
    assert len(names) == 4 * 4 + 1 and "time_embedding.linear_2" in names  # 4 attention blocks x q, k, v, out
    assert (defended - reference).norm() / reference.norm() < 1e-3
    assert defense.info["drift"]["rel_logit_error"] < 1e-3 and defense.info["drift"]["tokens"] == 64
    assert all(abs(r - 1) < 1e-2 for r in defense.info["sigma_ratio"].values())


def test_a_defended_unet_is_cached_and_served_bit_exact(unet_path, diffusion_data, tmp_path, monkeypatch):
    """SpecDef over ESD: the first run trains and caches the defended UNet (state dict + SpecDef manifest), the
    next one with the same config serves it without training: the same tensors, the same noise prediction."""
    from baselines.esd import ESD
    from hydra.utils import instantiate
    from runner.pipeline import defend
    cfg = compose_cfg("experiment=diffusion", "defense=specdef_unet_esd", "+defense.base_overrides.iterations=3")
    built = defend(cfg, instantiate(cfg.defense), unet(unet_path), None, diffusion_data, tmp_path, causal_lm=False)
    assert len(list((tmp_path / "defended").glob("*/defended.safetensors"))) == 1

    def no_training(*_a, **_k):
        raise AssertionError("trained although the defended model is cached")
    monkeypatch.setattr(ESD, "__call__", no_training)
    again = instantiate(cfg.defense)
    served = defend(cfg, again, unet(unet_path), None, diffusion_data, tmp_path, causal_lm=False)
    assert again.info["cached_from"].startswith(str(tmp_path)) and again.info["base"]["name"] == "esd"
    a, b = built.state_dict(), served.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    flags = [{n: p.requires_grad for n, p in m.named_parameters()} for m in (built, served)]
    assert flags[0] == flags[1]  # what the attack may train is the same
    batch = _batch(diffusion_data)
    with torch.no_grad():
        outputs = [m(batch["sample"], batch["timestep"], class_labels=batch["class_labels"]).sample
                   for m in (built, served)]
    assert torch.equal(*outputs)


def _batch(data, n=4):
    from harness.diffusion import heldout_batch
    return heldout_batch(data, list(range(len(data.classes))), n, seed=1)


# The runs (runner/diffusion.py over the defenses, attacks.relearn.Relearn and harness.train.train_loop)

def diffusion_run(tmp_path, *overrides):
    from runner.diffusion import run
    from tests.conftest import compose_cfg
    cfg = compose_cfg("experiment=diffusion", f"paths.output_root={tmp_path}", "threads=1",
                      *(f"eval.{k}={v}" for k, v in FAST.items()), *overrides)
    return run(cfg, tmp_path / "run")


def test_relearning_esd_and_specdef_over_it(tmp_path):
    """The attacker fine-tunes the erased UNet on the concept's images: it relearns the concept; with SpecDef
    over ESD the same attack is a dagger."""
    # recovered: 80 % of the undefended concept rate (a share of 16 draws here, the preset's 0.9 of 32 draws)
    common = ("attack=adam", "lr=1e-3", "attack.steps=40", "attack.eval_every=20", "eval.recover_fraction=0.8")
    erased = diffusion_run(tmp_path / "esd", "defense=esd", *common)
    base, pre = erased["metrics"]["base"], erased["metrics"]["pre_attack"]
    assert base["hazard_acc"] >= 0.8 and pre["hazard_acc"] <= 0.3  # ESD erased the concept ...
    assert pre["utility_acc"] >= base["utility_acc"] - 0.15          # ... and kept the other classes
    assert erased["defense"]["erased_classes"] == ["cross", "ring"]
    assert erased["attack"]["outcome"]["kind"] == "recovered", erased["attack"]["outcome"]
    assert erased["attack"]["threshold"] == pytest.approx(0.8 * base["hazard_acc"])
    assert (tmp_path / "esd" / "run" / "samples.png").is_file()
    defended = diffusion_run(tmp_path / "specdef", "defense=specdef_unet_esd", *common)
    assert defended["defense"]["base"]["name"] == "esd"
    assert defended["metrics"]["pre_attack"]["hazard_acc"] == pytest.approx(
        erased["metrics"]["pre_attack"]["hazard_acc"], abs=0.07)
    assert defended["attack"]["outcome"]["kind"] == "diverged", defended["attack"]["outcome"]


@pytest.mark.parametrize("override, message", [
    ("data.world.hazard=[cross,skull]", r"data.world.hazard: unknown class 'skull'; allowed disk, square"),
    ("defense=esd defense.forget_splits=[2]", r"defense.forget_splits=\[2\]: allowed a non-empty list of indices 0..1"),
    ("model=tiny_vit", r"model.source='tiny_vit' with diffusion data: allowed tiny_unet"),
    ("defense=esd defense.train_method=crossattn", r"defense.train_method='crossattn': allowed noxattn, xattn"),
    ("defense=esd attack.data.splits=[0,2]", r"attack.data.splits=\[0, 2\]: allowed indices 0..1 of the hazard classes"),
])
def test_bad_input_stops_in_one_line(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message) as err:
        diffusion_run(tmp_path, *override.split())
    assert "\n" not in str(err.value)


def test_esd_refuses_other_worlds_before_any_work(tmp_path):
    from runner.validate import validate
    from runner.vision import run
    from tests.conftest import compose_cfg
    cfg = compose_cfg("experiment=vision", "defense=esd", f"paths.output_root={tmp_path}")
    with pytest.raises(ConfigError, match=r"defense=esd with data=synthetic_images: allowed the diffusion world"):
        run(cfg, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"defense=esd with data=synthetic: allowed the diffusion world"):
        validate(compose_cfg("defense=esd"))  # the language track's validation, before any model loads


def test_run_py_refuses_an_unknown_concept_in_one_line(tmp_path, run_py_refusal):
    code, err = run_py_refusal("experiment=diffusion", "data.world.hazard=[skull]", f"paths.output_root={tmp_path}")
    assert code == 2
    assert err.strip().splitlines()[-1] == ("error: data.world.hazard: unknown class 'skull'; allowed disk, "
                                            "square, triangle, cross, ring, diamond, saltire, frame")


def test_diffusion_table_preset_composes():
    from hydra.utils import instantiate
    from tests.conftest import compose_cfg
    grids = {"sgd": [3e-2, 1e-1], "adam": [3e-4, 1e-3], "sophia": [1e-2, 3e-2], "adahessian": [1e-1, 3e-1],
             "muon": [3e-4, 1e-3], "adam_lora": [1e-2, 3e-2]}
    for attack, grid in grids.items():
        for rank, lr in enumerate(grid):
            cfg = compose_cfg("experiment=diffusion_table", f"attack={attack}", f"diffusion_table.lr_rank={rank}")
            assert cfg.lr == pytest.approx(lr) and cfg.data.kind == "diffusion"
    jobs = [dict(o.split("=", 1) for o in job) for job in sweep_jobs("experiment=diffusion_table")]
    assert len(jobs) == 4 * 6 * 2  # every optimizer at both points of its grid: the grid sweeper skips nothing here
    assert {j["defense"] for j in jobs} == {"none", "esd", "imma_esd", "specdef_unet_esd"}
    assert all({j["attack"] for j in jobs if j["diffusion_table.lr_rank"] == r} == set(grids) for r in "01")
    assert compose_cfg("experiment=diffusion_table", "attack=adam_lora").attack.peft.target_modules[0] == "to_q"
    skipped = sweep_jobs("experiment=diffusion_table", "hydra.sweeper.skip=[{attack: 'sophia,muon', diffusion_table.lr_rank: '0'}]")
    assert len(skipped) == len(jobs) - 2 * 4  # the mechanism stays: a skip given on the command line drops its jobs
    defense = instantiate(compose_cfg("experiment=diffusion_table", "defense=specdef_unet_esd").defense)
    assert (defense.base, defense.alpha) == ("esd", 1e4)
    paper = instantiate(compose_cfg("experiment=diffusion", "defense=esd", "scale=paper").defense)
    assert (paper.lr, paper.iterations, paper.negative_guidance, paper.ddim_steps) == (1e-5, 1000, 1.0, 50)


def sweep_jobs(*overrides: str) -> list[list[str]]:
    """The jobs `python run.py -m <overrides>` launches: its sweeper's batches (the grid sweeper's skips applied)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.utils import instantiate
    from tests.conftest import CONF_DIR
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        node = compose("config", overrides=list(overrides), return_hydra_config=True).hydra.sweeper
    sweeper = instantiate(node)
    params = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in node.params.items()])
    sweeper.overrides = sweeper.split_arguments(params, sweeper.max_batch_size)
    jobs = []
    while not sweeper.is_done():
        jobs += sweeper.get_job_batch()
    return jobs


def test_the_table_report_copies_each_jobs_sample_grid(tmp_path, monkeypatch):
    """experiment=diffusion_table's sweep-end callback: the report, plus grids/<defense>_<attack>_lr<lr>.png."""
    import json
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from tests.conftest import CONF_DIR
    from tests.test_report import make_record
    monkeypatch.chdir(tmp_path)
    job = tmp_path / "sweep" / "0"
    job.mkdir(parents=True)
    (job / "result.json").write_text(json.dumps(make_record("esd", "adam", 1e-3, final=0.9)))
    (job / "samples.png").write_bytes(b"png")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=diffusion_table", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                                           "+hydra.callbacks.report.plots=false"], return_hydra_config=True)
    instantiate(cfg.hydra.callbacks.report).on_multirun_end(cfg)
    out = tmp_path / "results" / "diffusion_tiny"
    assert (out / "summary.md").is_file() and (out / "grids" / "esd_adam_lr0.001.png").read_bytes() == b"png"


def test_imma_releases_the_pretrained_model_with_its_attention_only(unet_path, diffusion_data):
    """IMMA (baselines/imma.py): the attacker's simulated updates are dropped, the defender's attention kept."""
    from baselines.imma import ATTENTION, IMMA
    model = unet(unet_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    defense = IMMA(lr=1e-4, lr_defense=4e-3, steps=6, batch_size=4)
    model = defense(model, None, diffusion_data)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(any(a in n for a in ATTENTION) for n in moved)
    assert all(p.requires_grad for p in model.parameters())
    assert defense.info["defended_layers"] == 16 and defense.info["train_steps"] == 6
    with pytest.raises(ConfigError, match=r"defense.forget_splits=\[5\]: allowed a non-empty list of indices 0..1"):
        from runner.validate import validate  # IMMA over ESD: the base's checks run before any work
        from tests.conftest import compose_cfg
        validate(compose_cfg("experiment=diffusion", "defense=imma_esd", "+defense.base_overrides.forget_splits=[5]"))
    with pytest.raises(ConfigError, match=r"defense=imma with data=synthetic: allowed the diffusion world"):
        from runner.validate import validate
        from tests.conftest import compose_cfg
        validate(compose_cfg("defense=imma"))
