"""How far a defended model's function moved: logits on held-out text, original vs defended.

Both models run in the model's own dtype (that is what a release ships); only the statistics are
accumulated in float64. The original is not kept as a second model: the few replaced modules are
swapped back in per batch, so the reference costs one extra forward pass and no extra logits in memory.
"""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
from torch import nn

from harness.batches import encode
from harness.concept_folder import ConceptData
from harness.diffusion import DiffusionData, heldout_batch
from harness.images import ImageData, pixel_values
from specdef.core import set_module


@contextlib.contextmanager
def swapped(model: nn.Module, modules: dict[str, nn.Module]):
    """Temporarily put `modules` (name -> module) into `model`, restoring what was there."""
    current = {name: model.get_submodule(name) for name in modules}
    for name, module in modules.items():
        set_module(model, name, module)
    try:
        yield model
    finally:
        for name, module in current.items():
            set_module(model, name, module)


def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@torch.no_grad()
def function_drift(model: nn.Module, tokenizer, texts: Sequence[str], originals: dict[str, nn.Module],
                   max_length: int, batch_size: int = 8) -> dict:
    """max |Δlogit|, mean KL(original ‖ defended) per token, and ‖Δ‖ / ‖logits‖ over non-padding tokens.

    Non-finite defended logits (e.g. float16 overflow at huge α) give inf, never NaN, so that the
    record and comparisons stay meaningful.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    acc = {"max": 0.0, "kl": 0.0, "diff2": 0.0, "ref2": 0.0, "tokens": 0}
    for i in range(0, len(texts), batch_size):
        batch = {k: v.to(device) for k, v in encode(tokenizer, texts[i:i + batch_size], max_length).items()}
        with swapped(model, originals):
            ref = _logits(model, batch)
        out = _logits(model, batch)
        _accumulate(acc, ref, out, batch["attention_mask"].bool())
    model.train(was_training)
    return _summarise(acc, dtype=next(model.parameters()).dtype)


@torch.no_grad()
def image_drift(model: nn.Module, images: torch.Tensor, originals: dict[str, nn.Module], batch_size: int = 128) -> dict:
    """The same statistics for an image classifier (harness/images.py): its logits on `images` (uint8);
    `tokens` counts images."""
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


@torch.no_grad()
def noise_drift(model: nn.Module, batch: dict, originals: dict[str, nn.Module]) -> dict:
    """The same for a class-conditioned denoiser (harness/diffusion.py): its noise prediction on a fixed
    noised batch, each image's prediction a row; `tokens` counts images. `kl_mean` is None (a noise
    prediction is no distribution)."""
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    inputs = (batch["sample"].to(param), batch["timestep"].to(param.device))
    # a class label (UNet2DModel), or a prompt's text embedding (UNet2DConditionModel, harness/concept_folder.py)
    condition = ({"encoder_hidden_states": batch["encoder_hidden_states"].to(param)} if "encoder_hidden_states" in batch
                 else {"class_labels": batch["class_labels"].to(param.device)})
    with swapped(model, originals):
        ref = model(*inputs, **condition).sample.flatten(1).double()
    out = model(*inputs, **condition).sample.flatten(1).double()
    model.train(was_training)
    diff = out - ref
    largest = float(diff.abs().max()) if diff.numel() else 0.0
    ref2 = float(ref.pow(2).sum())
    return {"max_abs_logit_diff": _finite_or_inf(largest), "kl_mean": None,
            "rel_logit_error": _finite_or_inf(math.sqrt(float(diff.pow(2).sum()) / ref2)) if ref2 else 0.0,
            "tokens": len(ref), "dtype": str(param.dtype).removeprefix("torch.")}


def data_drift(model: nn.Module, tokenizer, data, originals: dict[str, nn.Module], samples: int) -> dict:
    """The drift on `samples` held-out inputs of the run's data: noised eval images (or latents) of the diffusion world,
    eval images of the image world, else text."""
    if isinstance(data, ConceptData):
        return noise_drift(model, data.drift_batch(samples), originals)
    if isinstance(data, DiffusionData):
        return noise_drift(model, heldout_batch(data, list(range(len(data.classes))),
                                                -(-samples // len(data.classes)), seed=0), originals)
    if isinstance(data, ImageData):
        return image_drift(model, data.eval_images[:samples], originals)
    return function_drift(model, tokenizer, data.heldout_text(samples), originals, data.max_length)


def _accumulate(acc: dict, ref: torch.Tensor, out: torch.Tensor, mask: torch.Tensor, rows: int = 1024) -> None:
    # float64 statistics over blocks of token rows: at a 128k vocabulary one block is 1 GB, a whole
    # batch of 8 x 512 tokens would be 4 GB per temporary
    ref, out = ref[mask], out[mask]
    for i in range(0, ref.shape[0], rows):
        _accumulate_rows(acc, ref[i:i + rows].double(), out[i:i + rows].double())
    acc["tokens"] += int(mask.sum())


def _accumulate_rows(acc: dict, ref: torch.Tensor, out: torch.Tensor) -> None:
    diff = out - ref
    largest = float(diff.abs().max()) if diff.numel() else 0.0
    acc["max"] = max(acc["max"], _finite_or_inf(largest))  # max(0.0, nan) would hide a NaN
    logp, logq = ref.log_softmax(-1), out.log_softmax(-1)
    acc["kl"] += float((logp.exp() * (logp - logq)).sum())
    acc["diff2"] += float(diff.pow(2).sum())
    acc["ref2"] += float(ref.pow(2).sum())


def _finite_or_inf(x: float) -> float:
    return x if math.isfinite(x) else float("inf")


def _summarise(acc: dict, dtype: torch.dtype) -> dict:
    n = max(acc["tokens"], 1)
    return {"max_abs_logit_diff": _finite_or_inf(acc["max"]), "kl_mean": _finite_or_inf(acc["kl"] / n),
            "rel_logit_error": _finite_or_inf(math.sqrt(acc["diff2"] / acc["ref2"])) if acc["ref2"] else 0.0,
            "tokens": acc["tokens"], "dtype": str(dtype).removeprefix("torch.")}


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def max_supported_alpha(alpha: float, rel_error: float, tolerance: float, dtype: torch.dtype) -> dict:
    """Largest α this dtype can carry within `tolerance`, from error ≈ c · eps(dtype) · α.

    c is estimated from the one measured point. Once the error has saturated (≈ 1 or inf: the model is
    broken) the true c is larger than the estimate, so the answer is then an upper bound.
    """
    if not math.isfinite(rel_error):
        # no usable slope: fall back to c = 1, i.e. the plain eps(dtype)·α rule
        c = 1.0
    elif rel_error <= 0:
        return {"c": 0.0, "max_alpha": float("inf")}
    else:
        c = rel_error / (eps(dtype) * alpha)
    return {"c": c, "max_alpha": tolerance / (c * eps(dtype))}
