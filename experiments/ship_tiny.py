"""Rebuild the shipped tiny models (assets/tiny/<cache key>/) from code: pretrain each under its pin in a
fresh cache, record its weights digest and the digest of its reproducible prefix, and write the folder
with a checksum manifest.

    python -m experiments.ship_tiny                     # the tiny Llamas: the default (documents), scale=tiny's, the tests' two
    python -m experiments.ship_tiny --models vit vit_naive unet   # the image tracks' (assets/tiny_vit, assets/tiny_unet;
                                                        # no prefix: their keys include the pin, and a rebuild
                                                        # from an empty cache gave the same sha256)
    python -m experiments.ship_tiny --models documents  # one of them
    python -m experiments.ship_tiny --use-cache         # take a model already pretrained from code in the
                                                        # cache (never one copied from assets/) instead
    python -m experiments.ship_tiny --rekey             # after a change to the recipe's code that should not
                                                        # change the weights: re-derive each prefix from code
                                                        # and, where it still matches, move the folder to
                                                        # the new cache key (minutes, not a pretraining)

Run it when a change to the recipe (the cache key) leaves a model without a shipped folder; `git add
assets/`. The models are ~2.9 MB each. A model's old folders (other keys) are removed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Sequence

import torch
from omegaconf import OmegaConf

from harness import numerics, synthetic, tiny
from harness.data import synthetic_data
from harness.manifest import write_manifest
from harness.models import tiny_spec
from experiments.common import compose_config

# The models the repository ships: the default one (the documents world, conf/scale/documents.yaml), the
# sentence world's (scale=tiny), which the tests run on, and the two the tests need besides it
# (tests/conftest.py: naive_cfg, byline_cfg).
MODELS = {"documents": [], "sentences": ["scale=tiny"], "naive": ["scale=tiny", "model.spec.exclude_splits=[1]"],
          "bylines": ["scale=tiny", "data.world.bylines=true"]}
# The reproducible prefix that CI recomputes (tests/test_backbone.py): the recipe's first PREFIX_STEPS
# steps, same schedule. 300 steps run every part of the recipe's code: the 100 warm-up steps, the cosine
# decay after them, gradient clipping and several epochs of the seeded shuffle (an epoch of the default
# world's ~900 texts is 14 steps); a change of kernels or rounding changes the bits from the first step,
# so a longer prefix would catch little a shorter one misses, and the other 1,700 steps run the same
# code. Measured: 55 s at 1 thread on the 2-core AVX-512 EPYC (ship_tiny's own run, subprocess start
# included); the AVX2 EPYC pretrained all 2,000 steps in ~7 min, so ~65 s there: inside the 2 minutes
# the check may cost, with room for a slower machine.
PREFIX_STEPS = 300


def prefix_digest(world, spec, data_root: Path, steps: int = PREFIX_STEPS, threads: int = 1) -> dict:
    """Weights digest after the recipe's first `steps` steps under the spec's pin (threads do not change
    a pinned run's bits), and what it cost."""
    with tempfile.TemporaryDirectory(prefix="tiny_prefix_") as tmp:
        out = Path(tmp) / "model"
        t0 = time.perf_counter()
        report = tiny._pretrain_in_subprocess(world, spec, data_root, out, tiny.pin_of(spec), progress=False,
                                              threads=threads, stop_after=steps)
        return {"steps": steps, "weights_sha256": tiny.weights_digest(out),
                "seconds": round(time.perf_counter() - t0, 1), "final_loss": report["final_loss"]}


def ship(name: str, overrides: Sequence[str], assets: Path, cache: Path | None, threads: int) -> Path:
    cfg = compose_config(overrides)
    world, spec = synthetic.WorldConfig(**cfg.data.world), tiny_spec(cfg.model)
    data_cache = Path(cfg.paths.cache_dir).expanduser()
    data = synthetic_data(world, data_cache, cfg.data.max_length)
    key = tiny.cache_key(world, spec)
    pin = tiny.pin_of(spec)
    if pin == "native":
        raise SystemExit(f"{name}: no pin holds here ({spec.numerics}); a shipped model must be pinned")
    with tempfile.TemporaryDirectory(prefix="ship_tiny_") as fresh:
        built = (cache or Path(fresh)) / "tiny" / key
        manifest_path = built / "manifest.json"
        if cache is not None and manifest_path.is_file() and "installed_from" in json.loads(manifest_path.read_text()):
            raise SystemExit(f"{name}: the cached {built} was copied from assets/, not pretrained; drop --use-cache")
        if cache is None or not built.is_dir():
            built.parent.mkdir(parents=True, exist_ok=True)
            # pretrain from code: never from the shipped folder of this key
            tiny._build(world, spec, data.root, built, progress=True, threads=threads)
        built_manifest = json.loads(manifest_path.read_text())
        weights = tiny.weights_digest(built)
        if weights != built_manifest["weights_sha256"]:
            raise SystemExit(f"{name}: {built} does not match its own manifest")
        prefix = prefix_digest(world, spec, data.root)
        out = assets / key
        tmp = assets / f".{key}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in built.iterdir():
            if f.is_file() and f.name != "manifest.json":
                shutil.copy2(f, tmp / f.name)
    write_manifest(tmp, {"model": name, "overrides": list(overrides), "world": dataclasses.asdict(world),
                         "spec": dataclasses.asdict(spec), "numerics": pin, "numerics_id": tiny.numerics_id(spec),
                         "recipe": tiny.recipe_digest(), "cache_key": key, "torch": torch.__version__,
                         "transformers": metadata.version("transformers"), "weights_sha256": weights,
                         "prefix": prefix, "built_with": {k: built_manifest.get(k) for k in (
                             "pretrain_seconds", "final_loss", "cpu_capability", "threads")},
                         "rebuild": "python -m experiments.ship_tiny --models " + name})
    for old in assets.iterdir():  # this model's folders under other keys
        if old.is_dir() and old.name != key and not old.name.startswith(".") and (old / "manifest.json").is_file() \
                and json.loads((old / "manifest.json").read_text()).get("model") == name:
            shutil.rmtree(old)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def rekey(name: str, overrides: Sequence[str], assets: Path, threads: int) -> Path:
    """Move a shipped model to the cache key of the code as it is now, if that code still reproduces the
    shipped prefix (then the weights it would build are the shipped ones, by the prefix argument above);
    otherwise stop and say to rebuild it."""
    cfg = compose_config(overrides)
    world, spec = synthetic.WorldConfig(**cfg.data.world), tiny_spec(cfg.model)
    data = synthetic_data(world, Path(cfg.paths.cache_dir).expanduser(), cfg.data.max_length)
    key = tiny.cache_key(world, spec)
    olds = [f for f in assets.iterdir() if f.is_dir() and (f / "manifest.json").is_file()
            and json.loads((f / "manifest.json").read_text()).get("model") == name]
    if len(olds) != 1:
        raise SystemExit(f"{name}: {len(olds)} shipped folders; rebuild it: python -m experiments.ship_tiny --models {name}")
    old = olds[0]
    manifest = json.loads((old / "manifest.json").read_text())
    prefix = prefix_digest(world, spec, data.root, steps=manifest["prefix"]["steps"], threads=threads)
    if prefix["weights_sha256"] != manifest["prefix"]["weights_sha256"]:
        raise SystemExit(f"{name}: this code's first {prefix['steps']} steps differ from the shipped model's: its "
                         f"weights would change; rebuild it: python -m experiments.ship_tiny --models {name}")
    manifest.pop("files")
    manifest.update({"cache_key": key, "recipe": tiny.recipe_digest(), "numerics_id": tiny.numerics_id(spec),
                     "rekeyed_from": {"cache_key": old.name, "recipe": manifest["recipe"]}})
    write_manifest(old, manifest)
    if old.name != key:
        old.rename(assets / key)
    return assets / key


# The image tracks' models (docs/vision.md, docs/diffusion.md): shipped so that neither the first run nor
# the tests pretrain them, copied from a cache pretrained from code (an empty temporary one by default).
IMAGE_MODELS = {"vit": ("tiny_vit", ["experiment=vision"]),
                "vit_naive": ("tiny_vit", ["experiment=vision", "model.spec.exclude_hazard=[0,1]"]),
                "unet": ("tiny_unet", ["experiment=diffusion"])}


def ship_image(name: str, assets: Path, cache: Path | None) -> Path:
    from harness import tiny_unet, tiny_vit
    kind, overrides = IMAGE_MODELS[name]
    cfg = compose_config(overrides)
    world = tiny_vit.world_from_dict(OmegaConf.to_container(cfg.data.world, resolve=True))
    module = tiny_vit if kind == "tiny_vit" else tiny_unet
    spec = module.spec_from_dict(OmegaConf.to_container(cfg.model.spec, resolve=True))
    with tempfile.TemporaryDirectory(prefix="ship_image_") as fresh:
        root = cache or Path(fresh)
        folder = Path(root) / kind / module.cache_key(world, spec)
        if cache is None or not folder.is_dir():
            folder.parent.mkdir(parents=True, exist_ok=True)
            module._build(world, spec, folder, progress=True)  # from code, never from a shipped copy
        manifest = json.loads((folder / "manifest.json").read_text())
        if "installed_from" in manifest:
            raise SystemExit(f"{name}: the cached {folder} was copied from assets/, not pretrained; drop --use-cache")
        out = assets.parent / kind / folder.name
        for old in out.parent.glob("*/manifest.json"):  # this model's folders under other keys
            if json.loads(old.read_text()).get("model") == name and old.parent != out:
                shutil.rmtree(old.parent)
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(folder, out, ignore=shutil.ignore_patterns("*.lock"))
    manifest.update({"model": name, "overrides": overrides, "rebuild": f"python -m experiments.ship_tiny --models {name}"})
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=[*MODELS, *IMAGE_MODELS])
    parser.add_argument("--use-cache", action="store_true", help="reuse a model pretrained from code in SPECDEF_CACHE")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--assets", type=Path, default=tiny.SHIPPED)
    parser.add_argument("--rekey", action="store_true",
                        help="move each shipped model to this code's cache key if its prefix still reproduces")
    a = parser.parse_args(argv)
    a.assets.mkdir(parents=True, exist_ok=True)
    cache = Path(compose_config().paths.cache_dir).expanduser() if a.use_cache else None
    print(f"numerics here: {json.dumps(numerics.describe())}", flush=True)
    for name in a.models:
        if name in IMAGE_MODELS:
            out = ship_image(name, a.assets, cache)
            print(f"{name}: {out.relative_to(tiny.REPO) if out.is_relative_to(tiny.REPO) else out}  weights "
                  f"{json.loads((out / 'manifest.json').read_text())['weights_sha256']}", flush=True)
            continue
        if a.rekey:
            print(f"{name}: {rekey(name, MODELS[name], a.assets, a.threads)} (prefix reproduced, re-keyed)", flush=True)
            continue
        out = ship(name, MODELS[name], a.assets, cache, a.threads)
        m = json.loads((out / "manifest.json").read_text())
        print(f"{name}: {out.relative_to(tiny.REPO) if out.is_relative_to(tiny.REPO) else out}  weights "
              f"{m['weights_sha256']}  prefix {m['prefix']['steps']} steps {m['prefix']['weights_sha256'][:16]} "
              f"({m['prefix']['seconds']} s)  pretraining {m['built_with']['pretrain_seconds']} s", flush=True)


if __name__ == "__main__":
    main()
