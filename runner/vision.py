"""The vision track's run: image world -> tiny ViT -> defense -> relearning attack -> evaluation -> record.

`run.py` sends every config whose data is the image world (`data.kind: images`, e.g. `experiment=vision`)
here instead of runner/pipeline.py: the steps and the record are the pipeline's, and the defense and the
attack are the same `_target_` configs (conf/defense, conf/attack) called through the same interfaces
(harness/interfaces.py); what differs is only what the language pipeline builds around a causal LM
(tokenizer, lm-eval tasks, the defended-model cache, the memory plan), which an image classifier lacks.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from harness.errors import ConfigError
from harness.images import image_data
from harness.outcome import recovered_step
from harness.record import RECORD_NAME, SCHEMA_VERSION, config_hash, provenance, write_json_atomic
from harness.tiny_vit import check_spec, ensure_tiny_vit, load_tiny_vit, spec_from_dict, world_from_dict
from harness.vision_eval import VisionEvaluator
from runner.objective import constrained_objective
from runner.pipeline import _completed, check_writable, default_threshold, print_summary, timed
from runner.report import log_run_report
from runner.validate import validate

log = logging.getLogger(__name__)


def is_vision(cfg: DictConfig) -> bool:
    return OmegaConf.select(cfg, "data.kind") == "images"


def check_vision(cfg: DictConfig) -> None:
    """What the vision track cannot take yet, in one line each, before any work."""
    if cfg.get("plan"):
        raise ConfigError("plan=true with image data: allowed false (the memory plan knows causal LMs only)")
    source = OmegaConf.select(cfg, "model.source")
    if source != "tiny_vit":
        raise ConfigError(f"model.source={source!r} with image data: allowed tiny_vit (model=tiny_vit)")
    if OmegaConf.select(cfg, "dist.name") not in (None, "none"):
        raise ConfigError(f"dist={OmegaConf.select(cfg, 'dist.name')} with image data: allowed dist=none")
    if str(OmegaConf.select(cfg, "attack._target_")).endswith("NoAttack"):
        # experiment=vision sets the relearning attack's keys, which NoAttack does not take
        raise ConfigError("attack=none with image data: allowed attack.steps=0 (any attack= scores the defended "
                          "model without fine-tuning it)")
    world, spec = world_and_spec(cfg)  # an unknown class name or a bad spec stops here, in one line
    check_spec(spec, world)


def world_and_spec(cfg: DictConfig):
    return (world_from_dict(OmegaConf.to_container(cfg.data.world, resolve=True)),
            spec_from_dict(OmegaConf.to_container(cfg.model.spec, resolve=True)))


def load_vit(cfg: DictConfig, cache_dir: Path):
    model = load_tiny_vit(ensure_tiny_vit(*world_and_spec(cfg), cache_dir))
    return model.to(dtype=getattr(torch, cfg.model.dtype), device=cfg.model.device)


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Execute one vision run and write `run_dir/result.json`; returns the record (runner.pipeline.run's)."""
    check_vision(cfg)
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
        record = {"schema_version": SCHEMA_VERSION, "status": "complete", "track": "vision", "config": resolved,
                  "config_hash": key, "provenance": {**provenance(), "world_size": 1}, "seed": cfg.seed,
                  **execute(cfg, run_dir / "attack_checkpoint" / key, logger),
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


def execute(cfg: DictConfig, checkpoint_dir: Path, logger) -> dict:
    """World, model, defense, attack: the record's timings, metrics, defense and attack."""
    timings: dict = {}
    with timed(timings, "data"):
        data = image_data(world_and_spec(cfg)[0])
    with timed(timings, "load_model"):
        model = load_vit(cfg, Path(cfg.paths.cache_dir).expanduser())
    evaluator = VisionEvaluator(data, cfg.eval.limit, cfg.eval.batch_size)
    with timed(timings, "eval_base"):
        base = evaluator(model)
    defense = instantiate(cfg.defense)
    with timed(timings, "defense"):
        model = defense(model, None, data)  # no tokenizer; SpecDef measures its drift on eval images
    with timed(timings, "eval_pre_attack"):
        pre = base if defense.name == "none" else evaluator(model)
    logger.log({f"pre_attack/{k}": v for k, v in pre.items()}, step=0)
    attack = instantiate(cfg.attack)
    threshold = attack.recover_threshold
    threshold = default_threshold(attack, base, data) if threshold is None else threshold
    with timed(timings, "attack"):
        result = attack(model, None, data, evaluator, start=pre, threshold=threshold,
                        on_eval=lambda point: logger.log(point, step=point["step"]), checkpoint_dir=checkpoint_dir)
    return {"timings": timings, "metrics": {"base": base, "pre_attack": pre, "post_attack": result.final},
            "defense": {"name": defense.name, **defense.info},
            "attack": {"name": attack.name, "lr": cfg.lr, **result.summary()}}
