"""What the baseline defenses share: a frozen reference copy, paired forget/retain batches, the
AdamW build, hidden-state capture by forward hooks, masked token reductions and the run record.

Every baseline trains through `harness.train.train_loop`; this module only prepares what goes in
(batches, the loss's ingredients, which parameters train) and what comes out (`info`).
"""
from __future__ import annotations

import contextlib
import copy
import time
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from harness import distributed
from harness.batches import batch_iterator
from harness.errors import ConfigError
from harness.rules import MISSING, Rule, check_rules, get, non_negative_int, positive, positive_int
from harness.train import LoopResult

# Config rules (harness/rules.py) of keys several baselines share: each baseline's `check_config` hook
# (harness/hooks.py, `rules_hook`) checks those of its config before any model loads.
ALPHA: Rule = ("alpha", positive, "a finite number > 0")
STEPS: Rule = ("steps", non_negative_int, "an integer >= 0")
BATCH_SIZE: Rule = ("batch_size", positive_int, "an integer >= 1")
LR: Rule = ("lr", positive, "a finite number > 0")


def rules_hook(*rules: Rule, text: bool = False):
    """A `check_config` hook that checks `rules` on the defense's own config; with `text`, a language-model
    baseline's, that the run's data is text too (check_text_data)."""
    def check_config(cfg, node, key: str) -> None:
        if text:
            check_text_data(cfg, node, key)
        check_rules(node, list(rules), f"{key}.")
    return staticmethod(check_config)


def check_text_data(cfg, node, key: str) -> None:
    """A language-model baseline (it trains a causal LM on the forget and retain corpora) on an image track's
    data stops here, before any model loads."""
    kind = get(cfg, "data.kind")
    if kind is not MISSING and kind in ("images", "diffusion"):
        raise ConfigError(f"{key}._target_={node.get('_target_')} with data={get(cfg, 'data.name')}: a language-model "
                          "baseline; allowed text data (data=synthetic, wmdp_bio), or the image tracks' defenses "
                          "(vision: class_npo, condition_number, specdef_vit*; diffusion: esd, imma*, specdef_unet*, "
                          "specdef_sd*)")


# ---------------------------------------------------------------------------------------------
# Model plumbing
# ---------------------------------------------------------------------------------------------

def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy in eval mode with no trainable parameters: the reference/frozen model of RMU,
    NPO, ELM's consistency generator and TAR's representation anchor (dist=fsdp: sharded too)."""
    if distributed.active():
        return distributed.frozen(model)
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of a Llama-style causal LM (`model.model.layers`)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ConfigError(f"{type(model).__name__}: the baselines need a Llama-style model with "
                          "`model.model.layers`, `model.model.norm` and `lm_head`")
    return layers


def check_layer_ids(ids: Iterable[int], model: torch.nn.Module, key: str) -> list[int]:
    """Layer indices from the config, checked against the model (the paper's indices are for 32 layers)."""
    n = len(decoder_layers(model))
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < n]
    if bad or not ids:
        raise ConfigError(f"defense.{key}={ids}: allowed a non-empty list of layer indices 0..{n - 1} "
                          f"(this model has {n} decoder layers)")
    return ids


@contextlib.contextmanager
def only_train(model: torch.nn.Module, params: Sequence[torch.nn.Parameter]):
    """Freeze every parameter except `params` for the duration; restore the flags afterwards, so the
    attack that follows sees the model's own trainable set, not the defense's."""
    flags = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield list(params)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


@contextlib.contextmanager
def capture_outputs(modules: Sequence[torch.nn.Module]):
    """Record each module's forward output (list, same order as `modules`) while the block runs.

    Hooks rather than `output_hidden_states`: transformers returns the *normed* last hidden state
    there, and MLP outputs (RepNoise) are not among the hidden states at all.
    """
    outputs: list = [None] * len(modules)

    def hook_for(i):
        def hook(_module, _inputs, out):
            outputs[i] = out[0] if isinstance(out, tuple) else out
        return hook

    handles = [m.register_forward_hook(hook_for(i)) for i, m in enumerate(modules)]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


