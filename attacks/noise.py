"""Seeded Gaussian draws shared by the randomised attack optimizers (MeZO, SGLD).

The draw of step t is a function of (seed, t) alone: regenerating it costs no memory (MeZO draws the
same z three times per step instead of storing it), a test can recompute it by hand, and a resumed
run continues with the draws it would have had.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch


def step_seed(seed: int, step: int) -> int:
    # distinct for every (seed, step) with step < 2**32
    return (int(seed) << 32) + int(step)


def gaussians(params: Sequence[torch.Tensor], seed: int, step: int) -> Iterator[torch.Tensor]:
    """N(0, 1) tensors shaped like `params`, drawn in order from one generator per device seeded with
    step_seed(seed, step). A sharded parameter (dist=fsdp) gets its shard of the draw the whole
    parameter gets, so a sharded run draws what one process draws."""
    generators: dict[torch.device, torch.Generator] = {}
    for p in params:
        if p.device not in generators:
            generators[p.device] = torch.Generator(device=p.device).manual_seed(step_seed(seed, step))
        yield _like(torch.randn(p.shape, generator=generators[p.device], device=p.device, dtype=p.dtype), p)


def _like(z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor, distribute_tensor
    if isinstance(p, DTensor):  # every rank drew the whole tensor; each keeps its shard, no communication
        return distribute_tensor(z, p.device_mesh, p.placements, src_data_rank=None)
    return z
