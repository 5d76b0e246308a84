"""RepNoise, Representation Noising (Rosati et al. 2024, domenicrosati/representation-noising).

Push the MLP activations of every layer on harmful (forget) tokens toward Gaussian noise, make the
harmful text unpredictable from every layer (logit lens), and keep harmless (retain) text predicted:

    L = CE(retain) + β · (1/L) Σ_l MMD(MLP_l(x_f), N(0, I))
        − α · log( (1/L) Σ_l CE(lm_head(norm(h_l(x_f))), x_f) + 1 )

MMD as in the original: each sequence's (masked) activations flattened into one sample, a mixture
of 5 Gaussian kernels whose bandwidths are the mean pairwise squared distance × 2^{-2..2}. The
`log(· + 1)` damps the ascent term, so it cannot run away the way plain gradient ascent does.
The original's logit-lens mean also counts the embedding layer and the final logits once more;
here it is the mean over the decoder layers (the last layer's lens is the model's own output).
"""
from __future__ import annotations

import logging
import time
from typing import Sequence

import torch

from baselines.common import (ALPHA, BATCH_SIZE, LR, STEPS, TermLog, adamw, capture_outputs, decoder_layers,
                              forget_retain_batches, forget_texts, logit_lens, mean_nll, rules_hook, run_info)
from harness import distributed
from harness.memory import Costs, Shape, Stage, training_stage
from harness.train import lr_lambda, train_loop

log = logging.getLogger(__name__)


def gaussian_mixture_kernel(x: torch.Tensor, y: torch.Tensor, kernel_mul: float = 2.0,
                            kernel_num: int = 5) -> torch.Tensor:
    """Kernel matrix over the stacked samples [x; y] (n+m, n+m): Σ_i exp(−‖a−b‖² / (σ² · mul^{i−num//2}))
    with σ² the mean off-diagonal squared distance (not differentiated through, as in the original)."""
    total = torch.cat([x, y], dim=0)
    sq_dist = torch.cdist(total, total).pow(2)
    n = total.shape[0]
    bandwidth = sq_dist.detach().sum() / (n * n - n)
    bandwidth = bandwidth / kernel_mul ** (kernel_num // 2)
    return sum(torch.exp(-sq_dist / (bandwidth * kernel_mul ** i)) for i in range(kernel_num))


def mmd(x: torch.Tensor, y: torch.Tensor, kernel_mul: float = 2.0, kernel_num: int = 5) -> torch.Tensor:
    """Biased MMD² estimate between equal-sized sample sets x, y (n, d): mean(K_xx + K_yy − K_xy − K_yx)."""
    k = gaussian_mixture_kernel(x, y, kernel_mul, kernel_num)
    n = x.shape[0]
    return (k[:n, :n] + k[n:, n:] - k[:n, n:] - k[n:, :n]).mean()


def noise_term(activations: Sequence[torch.Tensor], mask: torch.Tensor, generator: torch.Generator | None = None):
    """Mean over layers of MMD(masked activations, masked standard Gaussian noise), per sequence."""
    m = mask.unsqueeze(-1).to(activations[0].dtype)
    total = 0.0
    for act in activations:
        noise = torch.randn(act.shape, generator=generator, dtype=act.dtype).to(act.device)
        total = total + mmd((act * m).flatten(1), (noise * m).flatten(1))
    return total / len(activations)


def ascent_term(lens_ces: Sequence[torch.Tensor]) -> torch.Tensor:
    """log(mean over layers of the logit-lens CE + 1): what −α multiplies."""
    return torch.log(torch.stack(list(lens_ces)).mean() + 1)


class RepNoise:
    name = "repnoise"

    # Hooks (harness/hooks.py): what the runner asks of the defense before anything is built.
    check_config = rules_hook(ALPHA, STEPS, BATCH_SIZE, LR, text=True)

    @classmethod
    def memory_stages(cls, node, shape: Shape, c: Costs) -> list[Stage]:
        """Every weight trains on forget and retain text; the logit lens keeps logits of every layer."""
        batch = int(node.get("batch_size", 1))
        return [training_stage(cls.name, c, shape.params, shape.params, {
            "activations": c.activations(batch, forwards=2),  # forget and retain text
            "logit lens": c.per_token(batch, 2 * shape.layers * shape.vocab)})]  # logits + log-softmax per layer

    def __init__(self, alpha: float, beta: float, lr: float, steps: int, batch_size: int,
                 warmup_ratio: float = 0.1, forget_splits: Sequence[int] = (0, 1), seed: int = 0):
        self.alpha, self.beta = alpha, beta
        self.lr, self.steps, self.batch_size, self.warmup_ratio = lr, steps, batch_size, warmup_ratio
        self.forget_splits = list(forget_splits)
        self.seed = seed
        self.info: dict = {}

    def loss(self, model, terms: TermLog, batch: dict) -> torch.Tensor:
        f, r = batch["forget"], batch["retain"]
        layers = decoder_layers(model)
        with capture_outputs([l.mlp for l in layers] + list(layers)) as out:
            model(input_ids=f["input_ids"], attention_mask=f["attention_mask"])
        mlp_acts, hiddens = out[:len(layers)], out[len(layers):]
        # dist=fsdp: the MMD couples the rows of the batch and the ascent is a log of a mean, so both
        # are computed whole on every rank (gathered rows, summed shares) and each rank keeps its share
        rows = distributed.gather_rows
        noise = distributed.share(noise_term([rows(a) for a in mlp_acts], rows(f["attention_mask"]).bool()))
        lens = [mean_nll(logit_lens(model, h), f["labels"]) for h in hiddens]
        ascent = distributed.share(ascent_term([distributed.total(c) for c in lens]))
        retain = mean_nll(model(input_ids=r["input_ids"], attention_mask=r["attention_mask"]).logits, r["labels"])
        terms(retain_ce=retain, mmd=noise, forget_lens_ce=torch.stack(lens).mean())
        return retain + self.beta * noise - self.alpha * ascent

    def __call__(self, model, tokenizer, data):
        t0 = time.perf_counter()
        torch.manual_seed(self.seed)
        batches = forget_retain_batches(tokenizer, forget_texts(data, self.forget_splits), data.retain,
                                        self.batch_size, data.max_length, self.seed, model.device)
        terms = TermLog()
        with distributed.sharded(model) as trained:  # dist=fsdp: a sharded twin, written back at the end
            opt = adamw([p for p in trained.parameters() if p.requires_grad], self.lr)
            # the original: cosine schedule with 10 % warm-up
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lr_lambda("cosine", int(self.warmup_ratio * self.steps), self.steps))
            result = train_loop(trained, batches, lambda m, b: self.loss(m, terms, b), [opt], schedulers=[sched],
                                steps=self.steps, desc="defense repnoise")
        self.info = run_info(t0, {"train": result}, terms)
        log.info("repnoise: %s", self.info)
        return model