def logit_lens(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Read a residual-stream state out through the final norm and the unembedding."""
    return model.get_output_embeddings()(model.model.norm(hidden))


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def zip_batches(streams: dict[str, Iterator[dict]], device) -> Iterator[dict]:
    """Endless dicts {name: batch} drawing one batch from each stream per step, on `device`."""
    while True:
        yield {name: to_device(next(it), device) for name, it in streams.items()}


def forget_retain_batches(tokenizer, forget: Sequence[str], retain: Sequence[str], batch_size: int,
                          max_length: int, seed: int, device) -> Iterator[dict]:
    """Endless pairs {"forget": batch, "retain": batch}; each stream reshuffles every epoch."""
    return zip_batches({"forget": batch_iterator(tokenizer, forget, batch_size, max_length, seed),
                        "retain": batch_iterator(tokenizer, retain, batch_size, max_length, seed + 1)}, device)


# Which of `Data`'s benign corpora a defense holds its model to: the domain's benign text
# (WMDP's bio-retain corpus) or general text (Wikitext).
RETAIN_CORPORA = ("retain", "unrelated")


def forget_texts(data, splits: Sequence[int]) -> list[str]:
    n = len(data.forget)
    bad = [s for s in splits if s not in data.forget]
    if bad or not splits:
        raise ConfigError(f"defense.forget_splits={list(splits)}: allowed a non-empty list of hazard "
                          f"split indices 0..{n - 1}")
    return data.forget_texts(list(splits))


def adamw(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW with torch's default weight decay, which the originals of ELM, RepNoise, NPO and RMU use."""
    return torch.optim.AdamW(list(params), lr=lr, weight_decay=weight_decay)


# ---------------------------------------------------------------------------------------------
# Token reductions (all losses ignore padding)
# ---------------------------------------------------------------------------------------------

def masked_token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of per-token `values` (B, T) over positions where `mask` (B, T) is true (dist=fsdp: this
    rank's share of the mean over the global batch, as in every reduction here)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / distributed.global_sum(mask.sum()).clamp_min(1)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL per position (B, T-1) and the mask of positions that count (label != -100)."""
    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    valid = shift_labels != -100
    nll = F.cross_entropy(shift_logits.flatten(0, 1).float(), shift_labels.clamp_min(0).flatten(),
                          reduction="none").view_as(shift_labels)
    return nll * valid, valid


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed NLL of each sequence (B,): -log pi(y|x) as NPO uses it."""
    nll, _ = token_nll(logits, labels)
    return nll.sum(dim=1)


def mean_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over the batch's real tokens (what `model(labels=...).loss` is)."""
    nll, valid = token_nll(logits, labels)
    return nll.sum() / distributed.global_sum(valid.sum()).clamp_min(1)


# ---------------------------------------------------------------------------------------------
# Record
# ---------------------------------------------------------------------------------------------

class TermLog:
    """The latest value of each named loss term, for the progress bar and `info` (dist=fsdp: the sum
    of the ranks' shares, i.e. the term on the global batch)."""

    def __init__(self):
        self.last: dict[str, float] = {}

    def __call__(self, **terms: torch.Tensor | float) -> None:
        for k, v in terms.items():
            self.last[k] = distributed.sum_over_ranks(float(v.detach()) if torch.is_tensor(v) else float(v))


def run_info(t0: float, results: dict[str, LoopResult], terms: TermLog, **extra) -> dict:
    """What goes into the run record: wall time, steps and final loss of each stage, last loss terms."""
    info: dict = {"wall_seconds": round(time.perf_counter() - t0, 3)}
    for stage, r in results.items():
        info[f"{stage}_steps"] = r.steps
        info[f"{stage}_final_loss"] = r.losses[-1] if r.losses else None
        if r.nonfinite_step is not None:
            info[f"{stage}_nonfinite_step"] = r.nonfinite_step
    info["final_terms"] = dict(terms.last)
    info.update(extra)
    return info
