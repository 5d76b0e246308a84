"""Hydra's basic sweeper (the product of `params`) less the jobs an entry of `skip` names: a preset whose full
product would cost more than its cells say (experiment=diffusion_table: the curvature-aware optimizers at one
learning rate on the defended rows) keeps one command and one sweep folder.

    hydra.sweeper.skip: [{defense: esd,imma_esd, attack: sophia,muon, diffusion_table.lr_rank: 0}]

A job is skipped when, for every key of one entry, its override of that key has one of the entry's
comma-separated values; the jobs left keep the basic sweeper's order and are numbered from 0.
Hydra only instantiates sweepers from the `hydra_plugins` package: the class registered there
(hydra_plugins/specdef_grid) is this one under that name.
"""
from __future__ import annotations

from typing import Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

from harness.errors import ConfigError


class GridSweeper(BasicSweeper):
    def __init__(self, max_batch_size: int | None = None, params: dict | None = None, skip: Sequence = ()):
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.skip = [parse_entry(e) for e in skip or ()]

    def get_job_batch(self) -> Sequence[Sequence[str]]:
        return [job for job in super().get_job_batch() if not self.skipped(job)]

    def skipped(self, job: Sequence[str]) -> bool:
        values = dict(o.split("=", 1) for o in job)
        return any(all(values.get(k) in allowed for k, allowed in entry.items()) for entry in self.skip)


def parse_entry(entry) -> dict[str, set[str]]:
    if not entry or not hasattr(entry, "items"):
        raise ConfigError(f"hydra.sweeper.skip entry {entry!r}: allowed a non-empty mapping key: comma list")
    return {str(k): {v.strip() for v in str(vals).split(",")} for k, vals in entry.items()}
