"""IMMA, Immunizing text-to-image Models against Malicious Adaptation (Zheng & Yeh, ECCV 2024), against full
fine-tuning (their DreamBooth setting), for the class-conditioned tiny UNet and for Stable Diffusion's
text-conditioned one.

A bi-level game on the concept's images, played as the authors' code plays it (train/defend_dreambooth.py):
steps alternate between `inner_steps` of the simulated attacker, who fine-tunes every parameter to lower
the denoising loss (AdamW, `lr`), and `outer_steps` of the defender, who raises the same loss by training
only the attention projections (every `to_q`, `to_k`, `to_v`, `to_out` parameter; AdamW, `lr_defense`),
each step's gradient clipped to `max_grad_norm`. What is released is the pretrained model with the
defender's attention weights only: the attacker's simulated updates of the other parameters are dropped
(their script saves `imma_unet_xatten_layer.pt` and the adaptation loads it into the pretrained UNet).

The attacker's images are the concept's: on the embedded world the hazard classes' images under their own
labels; at real scale (`model=stable_diffusion data=concept_folder`) the concept folder's latents under
data.prompt, DreamBooth's instance images and prompt, as in the authors' script.

Training goes through the one loop (harness.train.train_loop): one optimizer object alternates between the
two AdamWs and the loss flips its sign on the defender's steps.
"""
from __future__ import annotations

import logging
import time

import torch

from baselines.common import BATCH_SIZE, LR, TermLog, run_info
from harness.concept_folder import ConceptData
from harness.diffusion import DiffusionData
from harness.errors import ConfigError
from harness.rules import MISSING, Rule, check_rules, get, non_negative, positive, positive_int
from harness.train import train_loop
from specdef.defense import build_base, check_base

log = logging.getLogger(__name__)
ATTENTION = ("to_q", "to_k", "to_v", "to_out")  # the authors' defended parameters (name substrings)
RULES: list[Rule] = [
    ("steps", positive_int, "an integer >= 1"), BATCH_SIZE, LR,
    ("lr_defense", positive, "a finite number > 0"),
    ("inner_steps", positive_int, "an integer >= 1"),
    ("outer_steps", positive_int, "an integer >= 1"),
    ("weight_decay", non_negative, "a number >= 0"),
]


class Alternating:
    """The optimizer train_loop steps: the attacker's AdamW for `inner` steps, then the defender's for `outer`.
    `param_groups` are the attacker's (every parameter), so the loop clips each step's gradients once."""

    def __init__(self, attacker: torch.optim.Optimizer, defender: torch.optim.Optimizer, inner: int, outer: int):
        self.attacker, self.defender, self.inner, self.outer = attacker, defender, inner, outer
        self.count = 0

    @property
    def param_groups(self):
        return self.attacker.param_groups

    def defending(self) -> bool:
        return self.count % (self.inner + self.outer) >= self.inner

    def step(self) -> None:
        (self.defender if self.defending() else self.attacker).step()
        self.count += 1

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.attacker.zero_grad(set_to_none=set_to_none)
        self.defender.zero_grad(set_to_none=set_to_none)


