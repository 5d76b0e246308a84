"""The vision track's run: ViT -> images -> defense -> relearning attack -> evaluation -> record.

The ViT is the cached tiny one (model=tiny_vit) or any HF ViT classifier (model=vit model.path=<folder>), the
images the embedded glyph world (data=synthetic_images) or a local image folder (data=image_folder
data.path=<folder>); a checkpoint's head is fitted to the run's classes (harness/hf_vit.py).

`run.py` sends every config whose data is the image world (`data.kind: images`, e.g. `experiment=vision`)
here instead of runner/pipeline.py: the steps and the record are the pipeline's, and the defense and the
attack are the same `_target_` configs (conf/defense, conf/attack) called through the same interfaces
(harness/interfaces.py); what differs is only what the language pipeline builds around a causal LM
(tokenizer, lm-eval tasks, the memory plan), which an image classifier lacks; the defended-model cache
holds its state dict (runner.pipeline.defend with causal_lm=False).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from harness.errors import ConfigError
from harness.hf_vit import check_vit_checkpoint, fit_head, load_hf_vit
from harness.image_folder import folder_data, scan_image_folder
from harness.images import SIZE, ImageData, image_data
from harness.outcome import recovered_step
from harness.record import RECORD_NAME, SCHEMA_VERSION, config_hash, provenance, write_json_atomic
from harness.tiny_vit import check_spec, ensure_tiny_vit, load_tiny_vit, spec_from_dict, world_from_dict
from harness.vision_eval import VisionEvaluator
from runner.objective import constrained_objective
from runner.pipeline import _completed, check_writable, default_threshold, defend, print_summary, timed
from runner.report import log_run_report
from runner.validate import check_track, validate

log = logging.getLogger(__name__)


def is_vision(cfg: DictConfig) -> bool:
    return OmegaConf.select(cfg, "data.kind") == "images"


MODELS = ("tiny_vit", "hf_vit")             # model=tiny_vit | model=vit (model.path: any HF ViT classifier)
DATA = ("synthetic_images", "image_folder")  # the embedded glyph world | data=image_folder data.path=<folder>


def check_vision(cfg: DictConfig) -> None:
    """What the vision track cannot take, in one line each, before any work: also a bad image folder or
    checkpoint (no images, no safetensors, not a ViT classifier, a hazard class the folder lacks)."""
    check_track(cfg)  # before the track's own checks read eval keys another track's eval lacks
    source, data = OmegaConf.select(cfg, "model.source"), OmegaConf.select(cfg, "data.name")
    if source not in MODELS:
        raise ConfigError(f"model.source={source!r} with image data: allowed tiny_vit (model=tiny_vit) or hf_vit "
                          "(model=vit model.path=<folder>)")
    if data not in DATA:
        raise ConfigError(f"data={data} with image data: allowed synthetic_images or image_folder")
    if OmegaConf.select(cfg, "dist.name") not in (None, "none"):
        raise ConfigError(f"dist={OmegaConf.select(cfg, 'dist.name')} with image data: allowed dist=none")
    if str(OmegaConf.select(cfg, "attack._target_")).endswith("NoAttack"):
        # experiment=vision sets the relearning attack's keys, which NoAttack does not take
        raise ConfigError("attack=none with image data: allowed attack.steps=0 (any attack= scores the defended "
                          "model without fine-tuning it)")
    if source == "tiny_vit":
        if data != "synthetic_images":
            raise ConfigError(f"model=tiny_vit with data={data}: allowed data=synthetic_images (the tiny ViT knows only "
                              "the glyph world); for a folder, model=vit model.path=<a ViT checkpoint folder>")
        world, spec = world_and_spec(cfg)  # an unknown class name or a bad spec stops here, in one line
        check_spec(spec, world)
        return
    config = check_vit_checkpoint(cfg.model.path, bool(OmegaConf.select(cfg, "model.trust_remote_code")))
    if data == "synthetic_images":
        world_from_dict(OmegaConf.to_container(cfg.data.world, resolve=True))
        if config.get("image_size") != SIZE:
            raise ConfigError(f"model.path={cfg.model.path!r} (image_size {config.get('image_size')}) with "
                              f"data=synthetic_images ({SIZE}x{SIZE} glyphs): allowed data=image_folder, whose "
                              "images are resized to the checkpoint's image_size")
    else:
        folder_world(cfg)


def folder_world(cfg: DictConfig):
    d = cfg.data
    return scan_image_folder(d.path, list(d.hazard or []), d.eval_fraction, d.seed, d.max_per_class)


def world_and_spec(cfg: DictConfig):
    return (world_from_dict(OmegaConf.to_container(cfg.data.world, resolve=True)),
            spec_from_dict(OmegaConf.to_container(cfg.model.spec, resolve=True)))


def load_vit(cfg: DictConfig, cache_dir: Path):
    """The run's ViT: the cached tiny one (pretrained on the glyph world if need be), or model.path's."""
    if cfg.model.source == "hf_vit":
        return load_hf_vit(cfg.model.path, cfg.model.dtype, cfg.model.device)
    model = load_tiny_vit(ensure_tiny_vit(*world_and_spec(cfg), cache_dir))
    return model.to(dtype=getattr(torch, cfg.model.dtype), device=cfg.model.device)


def load_data(cfg: DictConfig, model) -> ImageData:
    """The glyph world, or the image folder at the model's input size."""
    if cfg.data.name == "image_folder":
        return folder_data(folder_world(cfg), int(model.config.image_size))
    return image_data(world_from_dict(OmegaConf.to_container(cfg.data.world, resolve=True)))


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
    with timed(timings, "load_model"):
        model = load_vit(cfg, Path(cfg.paths.cache_dir).expanduser())
    with timed(timings, "data"):
        data = load_data(cfg, model)
    # a checkpoint's head answers the run's classes: known ones keep their rows, unknown ones start at zero
    head = fit_head(model, data.classes) if cfg.model.source == "hf_vit" else None
    evaluator = VisionEvaluator(data, cfg.eval.limit, cfg.eval.batch_size)
    with timed(timings, "eval_base"):
        base = evaluator(model)
    defense = instantiate(cfg.defense)
    with timed(timings, "defense"):
        # no tokenizer; SpecDef measures its drift on eval images; the cache holds the defended state dict
        model = defend(cfg, defense, model, None, data, Path(cfg.paths.cache_dir).expanduser(), causal_lm=False)
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
            **({"head": head} if head is not None else {}),
            "defense": {"name": defense.name, **defense.info},
            "attack": {"name": attack.name, "lr": cfg.lr, **result.summary()}}
