"""SpecDef on a vision transformer: the same transform (specdef.core), with the ViT's layers and an image drift.

The defended layers default to SpecDef's defaults, which already hold the MLP output projection of
every block of a transformers (>= 5) ViT: `vit.layers.<i>.mlp.fc2` (`*.fc2`, as for OPT and Phi), the
analogue of a decoder's down_proj; a default that misses a block is named in a warning. The function drift is measured on the image world's eval images, as logits of the classifier,
with the same statistics as on text (specdef.drift).
"""
from __future__ import annotations

import torch
from torch import nn

from harness.errors import ConfigError
from harness.images import pixel_values
from specdef.defense import SpecDef
from specdef.drift import _accumulate, _summarise, swapped


@torch.no_grad()
def image_drift(model: nn.Module, images: torch.Tensor, originals: dict[str, nn.Module], batch_size: int = 128) -> dict:
    """max |Δlogit|, mean KL and ‖Δ‖ / ‖logits‖ of the classifier's logits on `images` (uint8), original
    (the replaced modules swapped back in) vs defended; `tokens` counts images."""
    was_training = model.training
    model.eval()
    acc = {"max": 0.0, "kl": 0.0, "diff2": 0.0, "ref2": 0.0, "tokens": 0}
    for i in range(0, len(images), batch_size):
        x = pixel_values(images[i:i + batch_size]).to(next(model.parameters()).device)
        with swapped(model, originals):
            ref = model(pixel_values=x).logits
        out = model(pixel_values=x).logits
        _accumulate(acc, ref, out, torch.ones(len(x), dtype=torch.bool, device=x.device))
    model.train(was_training)
    return _summarise(acc, dtype=next(model.parameters()).dtype)


class SpecDefViT(SpecDef):
    """SpecDef of the vision track: SpecDef's arguments and default layers, the drift measured on
    `drift_samples` eval images. A base defense and a release folder are language-track features
    here: asking for them stops before any work."""

    def __init__(self, alpha: float, k: int, layers=None, *, base=None, save_dir=None, **kwargs):
        for key, value in (("base", base), ("save_dir", save_dir)):
            if value is not None:
                raise ConfigError(f"defense.{key}={value!r}: allowed null for the vision track's SpecDef "
                                  "(a base defense and a release folder are language-track features)")
        super().__init__(alpha, k, layers=layers, **kwargs)

    def measure_drift(self, model, tokenizer, data, originals: dict) -> dict:
        return image_drift(model, data.eval_images[: self.drift_samples], originals)
