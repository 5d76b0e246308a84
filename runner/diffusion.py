"""The diffusion track's run: image world -> tiny UNet -> defense -> relearning attack -> sampled evaluation -> record.

`run.py` sends every config whose data is the diffusion world (`data.kind: diffusion`, e.g.
`experiment=diffusion`) here. The steps and the record are the vision runner's (runner/vision.py) and
the language pipeline's: the same defense and attack `_target_` configs called through the same
interfaces, the same outcome rules and reporting. What differs is the model (a class-conditioned
UNet2DModel, harness/tiny_unet.py), the loss (denoising), and the evaluation, which samples from the
model and has the tiny ViT of the same world classify the samples (harness/diffusion_eval.py). Each run
also writes `samples.png`: the same seeded draws from the undefended, the defended and the attacked model.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from harness.diffusion_eval import DiffusionEvaluator, save_grid
from harness.errors import ConfigError
from harness.outcome import recovered_step
from harness.record import RECORD_NAME, SCHEMA_VERSION, config_hash, provenance, write_json_atomic
from harness.rules import check_rules, non_negative, positive_int, unit_interval
from harness.tiny_unet import check_spec, ensure_tiny_unet, load_tiny_unet, spec_from_dict, world_data
from harness.tiny_vit import check_spec as check_vit_spec, ensure_tiny_vit, load_tiny_vit, spec_from_dict as vit_spec
from harness.tiny_vit import world_from_dict
from runner.objective import constrained_objective
from runner.pipeline import _completed, check_writable, default_threshold, defend, print_summary, timed
from runner.report import log_run_report
from runner.stable_diffusion import check_stable_diffusion, is_stable_diffusion, prepare_stable_diffusion
from runner.validate import check_track, validate

log = logging.getLogger(__name__)
GRID_NAME = "samples.png"
EVAL_RULES = [
    ("eval.samples_per_class", positive_int, "an integer >= 1"),
    ("eval.sampling_steps", positive_int, "an integer >= 1"),
    ("eval.guidance_scale", non_negative, "a number >= 0"),
    ("eval.heldout_per_class", positive_int, "an integer >= 1"),
    ("eval.recover_fraction", unit_interval, "a number in [0, 1]"),
]


def is_diffusion(cfg: DictConfig) -> bool:
    return OmegaConf.select(cfg, "data.kind") == "diffusion"


def check_diffusion(cfg: DictConfig) -> None:
    """What the diffusion track cannot take (yet), in one line each, before any work."""
    check_track(cfg)  # before the track's own checks read eval keys another track's eval lacks
    if OmegaConf.select(cfg, "dist.name") not in (None, "none"):
        raise ConfigError(f"dist={OmegaConf.select(cfg, 'dist.name')} with diffusion data: allowed dist=none")
    if str(OmegaConf.select(cfg, "attack._target_")).endswith("NoAttack"):
        raise ConfigError("attack=none with diffusion data: allowed attack.steps=0 (any attack= scores the defended "
                          "model without fine-tuning it)")
    if is_stable_diffusion(cfg):  # real scale: a Stable Diffusion folder and a concept folder
        return check_stable_diffusion(cfg)
    source = OmegaConf.select(cfg, "model.source")
    if source != "tiny_unet":
        raise ConfigError(f"model.source={source!r} with diffusion data: allowed tiny_unet (model=tiny_unet) or "
                          "stable_diffusion (model=stable_diffusion model.path=<folder>)")
    check_rules(cfg, EVAL_RULES)
    world, spec, classifier = parts(cfg)  # an unknown class name or a bad spec stops here, in one line
    check_spec(spec)
    check_vit_spec(classifier, world)
    check_attack_data(OmegaConf.to_container(cfg.attack.data, resolve=True), world.hazard)


def check_attack_data(data: dict, hazard) -> None:
    """The attacker's images, as DiffusionData.attack_batches draws them, checked before the defense trains."""
    source, splits = data.get("source"), list(data.get("splits") or [])
    if source not in ("forget", "retain"):
        raise ConfigError(f"attack.data.source={source!r}: allowed forget or retain for the diffusion world")
    if source == "forget" and (not splits or any(not (isinstance(s, int) and 0 <= s < len(hazard)) for s in splits)):
        raise ConfigError(f"attack.data.splits={splits}: allowed indices 0..{len(hazard) - 1} of the hazard "
                          f"classes {list(hazard)}")


