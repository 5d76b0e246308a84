"""Class unlearning for an image classifier: NPO on the hazard classes (grad-diff form), the vision
analogue of baselines/npo.py.

Each image's negative log-likelihood of its own label plays the role of a sequence's NLL in NPO
(Zhang et al. 2024), the reference being the classifier before unlearning:

    L = npo_coeff · (2/β) E_hazard[ log(1 + (p_θ(y|x) / p_ref(y|x))^β) ] + retain_coeff · CE_θ(benign)

As β → 0 the first term tends to gradient ascent on the hazard images' cross-entropy; for β > 0 an
image's gradient fades once its label has been unlearned, which keeps the benign classes from
collapsing the way plain gradient ascent makes them. The loss is `npo_loss` of baselines/npo.py;
training goes through the one loop (harness.train.train_loop) with NPO's schedule (linear warm-up over
`warmup_epochs` of the hazard images, then linear decay) and gradient clipping.
"""
from __future__ import annotations

import logging
import time
import torch
import torch.nn.functional as F

from baselines.common import BATCH_SIZE, LR, STEPS, TermLog, adamw, frozen_copy, rules_hook, run_info, zip_batches
from baselines.npo import NPO, npo_loss
from harness.errors import ConfigError
from harness.images import ImageData, image_batches
from harness.rules import non_negative
from harness.train import lr_lambda, train_loop

log = logging.getLogger(__name__)


def image_nll(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """−log p(y|x) of each image (B,)."""
    return F.cross_entropy(model(pixel_values=batch["pixel_values"]).logits.float(), batch["labels"], reduction="none")


class ClassNPO(NPO):
    """`defense=class_npo`: NPO's arguments (conf/defense/class_npo.yaml); `forget_splits` are indices
    into the image world's hazard classes (data.world.hazard)."""
    name = "class_npo"
    check_config = rules_hook(STEPS, BATCH_SIZE, LR, ("warmup_epochs", non_negative, "a number >= 0"))

    def loss(self, model, ref, terms: TermLog, batch: dict) -> torch.Tensor:
        nll = image_nll(model, batch["forget"])
        with torch.no_grad():
            nll_ref = image_nll(ref, batch["forget"])
        forget = npo_loss(nll, nll_ref, self.beta)
        retain = image_nll(model, batch["retain"]).mean()
        terms(npo=forget, retain_ce=retain, forget_nll_gain=(nll - nll_ref).mean())
        return self.npo_coeff * forget + self.retain_coeff * retain

    def hazard_images(self, data) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(data, ImageData):
            raise ConfigError(f"defense=class_npo on {type(data).__name__}: allowed image data "
                              "(experiment=vision); for text use defense=npo")
        bad = [s for s in self.forget_splits if not (isinstance(s, int) and 0 <= s < len(data.world.hazard))]
        if bad or not self.forget_splits:
            raise ConfigError(f"defense.forget_splits={self.forget_splits}: allowed a non-empty list of indices "
                              f"0..{len(data.world.hazard) - 1} of the hazard classes {list(data.world.hazard)}")
        return data.hazard("train", self.forget_splits)

    def __call__(self, model, tokenizer, data):
        t0 = time.perf_counter()
        torch.manual_seed(self.seed)
        x, y = self.hazard_images(data)
        ref = frozen_copy(model)
        device = next(model.parameters()).device
        batches = zip_batches({"forget": image_batches(x, y, self.batch_size, self.seed),
                               "retain": image_batches(*data.benign("train"), self.batch_size, self.seed + 1)}, device)
        warmup = self.warmup_steps(len(y))
        terms = TermLog()
        opt = adamw([p for p in model.parameters() if p.requires_grad], self.lr, self.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("linear", warmup, self.steps))
        result = train_loop(model, batches, lambda m, b: self.loss(m, ref, terms, b), [opt], schedulers=[sched],
                            steps=self.steps, grad_accum=self.grad_accum, max_grad_norm=self.max_grad_norm,
                            desc="defense class_npo", progress=False)
        self.info = run_info(t0, {"train": result}, terms, warmup_steps=warmup, forget_classes=
                             [data.world.hazard[s] for s in self.forget_splits])
        log.info("class_npo: %s", self.info)
        return model

