"""NPO, Negative Preference Optimization (Zhang et al. 2024, licong-lin/negative-preference-optimization),
in its grad-diff form (`npo_grad_diff`: an NLL term on retain text keeps utility).

With the reference policy π_ref = the model before unlearning and sequence log-likelihoods
log π(y|x) = −NLL(y|x) summed over the tokens:

    L_NPO = −(2/β) E_forget[ log σ(−β · log(π_θ/π_ref)) ]
          = −(2/β) E_forget[ log σ( β · (NLL_θ − NLL_ref)) ]      (what the original code computes)
          =  (2/β) E_forget[ log(1 + (π_θ/π_ref)^β) ]

As β → 0 it tends to gradient ascent on the forget NLL (up to a constant); for β > 0 each
sequence's gradient is weighted by σ(β·log(π_θ/π_ref)), which vanishes once it is forgotten: the
property that keeps NPO from collapsing the way gradient ascent does.

    L = npo_coeff · L_NPO + retain_coeff · NLL_θ(retain)

Schedule as the original's HF Trainer runs it: linear warm-up over one epoch of the forget set,
then linear decay to 0, gradient norm clipped at 1.0.
"""
from __future__ import annotations

import logging
import time
from typing import Sequence

import math

import torch
import torch.nn.functional as F

from baselines.common import (BATCH_SIZE, LR, STEPS, TermLog, adamw, forget_retain_batches, forget_texts, frozen_copy,
                              mean_nll, rules_hook, run_info, sequence_nll)
from harness import distributed
from harness.memory import Costs, Shape, Stage, training_stage
from harness.rules import non_negative
from harness.train import lr_lambda, train_loop

log = logging.getLogger(__name__)


def npo_loss(nll: torch.Tensor, nll_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """(2/β) · mean log(1 + (π_θ/π_ref)^β) from summed sequence NLLs (B,) of the model and the reference."""
    return -(2.0 / beta) * distributed.batch_mean(F.logsigmoid(beta * (nll - nll_ref)))


class NPO:
    name = "npo"

    # Hooks (harness/hooks.py): what the runner asks of the defense before anything is built.
    check_config = rules_hook(STEPS, BATCH_SIZE, LR, ("warmup_epochs", non_negative, "a number >= 0"), text=True)

    @classmethod
    def memory_stages(cls, node, shape: Shape, c: Costs) -> list[Stage]:
        """Every weight trains, against a frozen reference copy."""
        batch = int(node.get("batch_size", 1))
        return [training_stage(cls.name, c, shape.params, shape.params, {
            "frozen copy": c.weights(shape.params), "activations": c.activations(batch, forwards=2)})]

    def __init__(self, beta: float, npo_coeff: float, retain_coeff: float, lr: float, weight_decay: float,
                 steps: int, batch_size: int, grad_accum: int = 1, warmup_epochs: float = 1.0,
                 max_grad_norm: float | None = 1.0, forget_splits: Sequence[int] = (0, 1), seed: int = 0):
        self.beta, self.npo_coeff, self.retain_coeff = beta, npo_coeff, retain_coeff
        self.lr, self.weight_decay = lr, weight_decay
        self.warmup_epochs, self.max_grad_norm = warmup_epochs, max_grad_norm
        self.steps, self.batch_size, self.grad_accum = steps, batch_size, grad_accum
        self.forget_splits = list(forget_splits)
        self.seed = seed
        self.info: dict = {}

    def warmup_steps(self, n_forget: int) -> int:
        """Optimizer steps in `warmup_epochs` passes over `n_forget` texts, capped at the run's length."""
        per_epoch = math.ceil(n_forget / (self.batch_size * self.grad_accum))
        return min(self.steps, round(self.warmup_epochs * per_epoch))

    def loss(self, model, ref, terms: TermLog, batch: dict) -> torch.Tensor:
        f, r = batch["forget"], batch["retain"]
        nll = sequence_nll(model(input_ids=f["input_ids"], attention_mask=f["attention_mask"]).logits, f["labels"])
        with torch.no_grad():
            nll_ref = sequence_nll(ref(input_ids=f["input_ids"], attention_mask=f["attention_mask"]).logits,
                                   f["labels"])
        forget = npo_loss(nll, nll_ref, self.beta)
        retain = mean_nll(model(input_ids=r["input_ids"], attention_mask=r["attention_mask"]).logits, r["labels"])
        terms(npo=forget, retain_nll=retain, forget_nll_gain=distributed.batch_mean(nll - nll_ref))
        return self.npo_coeff * forget + self.retain_coeff * retain

    def __call__(self, model, tokenizer, data):
        t0 = time.perf_counter()
        torch.manual_seed(self.seed)
        ref = frozen_copy(model)
        forget = forget_texts(data, self.forget_splits)
        batches = forget_retain_batches(tokenizer, forget, data.retain, self.batch_size, data.max_length,
                                        self.seed, model.device)
        warmup = self.warmup_steps(len(forget))
        terms = TermLog()
        with distributed.sharded(model) as trained:  # dist=fsdp: a sharded twin, written back at the end
            opt = adamw([p for p in trained.parameters() if p.requires_grad], self.lr, self.weight_decay)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("linear", warmup, self.steps))
            result = train_loop(trained, batches, lambda m, b: self.loss(m, ref, terms, b), [opt],
                                schedulers=[sched], steps=self.steps, grad_accum=self.grad_accum,
                                max_grad_norm=self.max_grad_norm, desc="defense npo")
        self.info = run_info(t0, {"train": result}, terms, warmup_steps=warmup)
        log.info("npo: %s", self.info)
        return model
