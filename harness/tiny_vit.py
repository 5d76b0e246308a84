"""The tiny pretrained ViT of the vision track's embedded default: built offline, trained once, cached.

A `transformers` ViTForImageClassification (no hand-written model) pretrained on the image world
(harness/images.py) through the one training loop, like the tiny Llama (harness/tiny.py) and with the
same machinery: pretraining runs in a subprocess whose numerics are pinned before torch loads
(harness/numerics.py), the cache folder is keyed by everything that decides the weights (world,
architecture, recipe and its source, the pin used, library versions), written to a temporary folder,
renamed into place and checked against a manifest of sha256 checksums on every load.

Patch 8 (16 patches of a 32x32 image) and 2 blocks keep a step at ~20 ms on one core: the default
pretrains in ~40 s natively (2,000 steps; hazard and benign accuracy 0.985 and 0.983), about twice
that under the scalar pin. Patch 4 cost 4x per step and learnt no faster per step.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import ViTConfig, ViTForImageClassification

from harness import images, numerics
from harness.errors import ConfigError
from harness.manifest import write_manifest
from harness.tiny import REPO, cached_model, weights_digest
from harness.train import lr_lambda, train_loop

log = logging.getLogger(__name__)
TINY_VIT_VERSION = 1
NUMERICS = (*numerics.PINS, numerics.MACHINE)


@dataclasses.dataclass(frozen=True)
class TinyViTSpec:
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    patch_size: int = 8
    steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    seed: int = 0
    exclude_hazard: tuple[int, ...] = ()  # hazard classes (indices into world.hazard) never shown in pretraining
    numerics: str = "machine"              # a pin of harness/numerics.py, or machine (avx2 where the CPU has it)


def model_config(spec: TinyViTSpec, world: images.ImageWorldConfig) -> ViTConfig:
    # no dropout: the bits of a pinned run must not depend on an RNG the loop does not own
    return ViTConfig(image_size=images.SIZE, patch_size=spec.patch_size, num_channels=3,
                     hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                     num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=len(world.classes),
                     id2label=dict(enumerate(world.classes)), label2id={c: i for i, c in enumerate(world.classes)})


def untrained(spec: TinyViTSpec, world: images.ImageWorldConfig) -> ViTForImageClassification:
    torch.manual_seed(spec.seed)
    return ViTForImageClassification(model_config(spec, world)).eval()


def pretraining_set(data: images.ImageData, spec: TinyViTSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The training images of every class but the excluded hazard classes (the `naive` model's)."""
    excluded = [data.hazard_labels[s] for s in spec.exclude_hazard]
    keep = ~torch.isin(data.train_labels, torch.tensor(excluded, dtype=torch.long))
    return data.train_images[keep], data.train_labels[keep]


def pretrain(world: images.ImageWorldConfig, spec: TinyViTSpec, progress: bool = False):
    model = untrained(spec, world)
    x, y = pretraining_set(images.image_data(world), spec)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("cosine", spec.warmup_steps, spec.steps))
    batches = images.image_batches(x, y, spec.batch_size, spec.seed)
    result = train_loop(model, batches, images.classification_loss, [opt], schedulers=[sched], steps=spec.steps,
                        max_grad_norm=spec.max_grad_norm, desc="pretrain tiny vit", progress=progress)
    return model, result


def recipe_digest() -> str:
    """sha256 of the source that turns a spec into weights (an edit to it is a new model)."""
    from harness import train
    parts = (TinyViTSpec, model_config, untrained, pretraining_set, pretrain, train.train_loop,
             train._accumulate_gradients, train.lr_lambda, images.image_batches, images.pixel_values,
             images.classification_loss)
    h = hashlib.sha256()
    for part in parts:
        h.update(inspect.getsource(part).encode())
    return h.hexdigest()[:12]


def check_spec(spec: TinyViTSpec, world: images.ImageWorldConfig) -> None:
    numerics.check(spec.numerics, "model.spec.numerics", NUMERICS)
    if spec.hidden_size % spec.num_attention_heads:
        raise ConfigError(f"model.spec.hidden_size={spec.hidden_size}: allowed a multiple of "
                          f"model.spec.num_attention_heads={spec.num_attention_heads}")
    if images.SIZE % spec.patch_size:
        raise ConfigError(f"model.spec.patch_size={spec.patch_size}: allowed a divisor of {images.SIZE}")
    for s in spec.exclude_hazard:
        if not (isinstance(s, int) and 0 <= s < len(world.hazard)):
            raise ConfigError(f"model.spec.exclude_hazard={list(spec.exclude_hazard)}: allowed indices "
                              f"0..{len(world.hazard) - 1} of data.world.hazard {list(world.hazard)}")


# Shipped weights, one folder per cache key (python -m experiments.ship_tiny --models vit...): a machine
# whose pin, libraries and recipe give the same key copies them instead of pretraining.
SHIPPED = REPO / "assets" / "tiny_vit"


