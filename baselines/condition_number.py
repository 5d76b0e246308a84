"""Condition-number immunization of an image classifier (Zheng, Bai, Bullins & Yeh, ICML 2025, "Model
Immunization from a Condition Number Perspective"; authors' code: amberyzheng/model-immunization-cond-num).

A linear probe w on features φ(x) with the squared loss has the Hessian S = Φᵀ Φ (Φ: the batch's features
stacked as rows), so the condition number κ(S) bounds how fast gradient descent on the probe converges.
The defense fine-tunes the feature extractor so that S is badly conditioned on the *harmful* task's
images (an attacker's probe or fine-tuning converges slowly) and well conditioned on the pretraining
task's (utility is kept), while the pretraining classification loss holds the model's own task:

    L = CE_smooth(benign) + λ_well · R_well(S_benign) + λ_ill · R_ill(S_hazard)
    R_well(S) = σ_max(S)² / 2 − ‖S‖_F² / (2K)          (0 iff every eigenvalue of S is equal)
    R_ill(S)  = 1 / (‖S‖_F² / (2K) − σ_min(S)² / 2)      (small when σ_min is small against ‖S‖_F)

with K the feature width, σ_max / σ_min the largest and the smallest positive eigenvalue of S + λ_diag·I
(the authors' `condition_number`: eigenvalues at or below λ_diag, i.e. S's null space, are not σ_min),
label smoothing 0.1, and the features the classifier head's input (for a transformers ViT, the final
LayerNorm of the CLS token, what the authors' timm ViT returns). As in the authors' ViT setting only the
last encoder block(s), every LayerNorm and the head train, with SGD (Nesterov momentum 0.9; weight decay
on the head only), in float64. In this harness the pretraining task is the benign classes, the harmful
task the hazard classes (`forget_splits`); their labels are not used (R_ill reads features only).

`info` records log10 κ of the features' Gram matrix on the eval images of both sides before and after, and
the authors' immunization gap (κ_hazard ratio / κ_benign ratio, their "RIR").
"""
from __future__ import annotations

import contextlib
import logging
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from baselines.common import BATCH_SIZE, LR, STEPS, TermLog, only_train, rules_hook, run_info, zip_batches
from harness.errors import ConfigError
from harness.images import ImageData, image_batches, pixel_values
from harness.rules import MISSING, get, non_negative, non_negative_int, positive, unit_interval
from harness.train import train_loop

log = logging.getLogger(__name__)
DTYPES = {"float64": torch.float64, "float32": torch.float32}


@contextlib.contextmanager
def head_inputs(model: nn.Module):
    """The features the classification head reads (its input), captured while the block runs."""
    head = getattr(model, "classifier", None)
    if not isinstance(head, nn.Module):
        raise ConfigError(f"defense=condition_number on {type(model).__name__}: allowed an image classifier "
                          "with a `classifier` head (transformers *ForImageClassification)")
    captured: list = []
    handle = head.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
    try:
        yield captured
    finally:
        handle.remove()


def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with head_inputs(model) as captured:
        logits = model(pixel_values=x).logits
    return captured[-1], logits


