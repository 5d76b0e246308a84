"""LoRA on a SpecDef model: where the adapter of a defended layer sits.

peft knows nn.Linear and Conv1D, not `SpecDefLinear` (`comp(inner(x))`), so LoRA with the usual
targets stopped with "Target module SpecDefLinear(...) is not supported". A defended layer matched by
`target_modules` now gets its adapter at one of four places (`attack.lora_placement`):

- `around`: one adapter around the whole defended layer, y = C·W′x + B·A·x. This is the natural
  reading of "LoRA on down_proj": the adapter sees the layer's input and output and never the
  amplified weight W′, so its loss landscape is the undefended model's. It is registered with peft
  through peft's own extension point (`LoraConfig._register_custom_module`), not by patching peft.
- `inner`: peft's own LoRA on the amplified layer W′ (y = C·(W′ + B·A)x): the adapter's output is
  multiplied by C, whose top-k singular values are 1/α.
- `comp`: peft's own LoRA on the compensation C (y = (C + B·A)·W′x): its input is amplified by α.
- `parts`: both of the above.

Layers that are not defended keep peft's behaviour. The chosen placement and the defended layers it
touched are recorded with the attack.
"""
from __future__ import annotations

import copy

from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists
from torch import nn
from transformers.pytorch_utils import Conv1D

from harness.errors import ConfigError
from specdef.modules import SpecDefExperts, SpecDefLinear, SpecDefModule

PARTS = {"inner": ("inner",), "comp": ("comp",), "parts": ("inner", "comp")}


class LoraAroundSpecDef(LoraLinear):
    """peft's LoRA Linear around a whole defended layer: base_layer(x) + B·A·x, with A and B sized by
    the defended layer's input and output (the compensation's output). Its forward is peft's own."""

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        out_features = module.comp.out_features
        inner = module.inner
        if isinstance(inner, nn.Linear):
            return inner.in_features, out_features
        if isinstance(inner, Conv1D):  # weight stored (in, out)
            return inner.weight.shape[0], out_features
        # an experts module maps hidden states to hidden states: the adapter is dense beside the mixture
        return out_features, out_features

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        # C·W′ + B·A has no single weight to merge into without undoing the defense (attacks.undo)
        raise NotImplementedError("a LoRA adapter around a SpecDef layer cannot be merged into it")

    def unmerge(self) -> None:
        raise NotImplementedError("a LoRA adapter around a SpecDef layer is never merged")


def place_adapters(model: nn.Module, config, placement: str):
    """(a copy of the LoRA config whose targets put each matched defended layer's adapter at
    `placement`, the names of the defended layers it touches). Undefended models get `config` back."""
    defended = [n for n, m in model.named_modules() if isinstance(m, SpecDefModule)]
    if not defended:
        return config, []
    config = _maybe_include_all_linear_layers(copy.deepcopy(config), model)
    targets, touched = [], []
    for name, _ in model.named_modules():
        if not name or not check_target_module_exists(config, name):
            continue
        owner = _defended_owner(name, defended)
        if owner is None:
            targets.append(name)
        elif owner not in touched:
            touched.append(owner)
            targets += [owner] if placement == "around" else [f"{owner}.{p}" for p in PARTS[placement]]
    if not targets:
        raise ConfigError(f"attack.peft.target_modules={config.target_modules!r}: matches no module of the "
                          f"model; allowed module names such as {', '.join(defended[-3:])}")
    # full names: peft matches a target by equality or by suffix, so no other module is caught
    config.target_modules = targets
    config.exclude_modules = None
    if placement == "around":
        config._register_custom_module({SpecDefLinear: LoraAroundSpecDef, SpecDefExperts: LoraAroundSpecDef})
    return config, touched


def _defended_owner(name: str, defended: list[str]) -> str | None:
    """The defended layer `name` is, or is a part of (its inner layer, compensation, or within)."""
    for owner in defended:
        if name == owner or name.startswith(f"{owner}."):
            return owner
    return None
