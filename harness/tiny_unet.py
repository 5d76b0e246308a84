"""The tiny class-conditioned denoiser of the diffusion track's embedded default: built offline, trained once, cached.

A `diffusers` UNet2DModel (no hand-written UNet) with one class embedding per class of the image world
plus a "null" class, and a DDPMScheduler, pretrained on the world (harness/diffusion.py) through the one
training loop with the same machinery as the tiny ViT (harness/tiny_vit.py): a subprocess whose numerics
are pinned before torch loads, a cache folder keyed by everything that decides the weights (world,
architecture, recipe and its source, the pin, library versions), written to a temporary folder, renamed
into place and checked against a manifest of sha256 checksums on every load. The folder holds the UNet
and the scheduler side by side (diffusers' `config.json`, `diffusion_pytorch_model.safetensors`,
`scheduler_config.json`).

Sizes measured on one core of a busy 2-core EPYC (batch 64, one training step): 32x32 with channels
(32, 64) 2.0 s, 32x32 with (16, 32) 0.83 s, 16x16 with (16, 32) 0.21 s. The default is the last: 16x16
images (the ViT still classifies them, upsampled, at 0.98), channels (16, 32), self-attention at the
8x8 level, batch 32.
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
from importlib import metadata
from pathlib import Path

import torch

from harness import diffusion, images, numerics
from harness.errors import ConfigError
from harness.manifest import write_manifest
from harness.tiny import REPO, cached_model, weights_digest
from harness.train import lr_lambda, train_loop

log = logging.getLogger(__name__)
TINY_UNET_VERSION = 1
NUMERICS = (*numerics.PINS, numerics.MACHINE)
WEIGHTS = "diffusion_pytorch_model.safetensors"
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclasses.dataclass(frozen=True)
class TinyUNetSpec:
    resolution: int = 16                       # images are the world's, block-averaged to this size
    block_out_channels: tuple[int, ...] = (16, 32)
    attention: tuple[bool, ...] = (False, True)  # self-attention in each resolution level's blocks
    layers_per_block: int = 1
    norm_num_groups: int = 8
    attention_head_dim: int = 16
    train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"   # the cosine schedule: better than linear on small images
    cond_dropout: float = 0.1                  # share of labels dropped to the null class
    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    numerics: str = "machine"                  # a pin of harness/numerics.py, or machine


def unet_config(spec: TinyUNetSpec, world: images.ImageWorldConfig) -> dict:
    levels = len(spec.block_out_channels)
    return {"sample_size": spec.resolution, "in_channels": 3, "out_channels": 3,
            "layers_per_block": spec.layers_per_block, "block_out_channels": list(spec.block_out_channels),
            "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in spec.attention],
            "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(spec.attention)][:levels],
            "num_class_embeds": len(world.classes) + 1,  # + the null class
            "norm_num_groups": spec.norm_num_groups, "attention_head_dim": spec.attention_head_dim}


def scheduler_of(spec: TinyUNetSpec):
    from diffusers import DDPMScheduler
    return DDPMScheduler(num_train_timesteps=spec.train_timesteps, beta_schedule=spec.beta_schedule,
                         prediction_type="epsilon")


def untrained(spec: TinyUNetSpec, world: images.ImageWorldConfig):
    from diffusers import UNet2DModel
    torch.manual_seed(spec.seed)
    return UNet2DModel(**unet_config(spec, world)).eval()


def world_data(world: images.ImageWorldConfig, spec: TinyUNetSpec) -> diffusion.DiffusionData:
    return diffusion.DiffusionData(images.image_data(world), spec.resolution, scheduler_of(spec), spec.cond_dropout)


def pretrain(world: images.ImageWorldConfig, spec: TinyUNetSpec, progress: bool = False):
    model = untrained(spec, world)
    data = world_data(world, spec)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("cosine", spec.warmup_steps, spec.steps))
    batches = data.batches(list(range(len(world.classes))), spec.batch_size, spec.seed)
    result = train_loop(model, batches, diffusion.denoising_loss, [opt], schedulers=[sched], steps=spec.steps,
                        max_grad_norm=spec.max_grad_norm, desc="pretrain tiny unet", progress=progress)
    return model, result


def recipe_digest() -> str:
    """sha256 of the source that turns a spec into weights (an edit to it is a new model)."""
    from harness import train
    parts = (TinyUNetSpec, unet_config, scheduler_of, untrained, world_data, pretrain, train.train_loop,
             train._accumulate_gradients, train.lr_lambda, images.pixel_values, diffusion.to_model_space,
             diffusion.noised_batches, diffusion.denoising_loss, diffusion.DiffusionData.model_images,
             diffusion.DiffusionData.batches)
    h = hashlib.sha256()
    for part in parts:
        h.update(inspect.getsource(part).encode())
    return h.hexdigest()[:12]


def check_spec(spec: TinyUNetSpec) -> None:
    numerics.check(spec.numerics, "model.spec.numerics", NUMERICS)
    diffusion.check_resolution(spec.resolution)
    if len(spec.attention) != len(spec.block_out_channels) or not spec.block_out_channels:
        raise ConfigError(f"model.spec.attention={list(spec.attention)}: allowed one flag per level of "
                          f"model.spec.block_out_channels={list(spec.block_out_channels)}")
    if spec.resolution % 2 ** (len(spec.block_out_channels) - 1):
        raise ConfigError(f"model.spec.resolution={spec.resolution}: allowed a multiple of "
                          f"{2 ** (len(spec.block_out_channels) - 1)} for {len(spec.block_out_channels)} levels")
    bad = [c for c in spec.block_out_channels if c % spec.norm_num_groups or c % spec.attention_head_dim]
    if bad:
        raise ConfigError(f"model.spec.block_out_channels={list(spec.block_out_channels)}: allowed multiples of "
                          f"norm_num_groups={spec.norm_num_groups} and attention_head_dim={spec.attention_head_dim}")
    if spec.beta_schedule not in BETA_SCHEDULES:
        raise ConfigError(f"model.spec.beta_schedule={spec.beta_schedule!r}: allowed {', '.join(BETA_SCHEDULES)}")
    if not 0 <= spec.cond_dropout < 1:
        raise ConfigError(f"model.spec.cond_dropout={spec.cond_dropout!r}: allowed a number in [0, 1)")


# Shipped weights, one folder per cache key (python -m experiments.ship_tiny --models unet...): a machine
# whose pin, libraries and recipe give the same key copies them instead of pretraining.
SHIPPED = REPO / "assets" / "tiny_unet"


def cache_key(world: images.ImageWorldConfig, spec: TinyUNetSpec) -> str:
    pin = numerics.resolve(spec.numerics, "model.spec.numerics")
    blob = json.dumps({"tiny_unet_version": TINY_UNET_VERSION, "world": world.key(), **dataclasses.asdict(spec),
                       "numerics": pin, "numerics_id": numerics.numerics_id(pin, 1), "recipe": recipe_digest(),
                       "diffusers": metadata.version("diffusers")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def ensure_tiny_unet(world: images.ImageWorldConfig, spec: TinyUNetSpec, cache_dir: Path,
                     progress: bool = False) -> Path:
    """Path of the cached pretrained denoiser (`<cache>/tiny_unet/<key>`): the cache if its checksums hold,
    else the shipped copy of this key (assets/), else pretrained once (parallel jobs wait on a file lock)."""
    check_spec(spec)
    folder = Path(cache_dir).expanduser() / "tiny_unet" / cache_key(world, spec)
    return cached_model(folder, lambda: _build(world, spec, folder, progress), SHIPPED, weights=WEIGHTS, what="tiny UNet")


def _build(world: images.ImageWorldConfig, spec: TinyUNetSpec, folder: Path, progress: bool) -> None:
    pin = numerics.resolve(spec.numerics, "model.spec.numerics")
    if spec.numerics != "native" and pin == "native":
        log.warning("model.spec.numerics=%s cannot hold here; pretraining the tiny UNet with this machine's "
                    "numerics, so its weights are this machine's own", spec.numerics)
    log.info("pretraining the tiny UNet (one-off, %s numerics, cached at %s)", pin, folder)
    tmp = folder.with_name(folder.name + f".tmp{time.time_ns()}")
    t0 = time.perf_counter()
    report = _pretrain_in_subprocess(world, spec, tmp, pin, progress)
    write_manifest(tmp, {"world": dataclasses.asdict(world), "spec": dataclasses.asdict(spec), "numerics": pin,
                         "numerics_id": numerics.numerics_id(pin, 1), "recipe": recipe_digest(),
                         "diffusers": metadata.version("diffusers"), "weights_sha256": weights_digest(tmp, WEIGHTS),
                         "pretrain_seconds": round(time.perf_counter() - t0, 1), **report})
    tmp.rename(folder)


def _pretrain_in_subprocess(world, spec: TinyUNetSpec, out: Path, pin: str, progress: bool) -> dict:
    """Pretrain in a fresh interpreter whose numerics are pinned before torch loads, on one thread."""
    env = numerics.child_env(pin)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    args = [sys.executable, "-m", "harness.tiny_unet", "--world", json.dumps(dataclasses.asdict(world)),
            "--spec", json.dumps(dataclasses.asdict(spec)), "--out", str(out), "--pin", pin]
    proc = subprocess.run(args + (["--progress"] if progress else []), env=env, cwd=REPO, text=True,
                          stdout=subprocess.PIPE, stderr=None if progress else subprocess.PIPE)
    if proc.returncode != 0:
        shutil.rmtree(out, ignore_errors=True)
        raise RuntimeError(f"pretraining the tiny UNet failed (exit {proc.returncode}):\n{(proc.stderr or '')[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def spec_from_dict(d: dict) -> TinyUNetSpec:
    allowed = [f.name for f in dataclasses.fields(TinyUNetSpec)]
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise ConfigError(f"model.spec has unknown keys {unknown}: allowed {', '.join(allowed)}")
    tuples = {k: tuple(d[k]) for k in ("block_out_channels", "attention") if k in d}
    return TinyUNetSpec(**{**d, **tuples})


def load_tiny_unet(folder: Path):
    """(UNet2DModel in eval mode, DDPMScheduler) from a cache folder."""
    from diffusers import DDPMScheduler, UNet2DModel
    return (UNet2DModel.from_pretrained(folder, use_safetensors=True).eval(), DDPMScheduler.from_pretrained(folder))


def _main(argv: list[str] | None = None) -> None:
    """The pretraining subprocess: train, save into --out, print a one-line JSON report."""
    from harness.tiny_vit import world_from_dict
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
    spec = spec_from_dict(json.loads(a.spec))
    model, result = pretrain(world_from_dict(json.loads(a.world)), spec, a.progress)
    model.save_pretrained(a.out, safe_serialization=True)
    scheduler_of(spec).save_pretrained(a.out)
    print(json.dumps({"final_loss": result.losses[-1], "train_seconds": round(result.train_seconds, 1),
                      "cpu_capability": torch.backends.cpu.get_cpu_capability()}), flush=True)


if __name__ == "__main__":
    _main()