def extreme_eigenvalues(S: torch.Tensor, lambda_diag: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(smallest eigenvalue above λ_diag, largest eigenvalue) of S + λ_diag·I, in float64 (the authors')."""
    S = S.double() + lambda_diag * torch.eye(S.shape[0], dtype=torch.float64, device=S.device)
    eig = torch.linalg.eigvalsh(S)
    return eig[eig > lambda_diag].min(), eig.max()


def well_conditioning(S: torch.Tensor, lambda_diag: float) -> torch.Tensor:
    """R_well(S) = σ_max² / 2 − ‖S‖_F² / (2K)."""
    _, s_max = extreme_eigenvalues(S, lambda_diag)
    return s_max ** 2 / 2 - S.double().norm() ** 2 / (2 * S.shape[0])


def ill_conditioning(S: torch.Tensor, lambda_diag: float) -> torch.Tensor:
    """R_ill(S) = 1 / (‖S‖_F² / (2K) − σ_min² / 2)."""
    s_min, _ = extreme_eigenvalues(S, lambda_diag)
    return 1 / (S.double().norm() ** 2 / (2 * S.shape[0]) - s_min ** 2 / 2)


def gram(features: torch.Tensor) -> torch.Tensor:
    return features.T @ features


@torch.no_grad()
def log10_condition(model: nn.Module, images: torch.Tensor, lambda_diag: float, dtype: torch.dtype,
                    batch_size: int = 256) -> float:
    """log10 κ of the Gram matrix of the head's input features on `images` (uint8), the authors' κ."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    feats = torch.cat([features_and_logits(model, pixel_values(images[i:i + batch_size]).to(device, dtype))[0]
                       for i in range(0, len(images), batch_size)])
    model.train(was_training)
    s_min, s_max = extreme_eigenvalues(gram(feats.double()), lambda_diag)
    return float(torch.log10(s_max) - torch.log10(s_min))


def encoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The encoder's blocks: the first ModuleList of the model (transformers 5's `vit.layers`)."""
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module):
            return module
    raise ConfigError(f"defense=condition_number on {type(model).__name__}: no encoder blocks (nn.ModuleList) found")


def trained_parameters(model: nn.Module, last_blocks: int) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(feature-extractor parameters, head parameters) the defense trains: the last `last_blocks` encoder
    blocks and every LayerNorm (the authors' "blocks.11", "norm"), and the head ("head")."""
    blocks = encoder_blocks(model)
    if not 0 <= last_blocks <= len(blocks):
        raise ConfigError(f"defense.last_blocks={last_blocks}: allowed 0..{len(blocks)} (this model has "
                          f"{len(blocks)} encoder blocks)")
    chosen = {id(p): p for b in list(blocks)[len(blocks) - last_blocks:] for p in b.parameters()}
    chosen.update({id(p): p for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()})
    head = list(model.classifier.parameters())
    return [p for p in chosen.values() if all(p is not h for h in head)], head


class ConditionNumber:
    """`defense=condition_number` (conf/defense/condition_number.yaml; the authors' ViT values at
    scale=paper in conf/defense_scale/paper/condition_number.yaml)."""
    name = "condition_number"
    rules = rules_hook(STEPS, BATCH_SIZE, LR, ("lambda_well", non_negative, "a number >= 0"),
                              ("lambda_ill", non_negative, "a number >= 0"), ("lambda_diag", positive, "a number > 0"),
                              ("momentum", unit_interval, "a number in [0, 1]"),
                              ("weight_decay", non_negative, "a number >= 0"),
                              ("head_weight_decay", non_negative, "a number >= 0"),
                              ("label_smoothing", unit_interval, "a number in [0, 1]"),
                              ("last_blocks", non_negative_int, "an integer >= 0"),
                              ("dtype", lambda d: d in DTYPES, "float64 or float32"))

    @classmethod
    def check_config(cls, cfg, node, key: str) -> None:
        """Its own values, and image data: R_ill and R_well read a classifier head's input features."""
        cls.rules(cfg, node, key)
        if get(cfg, "data") is not MISSING and get(cfg, "data.kind") != "images":
            raise ConfigError(f"defense=condition_number with data={get(cfg, 'data.name')}: allowed image data "
                              "(experiment=vision)")

    def __init__(self, lambda_well: float, lambda_ill: float, lr: float, steps: int, batch_size: int,
                 momentum: float = 0.9, nesterov: bool = True, weight_decay: float = 0.0,
                 head_weight_decay: float = 2e-5, label_smoothing: float = 0.1, lambda_diag: float = 1e-6,
                 last_blocks: int = 1, dtype: str = "float64", forget_splits=(0, 1), seed: int = 0):
        self.lambda_well, self.lambda_ill, self.lambda_diag = lambda_well, lambda_ill, lambda_diag
        self.lr, self.momentum, self.nesterov = lr, momentum, nesterov
        self.weight_decay, self.head_weight_decay = weight_decay, head_weight_decay
        self.steps, self.batch_size, self.label_smoothing = steps, batch_size, label_smoothing
        self.last_blocks, self.dtype, self.seed = last_blocks, dtype, seed
        self.forget_splits = list(forget_splits)
        self.info: dict = {}

    def loss(self, model, terms: TermLog, batch: dict) -> torch.Tensor:
        dtype = DTYPES[self.dtype]
        benign, hazard = batch["retain"], batch["forget"]
        feats, logits = features_and_logits(model, benign["pixel_values"].to(dtype))
        ce = F.cross_entropy(logits, benign["labels"], label_smoothing=self.label_smoothing)
        hazard_feats, _ = features_and_logits(model, hazard["pixel_values"].to(dtype))
        well = well_conditioning(gram(feats), self.lambda_diag)
        ill = ill_conditioning(gram(hazard_feats), self.lambda_diag)
        terms(ce=ce, r_well=well, r_ill=ill)
        return ce + self.lambda_well * well + self.lambda_ill * ill

    def hazard_images(self, data) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(data, ImageData):
            raise ConfigError(f"defense=condition_number on {type(data).__name__}: allowed image data "
                              "(experiment=vision)")
        bad = [s for s in self.forget_splits if not (isinstance(s, int) and 0 <= s < len(data.world.hazard))]
        if bad or not self.forget_splits:
            raise ConfigError(f"defense.forget_splits={self.forget_splits}: allowed a non-empty list of indices "
                              f"0..{len(data.world.hazard) - 1} of the hazard classes {list(data.world.hazard)}")
        return data.hazard("train", self.forget_splits)

    def conditioning(self, model, data: ImageData) -> dict:
        """log10 κ of the head's input features on the eval images of the harmful and the benign classes."""
        dtype = DTYPES[self.dtype]
        return {"hazard": log10_condition(model, data.hazard("eval", self.forget_splits)[0], self.lambda_diag, dtype),
                "benign": log10_condition(model, data.benign("eval")[0], self.lambda_diag, dtype)}

    def __call__(self, model, tokenizer, data):
        t0 = time.perf_counter()
        torch.manual_seed(self.seed)
        x, y = self.hazard_images(data)
        extractor, head = trained_parameters(model, self.last_blocks)
        original_dtype = next(model.parameters()).dtype
        model.to(DTYPES[self.dtype])  # the authors train in float64
        before = self.conditioning(model, data)
        device = next(model.parameters()).device
        batches = zip_batches({"forget": image_batches(x, y, self.batch_size, self.seed),
                               "retain": image_batches(*data.benign("train"), self.batch_size, self.seed + 1)}, device)
        opt = torch.optim.SGD([{"params": extractor, "weight_decay": self.weight_decay},
                               {"params": head, "weight_decay": self.head_weight_decay}],
                              lr=self.lr, momentum=self.momentum, nesterov=self.nesterov)
        terms = TermLog()
        with only_train(model, extractor + head):  # the attack that follows sees the model's own trainable set
            result = train_loop(model, batches, lambda m, b: self.loss(m, terms, b), [opt], steps=self.steps,
                                desc="defense condition_number", progress=False)
        after = self.conditioning(model, data)
        model.to(original_dtype)
        gap = (after["hazard"] - before["hazard"]) - (after["benign"] - before["benign"])
        self.info = run_info(t0, {"train": result}, terms,
                             forget_classes=[data.world.hazard[s] for s in self.forget_splits],
                             trained_parameters=sum(p.numel() for p in extractor + head),
                             log10_cond_before=before, log10_cond_after=after, log10_immunization_gap=gap,
                             immunization_gap=math.pow(10, gap) if gap < 300 else float("inf"))
        log.info("condition_number: %s", self.info)
        return model
