"""model -> defense -> attack -> evaluation -> record. `run.py` is a thin Hydra wrapper around `run`."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from filelock import FileLock
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from attacks.partial import preflight as check_attack_patterns
from harness import distributed, hooks
from harness.data import Data, load_data
from harness.errors import ConfigError
from harness.evaluate import build_evaluator, model_fingerprint, preflight
from harness.loggers import NullLogger
from harness.manifest import verify_manifest
from harness.models import load_model
from harness.outcome import recovered_step
from harness.record import RECORD_NAME, SCHEMA_VERSION, config_hash, provenance, read_record, write_json_atomic
from runner import image_memory_plan, memory_plan
from runner.objective import constrained_objective
from runner.report import log_run_report
from runner.validate import validate

log = logging.getLogger(__name__)


@contextmanager
def timed(timings: dict, stage: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = round(time.perf_counter() - t0, 3)


def defend(cfg: DictConfig, defense, model, tokenizer, data: Data, cache_dir: Path, causal_lm: bool = True):
    """Apply the defense, or load its result from the cache: a sweep of 15 attacks on one defended
    model trains the defense once. Keyed by model, data and defense config, the defense's code and
    the input weights (a regenerated tiny model or a new hub revision keeps the config); safetensors only.
    `causal_lm=False` (the image tracks' models): the cache holds the state dict, loaded onto `model`."""
    if defense.name == "none" or not getattr(defense, "cacheable", True) or not cfg.cache_defended:
        return defense(model, tokenizer, data)
    from specdef.release import load_defended, load_defended_state
    parts = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "data", "defense")}
    parts["code"] = _source_digest(hooks.cache_sources(cfg.defense))  # edited method code must not be served
    parts["weights"] = model_fingerprint(model)
    folder = cache_dir / "defended" / config_hash(parts)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # The jobs of a parallel sweep that need the same defended model build it once: the others wait on
    # the lock, then load it. A sharded run's ranks build together, so only a single process locks.
    with _build_lock(folder):
        info_path = folder / "defense_info.json"
        # rank 0 decides for all: a parallel job may complete the folder between two ranks' looks
        if distributed.broadcast(info_path.is_file() and verify_manifest(folder) is None):
            log.info("defended model loaded from the cache %s", folder)
            defense.info = {**json.loads(info_path.read_text()), "cached_from": str(folder)}
            if not causal_lm:
                return load_defended_state(model, folder)
            cached, _ = load_defended(folder, attn_implementation=model.config._attn_implementation)
            return cached.to(next(model.parameters()).device)
        model = defense(model, tokenizer, data)
        if distributed.is_main():
            _cache_defended(model, defense, folder, causal_lm)
        return model


def _build_lock(folder: Path):
    return nullcontext() if distributed.active() else FileLock(str(folder) + ".lock")


def use_attack_attention(model, attack_cfg) -> None:
    """Eager attention for a second-order attack (its double backward), switched on only now: the
    defense was trained, or loaded, under the default kernel, so its weights are the same whichever
    attack of a sweep built it first."""
    if hooks.needs_double_backward(attack_cfg):
        model.set_attn_implementation("eager")


def _cache_defended(model, defense, folder: Path, causal_lm: bool = True) -> None:
    from specdef.release import manifest_record, save_defended, save_defended_state
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if causal_lm:
        save_defended(model, None, tmp, record=manifest_record(defense.info))
    else:
        save_defended_state(model, tmp, record=manifest_record(defense.info))
    write_json_atomic(tmp / "defense_info.json", defense.info)
    if folder.exists() and verify_manifest(folder) is not None:
        shutil.rmtree(folder)  # a corrupt earlier copy
    try:
        tmp.rename(folder)
    except OSError:  # a parallel job of the sweep cached the same defense first
        shutil.rmtree(tmp, ignore_errors=True)


def _source_digest(paths) -> str:
    """Hash of the defense's source files (harness/hooks.py: `cache_sources`)."""
    digest = hashlib.sha256()
    for path in sorted(set(paths)):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def default_threshold(attack, base: dict, data: Data) -> float | None:
    """The undefended model's own value of what the attack's rule checks ("fully recovered"): its
    hazard accuracy, or the attack's `default_threshold` (Relearn: its recover_metric, e.g. the
    held-out splits' accuracy under experiment=rtt)."""
    own = getattr(attack, "default_threshold", None)
    return base["hazard_acc"] if own is None else own(base, data)


