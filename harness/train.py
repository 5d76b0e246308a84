"""The one training loop of the code base.

Pretraining the tiny model, every training-based defense (RMU, NPO, RepNoise, ELM, TAR) and every
relearning attack call `train_loop`; they differ only in the loss function, the parameters their
optimizers hold and the callback. Keeping one loop means gradient accumulation, second-order
backward, clipping, timing and tokens/s mean the same thing everywhere.

Under `dist=fsdp` the same loop runs on every rank with a sharded model: each rank computes its share
of every global batch's loss on its own rows (`harness.distributed`), the logged loss is the sum of
the shares, and `tokens` counts the global batch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from typing import Callable, Iterator, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from harness import distributed

log = logging.getLogger(__name__)

# loss_fn(model, batch) -> scalar loss tensor. A batch is whatever the iterator yields.
LossFn = Callable[[torch.nn.Module, dict], torch.Tensor]
# on_step(step, loss) -> True to stop early. Called after every optimizer step; its time is not
# counted as training time (evaluation happens there).
StepHook = Callable[[int, float], bool]


@dataclasses.dataclass
class LoopResult:
    steps: int = 0                 # optimizer steps taken (including those before a resume)
    losses: list[float] = dataclasses.field(default_factory=list)
    nonfinite_step: int | None = None  # first step whose loss was NaN/inf; the loop stops there
    stopped_early: bool = False    # on_step asked to stop
    train_seconds: float = 0.0     # forward/backward/step time only, hooks excluded
    tokens: int = 0                # non-padding tokens seen

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else float("nan")


def _count_tokens(batch) -> int:
    """Non-padding tokens; batches of several parts (e.g. forget + retain) are dicts of batches."""
    if not isinstance(batch, dict):
        return 0
    mask = batch.get("attention_mask")
    if mask is not None:
        return int(mask.sum())
    return sum(_count_tokens(v) for v in batch.values() if isinstance(v, dict))


def train_loop(model: torch.nn.Module, batches: Iterator, loss_fn: LossFn,
               optimizers: Sequence[torch.optim.Optimizer], *, steps: int,
               schedulers: Sequence = (), grad_accum: int = 1, create_graph: bool = False,
               max_grad_norm: float | None = None, on_step: StepHook | None = None,
               start_step: int = 0, desc: str = "train", progress: bool = True,
               losses_out: list | None = None) -> LoopResult:
    """Run `steps` optimizer steps (from `start_step`, for resumed runs).

    `losses_out`, if given, is the list the per-step losses are appended to (so a step hook can
    checkpoint them). `create_graph=True` is what Hessian-based optimizers (AdaHessian, SophiaH) need;
    it also forces the math SDPA kernel, since the fused CPU attention kernels have no double backward.
    Forward-only optimizers (MeZO) get `step(closure)` instead of a backward.
    """
    result = LoopResult(steps=start_step, losses=losses_out if losses_out is not None else [])
    params = [p for opt in optimizers for g in opt.param_groups for p in g["params"]]
    forward_only = _forward_only(optimizers)
    attention = sdpa_kernel(SDPBackend.MATH) if create_graph else contextlib.nullcontext()
    device = next(model.parameters()).device
    model.train()
    bar = tqdm(range(start_step, steps), desc=desc, disable=not progress or not distributed.is_main(),
               leave=False, dynamic_ncols=True)
    with attention:
        for step in bar:
            t0 = time.perf_counter()
            step_batches = [next(batches) for _ in range(grad_accum)]  # global batches
            result.tokens += sum(_count_tokens(b) for b in step_batches)
            # under dist=fsdp this rank trains on its rows; the ranks' shares add up to the batch's loss
            local = [distributed.local_part(b, device) for b in step_batches]
            if forward_only:
                loss_sum = _closure_step(model, local, loss_fn, optimizers[0])
            else:
                loss_sum = distributed.sum_over_ranks(_accumulate_gradients(model, local, loss_fn, create_graph))
            if not math.isfinite(loss_sum):
                result.nonfinite_step = step + 1
                _zero(optimizers)
                result.train_seconds += time.perf_counter() - t0
                log.warning("%s: non-finite loss at step %d; stopping", desc, step + 1)
                break
            if not forward_only:
                if max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                for opt in optimizers:
                    opt.step()
            for sched in schedulers:
                sched.step()
            _zero(optimizers)
            result.train_seconds += time.perf_counter() - t0
            result.losses.append(loss_sum)
            result.steps = step + 1
            bar.set_postfix(loss=f"{loss_sum:.3f}", refresh=False)
            if on_step is not None and on_step(step + 1, loss_sum):
                result.stopped_early = True
                break
    bar.close()
    model.eval()
    return result


def _forward_only(optimizers) -> bool:
    """Zeroth-order optimizers (a truthy `forward_only` attribute, e.g. attacks.mezo.MeZO) take the
    closure path: no backward, `step(closure)` evaluates the loss where it needs to."""
    flags = [bool(getattr(opt, "forward_only", False)) for opt in optimizers]
    if any(flags) and len(optimizers) > 1:
        raise ValueError("a forward-only (zeroth-order) optimizer must be the only optimizer of the loop")
    return any(flags)


def _accumulate_gradients(model, step_batches, loss_fn: LossFn, create_graph: bool) -> float:
    loss_sum = 0.0
    for batch in step_batches:
        loss = loss_fn(model, batch) / len(step_batches)
        loss.backward(create_graph=create_graph)
        loss_sum += loss.detach().item()
    return loss_sum


def _closure_step(model, step_batches, loss_fn: LossFn, optimizer) -> float:
    """One step of a forward-only optimizer: the closure is the mean loss of this step's batches at
    the current parameters, without a graph; the optimizer calls it as often as it needs (MeZO: twice,
    at two perturbations) and returns the loss it reports."""
    def closure() -> torch.Tensor:
        with torch.no_grad():  # dist=fsdp: the sum of the ranks' shares, so every rank steps alike
            loss = distributed.global_sum(sum(loss_fn(model, b) for b in step_batches) / len(step_batches))
        distributed.reshard(model)  # the optimizer moves the weights before the next forward
        return loss
    return float(optimizer.step(closure))


def _zero(optimizers) -> None:
    # set_to_none breaks the param <-> grad reference cycle that create_graph=True leaves behind.
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier on the base lr: linear warm-up, then constant, linear or cosine decay to 0."""
    if schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"schedule={schedule!r}: allowed constant, linear, cosine")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        frac = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 1 - frac) if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    return factor


def lm_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Next-token cross-entropy on non-padding tokens (labels carry -100 on padding)."""
    shares = {}
    if distributed.active():  # sum over this rank's tokens / tokens of the global batch: its share of the mean
        shares["num_items_in_batch"] = distributed.global_sum((batch["labels"][:, 1:] != -100).sum())
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 labels=batch["labels"], **shares).loss
