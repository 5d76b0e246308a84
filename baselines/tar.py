"""TAR, Tamper-Attack Resistance (Tamirisa et al. 2024, rishub-tamirisa/tamper-resistance).

Stage 1, random mapping: on forget text, push every hidden state (embeddings and each layer, as
`output_hidden_states` returns them) toward a fixed random vector per token id,
1 − |cos(h_t, r[x_t])|, while keeping next-token NLL on retain text.

Stage 2, first-order meta-learning against fine-tuning adversaries. One outer step:
  1. save θ; sample an adversary learning rate from `adversary_lrs` (the adversary fine-tunes on
     forget text, held apart from the held-out forget text x_tr the tamper-resistance loss reads);
  2. run K = `inner_steps` AdamW steps of the adversary; after every `inner_subsample`-th step i
     (0-based) take the tamper-resistance loss L_TR = −entropy(softmax(logits(x_tr))) and add
     tr_grad_scale · exp(λ (i − (K−1))) · ∇L_TR, evaluated at the tampered weights, to a buffer
     (first-order: the adversary's steps are not differentiated through);
  3. restore θ; add the retain loss (NLL + mean over hidden states of the mean L2 distance to the
     model before TAR) and the buffered meta-gradient; take the outer step.

Both the adversary's fine-tuning and the outer loop run through `harness.train.train_loop`: the
adversary is an inner `train_loop` call whose `on_step` hook collects the meta-gradient, and the
outer loss function returns the retain loss with that gradient attached (see `attach_gradient`).

The original outer optimizer is schedule-free AdamW; schedule-free needs train()/eval() mode calls
around every evaluation, which the shared loop does not make, so this uses AdamW with linear warm-up.
The original also mixes adversaries fine-tuning on retain-then-forget text; here they all use forget
text, the attack this project measures.
"""
from __future__ import annotations

import logging
import math
import random
import time
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from baselines.common import (BATCH_SIZE, TermLog, adamw, check_text_data, forget_retain_batches, forget_texts,
                              frozen_copy, mean_nll, run_info, to_device)
from harness import distributed
from harness.batches import batch_iterator
from harness.distributed import check_rows_per_rank
from harness.memory import Costs, Shape, Stage, training_stage
from harness.rules import Rule, check_rules, non_negative_int, positive_int
from harness.train import lm_loss, lr_lambda, train_loop

log = logging.getLogger(__name__)
# TAR's own keys (harness/rules.py), checked before any model loads (`TAR.check_config`).
RULES: list[Rule] = [
    ("rm_steps", non_negative_int, "an integer >= 0"),
    ("outer_steps", non_negative_int, "an integer >= 0"),
    ("inner_steps", positive_int, "an integer >= 1"),
    ("inner_subsample", positive_int, "an integer >= 1"),
    BATCH_SIZE,
]


# ---------------------------------------------------------------------------------------------
# Loss terms
# ---------------------------------------------------------------------------------------------

def random_mapping_term(hiddens: Sequence[torch.Tensor], targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over hidden states of the mean over real tokens of 1 − |cos(h_t, r_t)|; targets (B, T, d)."""
    m = mask.to(hiddens[0].dtype)
    n = distributed.global_sum(m.sum())  # dist=fsdp: this rank's share of the mean over the global batch
    per_layer = [((1 - F.cosine_similarity(h, targets, dim=-1).abs()) * m).sum() / n for h in hiddens]
    return torch.stack(per_layer).mean()


def representation_term(hiddens: Sequence[torch.Tensor], base: Sequence[torch.Tensor], mask: torch.Tensor):
    """Mean over hidden states of the mean over real tokens of ‖h_t − h_base,t‖₂."""
    m = mask.to(hiddens[0].dtype)
    n = distributed.global_sum(m.sum())
    per_layer = [((h - b).norm(dim=-1) * m).sum() / n for h, b in zip(hiddens, base)]
    return torch.stack(per_layer).mean()


def negative_entropy(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """−H(softmax(logits)) averaged over positions (the tamper-resistance loss, to be minimised)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    neg_h = (logp.exp() * logp).sum(-1)
    if mask is None:
        return distributed.batch_mean(neg_h)
    m = mask.to(neg_h.dtype)
    return (neg_h * m).sum() / distributed.global_sum(m.sum())


def inner_weight(i: int, k: int, schedule_lambda: float) -> float:
    """exp(λ (i − (K−1))) for 0-based inner step i: later (more tampered) steps weigh more."""
    return math.exp(schedule_lambda * (i - (k - 1)))


def attach_gradient(loss: torch.Tensor, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]):
    """`loss` with the same value but d/dθ increased by `grads`: adds Σ⟨θ, g⟩ − Σ⟨θ, g⟩.detach().
    This is how a precomputed (meta-)gradient rides through train_loop's single backward. Under
    dist=fsdp each rank adds its shard of the gradient to its shard of θ, outside the reduction."""
    local = distributed.local_tensor
    surrogate = sum((local(p) * local(g)).sum() for p, g in zip(params, grads))
    return loss + surrogate - surrogate.detach()


