"""MeZO (Malladi et al. 2023): zeroth-order SGD with the SPSA gradient estimate, no backward pass.

Each step draws z ~ N(0, I) over all trainable parameters from a seed (attacks.noise), evaluates the
loss at θ + εz and θ − εz (two forward passes of the same batch through the loop's closure), and
moves along z by the projected gradient g = (L(θ + εz) − L(θ − εz)) / 2ε:

    θ ← θ − lr · (g · z + weight_decay · θ)

θ is perturbed and restored in place, as in the paper, so memory is that of inference; z is
regenerated from its seed rather than stored. Restoring in place is not exact: θ goes through three
roundings (to θ + εz, to θ − εz, back to θ), so each step leaves every weight off by up to about
1.5 ulp of the largest of |θ ± εz| and |θ| (one or two units of θ's last place where ε|z| < |θ|; more
for the weights smaller than ε|z|), whatever the estimate. On float32 weights of ordinary size that
is far below a step at MeZO's learning rates; in bfloat16, or on SpecDef's α-amplified weights (ulp
grows with |θ|), it can exceed the step itself. `exact_restore=True` keeps a copy of the trained
weights during each step and restores from it, bit for bit (memory: one more copy of them). No
well-kept library implements MeZO for torch models (the authors' code patches the HF Trainer), so
this is a small implementation behind torch's optimizer interface.

A step whose estimate is not finite (the loss at θ + εz or θ − εz overflowed) is skipped with θ
restored, and returns a NaN loss so that the loop stops: the loss at θ itself was never computed,
so the step is recorded as a probe overflow (`probe_overflow`: the step and both probe losses; the
relearning attack evaluates θ and records it as its stop reason, a † only if θ itself is broken), not
as a non-finite loss of θ. With dropout the two passes see different masks; the models this harness
attacks use none.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from attacks.noise import gaussians


class MeZO(torch.optim.Optimizer):
    forward_only = True  # harness.train.train_loop calls step(closure) and never backward

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0, seed: int = 0,
                 exact_restore: bool = False):
        if not (lr > 0 and eps > 0 and weight_decay >= 0):
            raise ValueError(f"MeZO: lr={lr}, eps={eps}, weight_decay={weight_decay}: allowed lr > 0, eps > 0, "
                             "weight_decay >= 0")
        # `step` lives in the param group so a checkpoint (state_dict) carries it to a resumed run
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, step=0))
        self.eps, self.seed, self.exact_restore = float(eps), int(seed), bool(exact_restore)
        self.probe_overflow: dict | None = None  # the last step's, when its probe losses were not finite

    @staticmethod
    def states_per_parameter(node) -> int:
        """State per trained parameter for the memory plan: none (z is redrawn from its seed), or with
        `exact_restore` the copy of θ each step keeps."""
        return int(bool((node or {}).get("exact_restore", False)))

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    @torch.no_grad()
    def _perturb(self, step: int, scale: float) -> None:
        params = self._params()
        for p, z in zip(params, gaussians(params, self.seed, step)):
            p.add_(z, alpha=scale * self.eps)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        if closure is None:
            raise RuntimeError("MeZO.step needs a closure returning the loss (it evaluates it at two points)")
        t = self.param_groups[0]["step"]
        saved = [p.detach().clone() for p in self._params()] if self.exact_restore else None
        self._perturb(t, +1.0)
        loss_plus = closure()
        self._perturb(t, -2.0)
        loss_minus = closure()
        if saved is None:
            self._perturb(t, +1.0)
        else:
            for p, copy in zip(self._params(), saved):
                p.copy_(copy)
            del saved
        projected = float(loss_plus - loss_minus) / (2 * self.eps)
        if not math.isfinite(projected):  # θ is back where it was; the loop stops on this NaN
            self.probe_overflow = {"step": t + 1, "loss_plus": float(loss_plus), "loss_minus": float(loss_minus)}
            return torch.tensor(float("nan"))
        self.probe_overflow = None
        params = self._params()
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for p, z in zip(params, gaussians(params, self.seed, t)):
            group = group_of[id(p)]
            p.mul_(1 - group["lr"] * group["weight_decay"]).add_(z, alpha=-group["lr"] * projected)
        for group in self.param_groups:
            group["step"] = t + 1
        return (loss_plus + loss_minus) / 2
