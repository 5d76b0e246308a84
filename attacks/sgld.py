"""SGLD (Welling & Teh 2011): stochastic gradient Langevin dynamics, the noisy / randomised attacker.

    θ ← θ − lr · (∇L(θ) + weight_decay · θ) + sqrt(2 · lr / temperature) · ξ,   ξ ~ N(0, I)

The loop's loss L is a mean over the batch's tokens (harness.train.lm_loss), so temperature T samples
from exp(−T · L) and counts tokens, not texts: T = 1 weighs the whole likelihood as one token's
evidence, T = N (the number of loss-bearing tokens of the relearning set) is the Bayesian posterior of
the whole set (flat prior, exp(−Σ token NLL)), T = n (its number of texts) is that posterior tempered
by the mean text length (N / n tokens), and T → ∞ is plain SGD. lr is the scheduled lr of the
parameter's group, so a schedule scales the noise with the step. ξ is drawn from (seed, step)
(attacks.noise), so runs and resumed runs are reproducible. No well-kept torch library ships SGLD
(pytorch_optimizer 4.1 has none), hence this small implementation behind torch's optimizer interface.
"""
from __future__ import annotations

import math

import torch

from attacks.noise import gaussians


class SGLD(torch.optim.Optimizer):
    states_per_parameter = 0  # the noise is drawn from (seed, step): no momentum (the memory plan)

    def __init__(self, params, lr: float = 1e-3, temperature: float = 1.0, weight_decay: float = 0.0, seed: int = 0):
        if not (lr > 0 and temperature > 0 and weight_decay >= 0):
            raise ValueError(f"SGLD: lr={lr}, temperature={temperature}, weight_decay={weight_decay}: allowed "
                             "lr > 0, temperature > 0, weight_decay >= 0")
        super().__init__(params, dict(lr=lr, temperature=temperature, weight_decay=weight_decay, step=0))
        self.seed = int(seed)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        t = self.param_groups[0]["step"]
        for p, noise in zip(params, gaussians(params, self.seed, t)):
            group = group_of[id(p)]
            lr = group["lr"]
            p.add_(p.grad + group["weight_decay"] * p, alpha=-lr)
            p.add_(noise, alpha=math.sqrt(2 * lr / group["temperature"]))
        for group in self.param_groups:
            group["step"] = t + 1
        return loss