# ---------------------------------------------------------------------------------------------
# The defense
# ---------------------------------------------------------------------------------------------

class TAR:
    name = "tar"

    # Hooks (harness/hooks.py): what the runner asks of the defense before anything is built.

    @staticmethod
    def check_config(cfg, node, key: str) -> None:
        check_text_data(cfg, node, key)
        check_rules(node, RULES, f"{key}.")
        if (cfg.get("dist") or {}).get("name") == "fsdp":  # every rank trains on its own rows of each batch
            check_rows_per_rank(f"{key}.adversary_batch_size", node.get("adversary_batch_size"),
                                distributed.launched_world_size())

    @classmethod
    def memory_stages(cls, node, shape: Shape, c: Costs) -> list[Stage]:
        """Every weight trains, against a frozen copy, with an inner adversary (its AdamW state, a saved
        θ and the meta-gradient)."""
        p = shape.params
        batch = max(int(node.get("batch_size", 1)), int(node.get("adversary_batch_size", 1)))
        return [training_stage(cls.name, c, p, p, {
            "frozen copy": c.weights(p), "adversary state": c.weights(4 * p),
            "activations": c.activations(batch, forwards=2)})]

    def __init__(self, rm_steps: int, rm_lr: float, outer_steps: int, outer_lr: float, warmup_steps: int,
                 inner_steps: int, inner_subsample: int, adversary_lrs: Sequence[float], adversary_batch_size: int,
                 batch_size: int, tr_grad_scale: float, schedule_lambda: float, retain_scale: float,
                 heldout_fraction: float = 0.5, forget_splits: Sequence[int] = (0, 1), seed: int = 0):
        self.rm_steps, self.rm_lr = rm_steps, rm_lr
        self.outer_steps, self.outer_lr, self.warmup_steps = outer_steps, outer_lr, warmup_steps
        self.inner_steps, self.inner_subsample = inner_steps, inner_subsample
        self.adversary_lrs = [float(x) for x in adversary_lrs]
        self.adversary_batch_size, self.batch_size = adversary_batch_size, batch_size
        self.tr_grad_scale, self.schedule_lambda, self.retain_scale = tr_grad_scale, schedule_lambda, retain_scale
        self.heldout_fraction = heldout_fraction
        self.forget_splits = list(forget_splits)
        self.seed = seed
        self.info: dict = {}

    # -- stage 1 ---------------------------------------------------------------------------------

    def mapping_loss(self, model, table: torch.Tensor, terms: TermLog, batch: dict) -> torch.Tensor:
        f, r = batch["forget"], batch["retain"]
        hs = model(input_ids=f["input_ids"], attention_mask=f["attention_mask"], output_hidden_states=True).hidden_states
        cos = random_mapping_term(hs, table[f["input_ids"]], f["attention_mask"].bool())
        nll = mean_nll(model(input_ids=r["input_ids"], attention_mask=r["attention_mask"]).logits, r["labels"])
        terms(random_map_cos=cos, rm_retain_nll=nll)
        return cos + nll

    def random_mapping(self, model, tokenizer, data, forget: list[str], terms: TermLog):
        gen = torch.Generator().manual_seed(self.seed)
        table = torch.randn(model.config.vocab_size, model.config.hidden_size, generator=gen).to(model.device)
        batches = forget_retain_batches(tokenizer, forget, data.retain, self.batch_size, data.max_length,
                                        self.seed, model.device)
        params = [p for p in model.parameters() if p.requires_grad]
        return train_loop(model, batches, lambda m, b: self.mapping_loss(m, table, terms, b),
                          [adamw(params, self.rm_lr)], steps=self.rm_steps, desc="defense tar: random mapping")

    # -- stage 2 ---------------------------------------------------------------------------------

    def tamper_resistance_grads(self, model, params, adversary: Iterator[dict], heldout: dict,
                                rng: random.Random) -> tuple[list[torch.Tensor], list[float]]:
        """Run one sampled adversary from the current θ, collect the weighted ∇L_TR, restore θ."""
        heldout = distributed.local_part(heldout)  # dist=fsdp: this rank's rows
        saved = [p.detach().clone() for p in params]
        grads = [torch.zeros_like(p) for p in params]
        tr_losses: list[float] = []
        k = self.inner_steps

        def on_step(step: int, _loss: float) -> bool:
            if step % self.inner_subsample:
                return False
            tr = negative_entropy(model(input_ids=heldout["input_ids"], attention_mask=heldout["attention_mask"]).logits,
                                  heldout["attention_mask"].bool())
            weight = self.tr_grad_scale * inner_weight(step - 1, k, self.schedule_lambda)
            # backward rather than autograd.grad: a sharded θ gets its gradient from FSDP's reduction
            tr.backward()
            for acc, p in zip(grads, params):
                acc.add_(p.grad, alpha=weight)
                p.grad = None  # the adversary's next step starts from its own gradient only
            tr_losses.append(float(tr.detach()))
            return False

        inner_opt = torch.optim.AdamW(params, lr=rng.choice(self.adversary_lrs))
        train_loop(model, adversary, lm_loss, [inner_opt], steps=k, on_step=on_step, desc="tar adversary",
                   progress=False)
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        model.train()  # train_loop leaves the model in eval mode; the outer step continues training
        return grads, tr_losses

    def retain_loss(self, model, base, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        with torch.no_grad():
            ref = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        nll = mean_nll(out.logits, batch["labels"])
        return nll, representation_term(out.hidden_states, ref.hidden_states, batch["attention_mask"].bool())

    def outer_loss(self, model, base, params, adversary, heldout, rng, terms: TermLog, batch: dict) -> torch.Tensor:
        grads, tr_losses = self.tamper_resistance_grads(model, params, adversary, next(heldout), rng)
        nll, rep = self.retain_loss(model, base, batch)
        terms(retain_nll=nll, retain_rep_l2=rep, tr_neg_entropy_last=tr_losses[-1] if tr_losses else float("nan"))
        return attach_gradient(self.retain_scale * (nll + rep), params, grads)

    def __call__(self, model, tokenizer, data):
        t0 = time.perf_counter()
        torch.manual_seed(self.seed)
        rng = random.Random(self.seed)
        base = frozen_copy(model)  # the retain anchor is the model before TAR, as in the original
        forget = forget_texts(data, self.forget_splits)
        shuffled = rng.sample(forget, len(forget))
        n_heldout = max(1, int(self.heldout_fraction * len(forget)))
        heldout_texts, adversary_texts = shuffled[:n_heldout], shuffled[n_heldout:] or shuffled
        terms = TermLog()
        with distributed.sharded(model) as trained:  # dist=fsdp: a sharded twin, written back at the end
            rm = self.random_mapping(trained, tokenizer, data, forget, terms)
            meta = self.meta_learning(trained, base, tokenizer, data, heldout_texts, adversary_texts, rng, terms)
        self.info = run_info(t0, {"random_mapping": rm, "meta": meta}, terms)
        log.info("tar: %s", self.info)
        return model

    def meta_learning(self, model, base, tokenizer, data, heldout_texts: list[str], adversary_texts: list[str],
                      rng: random.Random, terms: TermLog):
        params = [p for p in model.parameters() if p.requires_grad]
        device = model.device
        adversary = (to_device(b, device) for b in batch_iterator(
            tokenizer, adversary_texts, self.adversary_batch_size, data.max_length, self.seed + 2))
        heldout = (to_device(b, device) for b in batch_iterator(
            tokenizer, heldout_texts, self.batch_size, data.max_length, self.seed + 3))
        retain = (to_device(b, device) for b in batch_iterator(
            tokenizer, data.retain, self.batch_size, data.max_length, self.seed + 4))
        opt = adamw(params, self.outer_lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("constant", self.warmup_steps, self.outer_steps))
        return train_loop(model, retain,
                          lambda m, b: self.outer_loss(m, base, params, adversary, heldout, rng, terms, b),
                          [opt], schedulers=[sched], steps=self.outer_steps, desc="defense tar: meta")