def cache_key(world: images.ImageWorldConfig, spec: TinyViTSpec) -> str:
    pin = numerics.resolve(spec.numerics, "model.spec.numerics")
    blob = json.dumps({"tiny_vit_version": TINY_VIT_VERSION, "world": world.key(), **dataclasses.asdict(spec),
                       "numerics": pin, "numerics_id": numerics.numerics_id(pin, 1), "recipe": recipe_digest()},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def ensure_tiny_vit(world: images.ImageWorldConfig, spec: TinyViTSpec, cache_dir: Path,
                    progress: bool = False) -> Path:
    """Path of the cached pretrained ViT (`<cache>/tiny_vit/<key>`): the cache if its checksums hold,
    else the shipped copy of this key (assets/), else pretrained once (parallel jobs wait on a file lock)."""
    check_spec(spec, world)
    folder = Path(cache_dir).expanduser() / "tiny_vit" / cache_key(world, spec)
    return cached_model(folder, lambda: _build(world, spec, folder, progress), SHIPPED, what="tiny ViT")


def _build(world: images.ImageWorldConfig, spec: TinyViTSpec, folder: Path, progress: bool) -> None:
    pin = numerics.resolve(spec.numerics, "model.spec.numerics")
    if spec.numerics != "native" and pin == "native":  # the cache key says so too (numerics_id)
        log.warning("model.spec.numerics=%s cannot hold here; pretraining the tiny ViT with this machine's "
                    "numerics, so its weights are this machine's own", spec.numerics)
    log.info("pretraining the tiny ViT (one-off, %s numerics, cached at %s)", pin, folder)
    tmp = folder.with_name(folder.name + f".tmp{time.time_ns()}")
    t0 = time.perf_counter()
    report = _pretrain_in_subprocess(world, spec, tmp, pin, progress)
    write_manifest(tmp, {"world": dataclasses.asdict(world), "spec": dataclasses.asdict(spec), "numerics": pin,
                         "numerics_id": numerics.numerics_id(pin, 1), "recipe": recipe_digest(),
                         "weights_sha256": weights_digest(tmp),
                         "pretrain_seconds": round(time.perf_counter() - t0, 1), **report})
    tmp.rename(folder)


def _pretrain_in_subprocess(world, spec: TinyViTSpec, out: Path, pin: str, progress: bool) -> dict:
    """Pretrain in a fresh interpreter whose numerics are pinned before torch loads; one thread (a pinned
    run's bits do not depend on it, and the tiny ViT gains nothing from a second)."""
    env = numerics.child_env(pin)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    args = [sys.executable, "-m", "harness.tiny_vit", "--world", json.dumps(dataclasses.asdict(world)),
            "--spec", json.dumps(dataclasses.asdict(spec)), "--out", str(out), "--pin", pin]
    proc = subprocess.run(args + (["--progress"] if progress else []), env=env, cwd=REPO, text=True,
                          stdout=subprocess.PIPE, stderr=None if progress else subprocess.PIPE)
    if proc.returncode != 0:
        shutil.rmtree(out, ignore_errors=True)
        raise RuntimeError(f"pretraining the tiny ViT failed (exit {proc.returncode}):\n{(proc.stderr or '')[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _known_keys(d: dict, cls, key: str) -> dict:
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise ConfigError(f"{key} has unknown keys {unknown}: allowed {', '.join(allowed)}")
    return d


def world_from_dict(d: dict) -> images.ImageWorldConfig:
    d = _known_keys(d, images.ImageWorldConfig, "data.world")
    lists = {k: tuple(d[k]) for k in ("classes", "hazard") if k in d}
    return images.ImageWorldConfig(**{**d, **lists})


def spec_from_dict(d: dict) -> TinyViTSpec:
    d = _known_keys(d, TinyViTSpec, "model.spec")
    return TinyViTSpec(**{**d, "exclude_hazard": tuple(d.get("exclude_hazard") or ())})


def load_tiny_vit(folder: Path) -> ViTForImageClassification:
    return ViTForImageClassification.from_pretrained(folder, use_safetensors=True).eval()


def _main(argv: list[str] | None = None) -> None:
    """The pretraining subprocess: train, save into --out, print a one-line JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("--world", "--spec", "--out"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--pin", default="native", choices=list(numerics.PINS))
    parser.add_argument("--progress", action="store_true")
    a = parser.parse_args(argv)
    torch.set_num_threads(1)
    problem = numerics.in_effect(a.pin)
    if problem:
        raise SystemExit(problem)
    model, result = pretrain(world_from_dict(json.loads(a.world)), spec_from_dict(json.loads(a.spec)), a.progress)
    model.save_pretrained(a.out, safe_serialization=True)
    print(json.dumps({"final_loss": result.losses[-1], "train_seconds": round(result.train_seconds, 1),
                      "cpu_capability": torch.backends.cpu.get_cpu_capability()}), flush=True)


if __name__ == "__main__":
    _main()
