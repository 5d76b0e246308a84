"""The image tracks' tiny models ship in assets/ (experiments/ship_tiny.py --models vit vit_naive unet): an
empty cache on a machine whose pin and libraries give the shipped key copies them, verified, instead of
pretraining (~6 min on one core for the three)."""
from __future__ import annotations

import json

import pytest

from harness import tiny_unet, tiny_vit
from harness.images import ImageWorldConfig
from harness.tiny import weights_digest

MODELS = [(tiny_vit, tiny_vit.TinyViTSpec(), "model.safetensors"),
          (tiny_vit, tiny_vit.TinyViTSpec(exclude_hazard=(0, 1)), "model.safetensors"),
          (tiny_unet, tiny_unet.TinyUNetSpec(), tiny_unet.WEIGHTS)]


@pytest.mark.parametrize("module, spec, weights", MODELS, ids=["vit", "vit_naive", "unet"])
def test_an_empty_cache_installs_the_shipped_model(module, spec, weights, tmp_path, monkeypatch):
    key = module.cache_key(ImageWorldConfig(), spec)
    shipped = [m.parent.name for m in module.SHIPPED.glob("*/manifest.json")]
    if key not in shipped:
        pytest.skip(f"no shipped model for this machine's key {key} (shipped: {shipped}); it pretrains instead")
    monkeypatch.setattr(module, "_build", lambda *a, **k: pytest.fail("pretrained instead of installing"))
    ensure = module.ensure_tiny_vit if module is tiny_vit else module.ensure_tiny_unet
    folder = ensure(ImageWorldConfig(), spec, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["installed_from"] == f"assets/{module.SHIPPED.name}/{key}"
    assert weights_digest(folder, weights) == manifest["weights_sha256"]


def test_a_corrupt_shipped_model_is_refused_and_pretrained(tmp_path, monkeypatch):
    import shutil
    spec = tiny_vit.TinyViTSpec()
    key = tiny_vit.cache_key(ImageWorldConfig(), spec)
    if not (tiny_vit.SHIPPED / key).is_dir():
        pytest.skip("no shipped ViT for this machine's key")
    assets = tmp_path / "assets"
    shutil.copytree(tiny_vit.SHIPPED / key, assets / key)
    (assets / key / "config.json").write_text("{}")
    monkeypatch.setattr(tiny_vit, "SHIPPED", assets)
    built = []
    monkeypatch.setattr(tiny_vit, "_build", lambda world, spec, folder, progress: built.append(folder))
    tiny_vit.ensure_tiny_vit(ImageWorldConfig(), spec, tmp_path / "cache")
    assert len(built) == 1
