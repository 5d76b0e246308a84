"""Evaluation of an image classifier on the image world, in the metrics the outcome rules read.

`hazard_acc` is the accuracy on the hazard classes' eval images, `utility_acc` on the benign ones
(the language track's utility tasks). The rules of harness/outcome.py also read a retain perplexity;
for a classifier its analogue is `retain_ppl` = exp(mean cross-entropy) on the benign eval images:
it rises when the model grows unsure of what it still classifies right, before accuracy falls, and
is 1 for a perfect, certain model. `forget_ppl` is the same on the hazard images. Per-class
accuracies are `acc/<class>`.
"""
from __future__ import annotations

import math

import torch

from harness.images import ImageData, pixel_values


@torch.no_grad()
def logits_of(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device  # the images stay on the CPU; each batch goes to the model
    out = torch.cat([model(pixel_values=pixel_values(images[i:i + batch_size]).to(device)).logits.float().cpu()
                     for i in range(0, len(images), batch_size)])
    model.train(was_training)
    return out


def _scores(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(accuracy, exp(mean cross-entropy)); a non-finite logit makes both say the model is broken."""
    if not torch.isfinite(logits).all():
        return 0.0, float("inf")
    ce = float(torch.nn.functional.cross_entropy(logits, labels))
    return float((logits.argmax(-1) == labels).float().mean()), math.exp(min(ce, 700.0))


class VisionEvaluator:
    """`evaluator(model) -> metrics` (harness.interfaces.Evaluator) on the world's eval split."""

    def __init__(self, data: ImageData, limit: int | None = None, batch_size: int = 256):
        self.data, self.limit, self.batch_size = data, limit, batch_size

    def __call__(self, model: torch.nn.Module) -> dict:
        images, labels = self.data.eval_images, self.data.eval_labels
        if self.limit is not None:  # a class-balanced prefix (the split interleaves classes)
            images, labels = images[: self.limit * len(self.data.classes)], labels[: self.limit * len(self.data.classes)]
        logits = logits_of(model, images, self.batch_size)
        hazard = torch.isin(labels, torch.tensor(self.data.hazard_labels))
        hazard_acc, forget_ppl = _scores(logits[hazard], labels[hazard])
        utility_acc, retain_ppl = _scores(logits[~hazard], labels[~hazard])
        per_class = {f"acc/{name}": _scores(logits[labels == i], labels[labels == i])[0]
                     for i, name in enumerate(self.data.classes)}
        return {"hazard_acc": hazard_acc, "utility_acc": utility_acc, "retain_ppl": retain_ppl,
                "forget_ppl": forget_ppl, **per_class}
