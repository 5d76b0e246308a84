"""Attacks that undo SpecDef before fine-tuning (the paper's "limits" result).

Threat model: the attacker has the released weights and the architecture, so every compensated
layer is visible as a layer followed by a square, bias-free Linear (`.inner`/`.comp` of SpecDefLinear
for nn.Linear and Conv1D, of SpecDefExperts for MoE experts, whose C follows the expert mixture).
Neither attack reads the α, k or method that the release stores for bookkeeping.

- `collapse`: the layer-collapse (layer-injection) attack. Merge C into W': W ← C·W', b ← C·b'
  (for experts into every expert's down projection and bias: C·Σₑ gₑ(Wₑ'hₑ + bₑ') = Σₑ gₑ C(Wₑ'hₑ + bₑ')).
  Exact in float64 and back to the plain architecture and parameter count.
- `spectral_inverse`: re-apply a SpecDef-type transform with 1/α on the amplified subspace. The
  subspace and α are read off C's spectrum: C = I − (1 − 1/α) P is symmetric with eigenvalue 1/α on
  the amplified k-dimensional subspace and 1 elsewhere, so its eigenvectors away from 1 give U and
  their eigenvalues give 1/α (or pass `alpha` when it is known). Then W ← (I + (1/α − 1) P) W' and C
  is dropped, as (for the exact α and P) it has become the identity.
"""
from __future__ import annotations

import torch
from torch import nn

from harness.errors import ConfigError
from specdef.core import CHUNK, amplify_, set_module, specdef_modules
from specdef.modules import output_weights

UNDO = (None, "collapse", "spectral")


@torch.no_grad()
def collapse_layer(module) -> nn.Module:
    """The inner layer with C merged into its output projection: every Wₑ ← C·Wₑ, bₑ ← C·bₑ (in float64,
    in place, in blocks of CHUNK columns). For experts this is the shared C merged into each expert."""
    c = module.comp.weight.double()
    weight, bias = output_weights(module.inner)
    for e in range(weight.shape[0]):
        for j in range(0, weight.shape[2], CHUNK):
            block = weight[e, :, j:j + CHUNK]
            block.copy_(c @ block.double())
    if bias is not None:
        bias.copy_(bias.double() @ c.T)
    return module.inner


def collapse(model: nn.Module) -> nn.Module:
    """Replace every compensated layer by its inner layer with C merged in (in place); returns the model."""
    for name, module in specdef_modules(model):
        set_module(model, name, collapse_layer(module))
    return model


def amplified_subspace(comp_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, eigenvalues) of C's eigenvectors in the cluster near 1/α: the amplified subspace.

    The cut is halfway between C's smallest eigenvalue and 1, so it separates 1/α from 1 whenever
    rounding of the stored C moves eigenvalues by less than (1 − 1/α)/2 (α ≥ ~2 in float32; bfloat16
    rounding of a 4096 x 4096 C is ~0.1). Nothing is returned when C is I to 100 eps of its dtype.
    """
    c = comp_weight.detach().double()
    evals, evecs = torch.linalg.eigh((c + c.T) / 2)  # symmetric by construction; symmetrise the rounding
    lowest = float(evals[0])
    if 1 - lowest <= 100 * torch.finfo(comp_weight.dtype).eps:
        return evecs[:, :0], evals[:0]
    amplified = evals < (lowest + 1) / 2
    return evecs[:, amplified], evals[amplified]


@torch.no_grad()
def spectral_inverse_layer(module, alpha: float | None = None) -> tuple[nn.Module, dict]:
    """The inner layer with its output projection shrunk by 1/α̂ on the subspace read off C (in place)."""
    u, evals = amplified_subspace(module.comp.weight)
    alpha_hat = float(alpha) if alpha is not None else float(1 / evals.mean()) if evals.numel() else 1.0
    if u.shape[1]:
        amplify_(*output_weights(module.inner), u, 1 / alpha_hat)
    return module.inner, {"k_hat": int(u.shape[1]), "alpha_hat": alpha_hat}


def spectral_inverse(model: nn.Module, alpha: float | None = None) -> nn.Module:
    """Undo SpecDef with a SpecDef-type transform (α → 1/α) on each compensated layer, in place.

    The estimates per layer are left in `model.undo_estimates` (name -> {k_hat, alpha_hat}).
    """
    estimates = {}
    for name, module in specdef_modules(model):
        layer, estimates[name] = spectral_inverse_layer(module, alpha)
        set_module(model, name, layer)
    model.undo_estimates = estimates
    return model


def apply_undo(model: nn.Module, name: str | None) -> nn.Module:
    """`undo=null|collapse|spectral` before an attack fine-tunes the model."""
    if name is None:
        return model
    if name == "collapse":
        return collapse(model)
    if name == "spectral":
        return spectral_inverse(model)
    raise ConfigError(f"attack.undo={name!r}: allowed null, collapse, spectral")
