"""RMU, Representation Misdirection for Unlearning (Li et al. 2024, the WMDP paper).

On forget text, the output of decoder layer `layer_id` is steered to a fixed random direction
c·u; on retain text it is held to a frozen copy's. Only the MLP down projections of
`param_layers` train, so the change stays local to the layers that feed the steered one.

    L = mean_t ||h_θ(x_f)_t − c·u||² / d  +  α · mean_t ||h_θ(x_r)_t − h_frozen(x_r)_t||² / d

(F.mse_loss averages over tokens and hidden units, as the original does; padding is left out).
The retain text is general text, as in the original (Wikitext): `data.unrelated`, which is
Wikitext under data=wmdp_bio and the synthetic world's unrelated corpus by default.
"""
from __future__ import annotations

import logging
import time
from typing import Sequence

import torch

from baselines.common import (ALPHA, BATCH_SIZE, LR, RETAIN_CORPORA, STEPS, TermLog, adamw, capture_outputs,
                              check_layer_ids, decoder_layers, forget_retain_batches, forget_texts, frozen_copy,
                              only_train, rules_hook, run_info)
from harness import distributed
from harness.errors import ConfigError
from harness.memory import Costs, Shape, Stage, training_stage
from harness.rules import one_of
from harness.train import train_loop

log = logging.getLogger(__name__)


def control_vector(hidden_size: int, steering_coef: float, generator: torch.Generator) -> torch.Tensor:
    """u ~ Uniform[0, 1)^d, normalised, times c: the original's `torch.rand` (all-positive entries,
    so u is not a random direction on the sphere but one inside the positive orthant)."""
    u = torch.rand(hidden_size, generator=generator)
    return steering_coef * u / u.norm()


def forget_term(h: torch.Tensor, mask: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens and hidden units of (h − c·u)²."""
    sq = (h - control.to(h)) ** 2                       # (B, T, d)
    m = mask.unsqueeze(-1).to(sq.dtype)
    return (sq * m).sum() / (distributed.global_sum(m.sum()) * h.shape[-1]).clamp_min(1)


def retain_term(h: torch.Tensor, h_frozen: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens and hidden units of (h − h_frozen)²."""
    return forget_term(h - h_frozen, mask, torch.zeros(h.shape[-1]))


class RMU:
    name = "rmu"

    # Hooks (harness/hooks.py): what the runner asks of the defense before anything is built.
    check_config = rules_hook(ALPHA, STEPS, BATCH_SIZE, LR,
                              ("retain_corpus", one_of(*RETAIN_CORPORA), "retain or unrelated"), text=True)

    @classmethod
    def memory_stages(cls, node, shape: Shape, c: Costs) -> list[Stage]:
        """The MLP output weights of `param_layers` train; a frozen copy steers the retain activations."""
        trained = len(node.param_layers) * shape.hidden * shape.intermediate
        batch = int(node.get("batch_size", 1))
        return [training_stage(cls.name, c, shape.params, trained, {
            "frozen copy": c.weights(shape.params), "activations": c.activations(batch, forwards=2)})]

    def __init__(self, layer_id: int, param_layers: Sequence[int], steering_coef: float, alpha: float,
                 lr: float, steps: int, batch_size: int, retain_corpus: str = "unrelated",
                 forget_splits: Sequence[int] = (0, 1), seed: int = 0):
        if retain_corpus not in RETAIN_CORPORA:
            raise ConfigError(f"defense.retain_corpus={retain_corpus!r}: allowed {', '.join(RETAIN_CORPORA)}")
        self.retain_corpus = retain_corpus
        self.layer_id = layer_id
        self.param_layers = list(param_layers)
        self.steering_coef, self.alpha = steering_coef, alpha
        self.lr, self.steps, self.batch_size = lr, steps, batch_size
        self.forget_splits = list(forget_splits)
        self.seed = seed
        self.info: dict = {}

    def layer_output(self, model, batch: dict) -> torch.Tensor:
        with capture_outputs([decoder_layers(model)[self.layer_id]]) as out:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out[0]

    def loss(self, model, frozen, control, terms: TermLog, batch: dict) -> torch.Tensor:
        f, r = batch["forget"], batch["retain"]
        forget = forget_term(self.layer_output(model, f), f["attention_mask"].bool(), control)
        with torch.no_grad():
            target = self.layer_output(frozen, r)
        retain = retain_term(self.layer_output(model, r), target, r["attention_mask"].bool())
        terms(forget=forget, retain=retain)
        return forget + self.alpha * retain

    def __call__(self, model, tokenizer, data):
        t0 = time.perf_counter()
        check_layer_ids([self.layer_id], model, "layer_id")
        check_layer_ids(self.param_layers, model, "param_layers")
        gen = torch.Generator().manual_seed(self.seed)
        control = control_vector(model.config.hidden_size, self.steering_coef, gen)
        frozen = frozen_copy(model)
        retain = getattr(data, self.retain_corpus)
        batches = forget_retain_batches(tokenizer, forget_texts(data, self.forget_splits), retain,
                                        self.batch_size, data.max_length, self.seed, model.device)
        terms = TermLog()
        with distributed.sharded(model) as trained:  # dist=fsdp: a sharded twin, written back at the end
            layers = decoder_layers(trained)
            params = [layers[i].mlp.down_proj.weight for i in self.param_layers]
            with only_train(trained, params):
                result = train_loop(trained, batches, lambda m, b: self.loss(m, frozen, control, terms, b),
                                    [adamw(params, self.lr)], steps=self.steps, desc="defense rmu")
        self.info = run_info(t0, {"train": result}, terms, trained_params=len(params))
        log.info("rmu: %s", self.info)
        return model
