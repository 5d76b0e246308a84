"""A SpecDef release loads with every parameter trainable, as the defended model was: the defended-model
cache of a sweep goes through it, and a frozen compensation would change what full fine-tuning trains."""
from __future__ import annotations

from specdef.core import transform
from specdef.release import load_defended, save_defended


def test_a_loaded_release_trains_its_compensation_layers(tiny_model, tmp_path):
    model, _ = tiny_model
    transform(model, alpha=1e4, k=8, layers=["model.layers.*.mlp.down_proj"])
    loaded, _ = load_defended(save_defended(model, None, tmp_path / "release"))
    frozen = [n for n, p in loaded.named_parameters() if not p.requires_grad]
    assert not frozen, frozen
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