def print_summary(record: dict) -> None:
    rows = [("undefended", record["metrics"]["base"]), ("defended (pre-attack)", record["metrics"]["pre_attack"]),
            ("post-attack", record["metrics"]["post_attack"])]
    keys = ["hazard_acc", "utility_acc", "retain_ppl"]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}}  " + "  ".join(f"{k:>12}" for k in keys)]
    for name, m in rows:
        lines.append(f"{name:{width}}  " + "  ".join(f"{m.get(k, float('nan')):>12.4f}" for k in keys))
    a = record["attack"]
    lines.append(f"attack={a['name']} lr={record['config']['lr']:g}: steps={a['steps']} "
                 f"steps_to_recover={recovered_step(a['outcome'])} diverged={a['diverged']}"
                 + (f" stopped: {a['stop_reason']}" if a.get("stop_reason") else ""))
    print("\n".join(lines), flush=True)


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Execute one run and write `run_dir/result.json`; returns the record.

    Under dist=fsdp every rank runs this with the same config; only rank 0 writes (record, caches,
    logger) and prints, and every rank returns the record."""
    validate(cfg)
    distributed.setup(cfg)
    memory_plan.check(cfg)  # refuses a config whose per-rank memory exceeds the devices, before loading anything
    resolved = OmegaConf.to_container(cfg, resolve=True)
    run_dir = Path(run_dir)
    check_writable(run_dir)
    record_path = run_dir / RECORD_NAME
    key = config_hash(resolved)
    stored = Path(cfg.paths.record_store).expanduser() / f"{key}.json"
    if cfg.resume:
        done = distributed.broadcast(_completed(record_path, key) or _completed(stored, key))
        if done is not None:
            log.info("a complete record of this config (hash %s) exists; skipping it (resume=false reruns)", key)
            if distributed.is_main():
                write_json_atomic(record_path, done)
                print_summary(done)
            return done
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cache_dir = Path(cfg.paths.cache_dir).expanduser()
    timings: dict = {}
    logger = instantiate(cfg.logger) if distributed.is_main() else NullLogger()
    with logger:
        logger.start(resolved, run_dir)
        with timed(timings, "data"), distributed.main_first():  # rank 0 builds what is cached
            data = load_data(cfg.data, cache_dir)
            preflight(cfg.eval, data)  # a missing eval dataset stops the run here, before any model is loaded
        with timed(timings, "load_model"), distributed.main_first():
            # dist=fsdp: the plain model stays in host memory; its shards go to each rank's device
            device = "cpu" if distributed.active() else None
            # the default attention kernel: the defended model, cached and shared by every attack of a
            # sweep, must not depend on which attack happened to build it (see use_attack_attention)
            model, tokenizer = load_model(cfg.model, cfg.data, data, cache_dir, device=device)
        check_attack_patterns(OmegaConf.select(cfg, "attack"), model)  # a typo stops here, not after the defense
        with distributed.main_first():
            evaluator = build_evaluator(cfg.eval, tokenizer, data)
        with timed(timings, "eval_base"):
            base = evaluator(model)
        defense = instantiate(cfg.defense)
        with timed(timings, "defense"):
            model = defend(cfg, defense, model, tokenizer, data, cache_dir)
        with timed(timings, "eval_pre_attack"):
            pre = base if defense.name == "none" else evaluator(model)
        logger.log({f"pre_attack/{k}": v for k, v in pre.items()}, step=0)
        use_attack_attention(model, cfg.attack)
        attack = instantiate(cfg.attack)
        threshold = attack.recover_threshold
        threshold = default_threshold(attack, base, data) if threshold is None else threshold
        with timed(timings, "attack"):
            result = attack(model, tokenizer, data, evaluator, start=pre, threshold=threshold,
                            on_eval=lambda point: logger.log(point, step=point["step"]),
                            checkpoint_dir=run_dir / "attack_checkpoint" / key)
        record = {
            "schema_version": SCHEMA_VERSION, "status": "complete", "config": resolved,
            "config_hash": key, "provenance": {**provenance(), "world_size": distributed.world_size()},
            "seed": cfg.seed,
            "timings": timings, "metrics": {"base": base, "pre_attack": pre, "post_attack": result.final},
            "defense": {"name": defense.name, **defense.info},
            "attack": {"name": attack.name, "lr": cfg.lr, **result.summary()},
            "lm_eval": {"version": _version("lm_eval"), "task_versions": evaluator.versions},
        }
        record["objective"] = constrained_objective(record, OmegaConf.select(cfg, "objective"))
        logger.summary({"post_attack/hazard_acc": result.final.get("hazard_acc"),
                        "steps_to_recover": recovered_step(result.outcome), "outcome": result.outcome["kind"],
                        "diverged": result.diverged})
        if distributed.is_main():
            write_json_atomic(record_path, record)
            write_json_atomic(stored, record)
        log_run_report(logger, record, run_dir)  # the run's one-row tables and plots (no-op for logger=none)
    if distributed.is_main():
        print_summary(record)
    return record


def show_plan(cfg: DictConfig) -> None:
    """`plan=true`: print the memory plan of the config (after its validation); load nothing. The image tracks
    have their own (runner/image_memory_plan.py)."""
    validate(cfg)
    images = OmegaConf.select(cfg, "data.kind") in ("images", "diffusion")
    report = (image_memory_plan.plan(cfg) if images else memory_plan.plan(cfg)).report()
    if os.environ.get("RANK", "0") == "0":  # under torchrun, once
        print(report, flush=True)


def check_writable(folder: Path) -> None:
    """Fail before any work if the run folder cannot take files (e.g. a path through a file, a
    read-only mount, or a full disk)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_test"):
            pass
    except OSError as e:
        raise ConfigError(f"run folder {str(folder)!r} is not writable ({e.strerror or e}); "
                          "allowed a writable folder (hydra.run.dir / paths.output_root)") from None


def _completed(path: Path, key: str) -> dict | None:
    record = read_record(path)
    return record if record is not None and record.get("config_hash") == key else None


def _version(pkg: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None