def parts(cfg: DictConfig):
    """(image world, UNet spec, classifier spec) of the config."""
    return (world_from_dict(OmegaConf.to_container(cfg.data.world, resolve=True)),
            spec_from_dict(OmegaConf.to_container(cfg.model.spec, resolve=True)),
            vit_spec(OmegaConf.to_container(cfg.eval.classifier, resolve=True)))


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Execute one diffusion run and write `run_dir/result.json`; returns the record (runner.pipeline.run's)."""
    check_diffusion(cfg)
    validate(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    run_dir = Path(run_dir)
    check_writable(run_dir)
    key = config_hash(resolved)
    stored = Path(cfg.paths.record_store).expanduser() / f"{key}.json"
    done = (_completed(run_dir / RECORD_NAME, key) or _completed(stored, key)) if cfg.resume else None
    if done is not None:
        log.info("a complete record of this config (hash %s) exists; skipping it (resume=false reruns)", key)
        print_summary(done)
        return done
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    with instantiate(cfg.logger) as logger:
        logger.start(resolved, run_dir)
        record = {"schema_version": SCHEMA_VERSION, "status": "complete", "track": "diffusion", "config": resolved,
                  "config_hash": key, "provenance": {**provenance(), "world_size": 1}, "seed": cfg.seed,
                  **execute(
                      cfg, run_dir, run_dir / "attack_checkpoint" / key, logger),
                  "lm_eval": {"version": None, "task_versions": {}}}
        record["objective"] = constrained_objective(record, OmegaConf.select(cfg, "objective"))
        logger.summary({"post_attack/hazard_acc": record["metrics"]["post_attack"].get("hazard_acc"),
                        "steps_to_recover": recovered_step(record["attack"]["outcome"]),
                        "outcome": record["attack"]["outcome"]["kind"], "diverged": record["attack"]["diverged"]})
        write_json_atomic(run_dir / RECORD_NAME, record)
        write_json_atomic(stored, record)
        log_run_report(logger, record, run_dir)
    print_summary(record)
    return record


def load_models(cfg: DictConfig, world, spec, classifier_spec):
    cache = Path(cfg.paths.cache_dir).expanduser()
    unet, _ = load_tiny_unet(ensure_tiny_unet(world, spec, cache))
    classifier = load_tiny_vit(ensure_tiny_vit(world, classifier_spec, cache))
    dtype = getattr(torch, cfg.model.dtype)
    if dtype != unet.dtype:  # diffusers warns on any dtype cast, a no-op one included
        unet = unet.to(dtype=dtype)
    return unet.to(device=cfg.model.device), classifier


def prepare_embedded(cfg: DictConfig, timings: dict):
    """(UNet, world data, evaluator, the sample grid's row names, nothing more for the record) of the embedded track."""
    world, spec, classifier_spec = parts(cfg)
    with timed(timings, "data"):
        data = world_data(world, spec)
    with timed(timings, "load_model"):
        model, classifier = load_models(cfg, world, spec, classifier_spec)
    e = cfg.eval
    evaluator = DiffusionEvaluator(data, classifier, e.samples_per_class, e.sampling_steps, e.guidance_scale,
                                   e.seed, e.heldout_per_class)
    return model, data, evaluator, data.classes, {}


def execute(cfg: DictConfig, run_dir: Path, checkpoint_dir: Path, logger) -> dict:
    """Models, data, defense, attack: the record's timings, metrics, defense and attack; and the sample grid.
    The embedded UNet or Stable Diffusion's (runner/stable_diffusion.py) differ in what they load only."""
    timings: dict = {}
    prepare = prepare_stable_diffusion if is_stable_diffusion(cfg) else prepare_embedded
    model, data, evaluator, rows, extra = prepare(cfg, timings)
    with timed(timings, "eval_base"):
        base = evaluator(model)
    grid = {"undefended": evaluator.last_samples}
    defense = instantiate(cfg.defense)
    with timed(timings, "defense"):
        # no tokenizer; SpecDef measures its drift on noised held-out images; the cache holds the defended state dict
        model = defend(cfg, defense, model, None, data, Path(cfg.paths.cache_dir).expanduser(), causal_lm=False)
    with timed(timings, "eval_pre_attack"):
        pre = base if defense.name == "none" else evaluator(model)
    base_name = defense.info.get("base", {}).get("name")
    grid[f"defended ({defense.name}{f' over {base_name}' if base_name else ''})"] = evaluator.last_samples
    logger.log({f"pre_attack/{k}": v for k, v in pre.items()}, step=0)
    attack = instantiate(cfg.attack)
    threshold = attack.recover_threshold
    if threshold is None:  # a share of the undefended model's concept rate (sampling makes it a noisy number)
        threshold = cfg.eval.recover_fraction * default_threshold(attack, base, data)
    with timed(timings, "attack"):
        result = attack(model, None, data, evaluator, start=pre, threshold=threshold,
                        on_eval=lambda point: logger.log(point, step=point["step"]), checkpoint_dir=checkpoint_dir)
    grid[f"attacked ({attack.name}, lr {cfg.lr:g}, {result.steps} steps)"] = evaluator.last_samples
    save_grid(grid, rows, run_dir / GRID_NAME)
    return {"timings": timings, "metrics": {"base": base, "pre_attack": pre, "post_attack": result.final}, **extra,
            "defense": {"name": defense.name, **defense.info},
            "attack": {"name": attack.name, "lr": cfg.lr, **result.summary()}}