class IMMA:
    """`defense=imma` (conf/defense/imma.yaml; the authors' values at real scale in conf/defense_scale/paper/imma.yaml).

    lr: the simulated attacker's.  lr_defense: the defender's.  steps: both kinds together.
    forget_splits: the concept (indices into data.world.hazard) whose fine-tuning is to fail.
    base / base_overrides: a defense of conf/defense/ applied first (SpecDef's mechanism), e.g. esd: IMMA's
    setting is a model that lacks the concept, which the pretrained UNet does not.  base_scale: the scale whose
    values the base takes (conf/defense_scale/<base_scale>/<base>.yaml; null: conf/defense/<base>.yaml alone).
    """
    name = "imma"

    @staticmethod
    def check_config(cfg, node, key: str) -> None:
        check_rules(node, RULES, f"{key}.")
        check_base(cfg, node)  # a base defense's own checks (e.g. ESD's), before any model loads
        data = get(cfg, "data.name")
        if data is not MISSING and get(cfg, "data.kind") != "diffusion":
            raise ConfigError(f"defense=imma with data={data}: allowed the diffusion world (experiment=diffusion)")
        splits = node.get("forget_splits")
        if data == "concept_folder" and splits is not None and list(splits) != [0]:
            raise ConfigError(f"defense.forget_splits={list(splits)}: allowed [0] (the concept of data.prompt)")

    def __init__(self, lr: float = 5e-6, lr_defense: float = 2e-5, steps: int = 1000, batch_size: int = 1,
                 inner_steps: int = 1, outer_steps: int = 1, weight_decay: float = 1e-2, max_grad_norm: float = 1.0,
                 forget_splits=(0, 1), seed: int = 0, base: str | None = None, base_overrides: dict | None = None,
                 base_scale: str | None = None):
        self.lr, self.lr_defense, self.steps, self.batch_size = lr, lr_defense, steps, batch_size
        self.inner_steps, self.outer_steps, self.weight_decay = inner_steps, outer_steps, weight_decay
        self.max_grad_norm, self.forget_splits, self.seed = max_grad_norm, list(forget_splits), seed
        self.base, self.base_overrides, self.base_scale = base, base_overrides, base_scale  # as SpecDef's
        self.info: dict = {}

    def concept_batches(self, data):
        """(the simulated attacker's endless batches, the immunized concepts' names): the concept's images under
        their own condition (DreamBooth's instance images and prompt), no condition dropped."""
        if isinstance(data, ConceptData):
            if self.forget_splits != [0]:
                raise ConfigError(f"defense.forget_splits={self.forget_splits}: allowed [0] (the concept of data.prompt)")
            spec = {"source": "forget", "splits": [0], "retain_share": 0.0}
            return data.attack_batches(spec, self.batch_size, self.seed), [data.prompt]
        if not isinstance(data, DiffusionData):
            raise ConfigError(f"defense=imma on {type(data).__name__}: allowed a diffusion world (experiment=diffusion)")
        hazard = list(data.world.hazard)
        if not self.forget_splits or any(not (isinstance(s, int) and 0 <= s < len(hazard)) for s in self.forget_splits):
            raise ConfigError(f"defense.forget_splits={self.forget_splits}: allowed a non-empty list of indices "
                              f"0..{len(hazard) - 1} of the hazard classes {hazard}")
        concepts = [data.hazard_labels[s] for s in self.forget_splits]
        return data.batches(concepts, self.batch_size, self.seed, cond_dropout=0.0), [data.classes[c] for c in concepts]

    def __call__(self, model, tokenizer, data):
        t0 = time.perf_counter()
        torch.manual_seed(self.seed)
        batches, concepts = self.concept_batches(data)
        base_info = {}
        if self.base is not None:  # e.g. ESD: IMMA then immunizes a model that no longer draws the concept
            base = build_base(self.base, self.base_overrides, self.base_scale)
            model = base(model, tokenizer, data)
            base_info = {"base": {"name": base.name, **base.info}}
        defended = {n: p for n, p in model.named_parameters() if any(a in n for a in ATTENTION)}
        if not defended:
            raise ConfigError(f"defense=imma: {type(model).__name__} has no attention projection ({', '.join(ATTENTION)})")
        released = {n: p.detach().clone() for n, p in model.named_parameters() if n not in defended}
        flags = {p: p.requires_grad for p in model.parameters()}
        optimizer = Alternating(
            torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=self.weight_decay),
            torch.optim.AdamW(defended.values(), lr=self.lr_defense, weight_decay=self.weight_decay),
            self.inner_steps, self.outer_steps)
        terms = TermLog()

        def loss(m, batch):
            defending = optimizer.defending()
            for n, p in m.named_parameters():  # the defender moves the attention projections only
                p.requires_grad_(not defending or n in defended)
            value = data.loss(m, batch)
            terms(**{"defender_loss" if defending else "attacker_loss": value})
            return -value if defending else value

        try:
            result = train_loop(model, batches, loss, [optimizer], steps=self.steps, max_grad_norm=self.max_grad_norm,
                                desc="defense imma", progress=False)
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)
        with torch.no_grad():  # the release: pretrained weights, the defender's attention projections
            for n, p in model.named_parameters():
                if n in released:
                    p.copy_(released[n])
        self.info = run_info(t0, {"train": result}, terms, defended_parameters=sum(p.numel() for p in defended.values()),
                             defended_layers=len({n.rsplit(".", 1)[0] for n in defended}),
                             immunized_classes=concepts, **base_info)
        log.info("imma: %s", self.info)
        return model
