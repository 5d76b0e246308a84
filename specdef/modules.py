"""What SpecDef can defend, and the modules that hold a defended layer with its compensation.

A defendable layer ends in an output projection y = W h + b that SpecDef amplifies and one square,
bias-free Linear C after it undoes. Three kinds, each seen as a batch of E matrices (E, out, in):
- `nn.Linear` (E = 1);
- transformers `Conv1D` (GPT-2 family), whose weight is stored transposed (in, out) (E = 1);
- a mixture-of-experts experts module with fused 3-D parameters (Mixtral, Qwen2/3-MoE, OLMoE,
  DeepSeek-V3, GPT-OSS; any class built with transformers' `use_experts_implementation`). Its output
  is Σₑ gₑ (Wₑ hₑ + bₑ) with scalar router weights gₑ, so amplifying every expert's `down_proj`
  in one shared subspace U gives A·Σₑ gₑ (Wₑ hₑ + bₑ) with A = I + (α−1)UUᵀ, and one C = A⁻¹ after
  the mixture is exact. The experts module keeps its own forward (grouped matmul or whichever
  `experts_implementation` the model uses); C costs out² parameters per layer, where a compensation
  per expert would cost E·out² and would have to sit inside the experts kernel.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


class SpecDefModule(nn.Module):
    """`comp(inner(...))`: the amplified layer followed by its compensation (a square, bias-free Linear).

    `alpha`, `k` and `method` are kept for the release manifest and the run record only; the forward
    pass and the attacks in `attacks.undo` never read them.
    """

    def __init__(self, inner: nn.Module, comp: nn.Linear, alpha: float, k: int, method: str):
        super().__init__()
        self.inner, self.comp = inner, comp
        self.alpha, self.k, self.method = float(alpha), int(k), method

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.comp(self.inner(*args, **kwargs))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}, k={self.k}, method={self.method}"


class SpecDefLinear(SpecDefModule):
    """A defended nn.Linear or transformers Conv1D."""


class SpecDefExperts(SpecDefModule):
    """A defended mixture-of-experts experts module: its own forward, then one compensation."""


def is_experts(module: nn.Module) -> bool:
    """An experts module with fused 3-D expert weights in the layout `use_experts_implementation` declares."""
    down = getattr(module, "down_proj", None)
    return isinstance(down, nn.Parameter) and down.dim() == 3 and hasattr(module, "is_transposed")


def kind(module: nn.Module) -> str | None:
    """'linear', 'conv1d', 'experts', or None for a module SpecDef cannot defend."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, Conv1D):
        return "conv1d"
    if is_experts(module):
        return "experts"
    return None


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a module of a defendable kind still cannot be defended exactly, or None."""
    if is_experts(module) and getattr(module, "has_post_expert_norm", False):
        return "it normalises each expert's output after down_proj, so no compensation after the mixture is exact"
    return None


def output_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W, b): the output projection as an (E, out, in) view of the stored weight and its bias as an
    (E, out) view, or None. Views share storage, so in-place updates change the module's parameters."""
    if isinstance(module, nn.Linear):
        w, b = module.weight.detach().unsqueeze(0), module.bias
    elif isinstance(module, Conv1D):
        w, b = module.weight.detach().T.unsqueeze(0), module.bias
    elif is_experts(module):
        w = module.down_proj.detach()
        w = w.transpose(1, 2) if module.is_transposed else w
        return w, module.down_proj_bias.detach() if getattr(module, "has_bias", False) else None
    else:
        raise TypeError(f"{type(module).__name__} has no output projection SpecDef knows")
    return w, None if b is None else b.detach().unsqueeze(0)


def wrap(inner: nn.Module, comp: nn.Linear, alpha: float, k: int, method: str) -> SpecDefModule:
    cls = SpecDefExperts if is_experts(inner) else SpecDefLinear
    return cls(inner, comp, alpha, k, method)
