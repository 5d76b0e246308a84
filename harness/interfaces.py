"""The three small interfaces every method plugs into.

- A **defense** is built from `conf/defense/<name>.yaml` (`_target_` + its arguments) and called as
  `defense(model, tokenizer, data) -> model`. It may modify the model in place or return a new one,
  and leaves anything worth recording in `defense.info` (a dict).
- An **attack** is built from `conf/attack/<name>.yaml` and called as
  `attack(model, tokenizer, data, evaluator, start=<metrics>, threshold=<float>) -> AttackResult`.
- An **evaluator** is called as `evaluator(model) -> dict` of metrics (see `harness.evaluate`).

Training-based defenses and attacks both train through `harness.train.train_loop`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import torch

from harness.data import Data


class Evaluator(Protocol):
    def __call__(self, model: torch.nn.Module) -> dict: ...


class Defense(Protocol):
    name: str
    info: dict

    def __call__(self, model: torch.nn.Module, tokenizer, data: Data) -> torch.nn.Module: ...


@dataclasses.dataclass
class AttackResult:
    trajectory: list[dict]               # one entry per evaluated step; step 0 is the starting model
    steps_to_recover: int | None         # first evaluated step counted as recovered (attack.recovery_rule)
    threshold: float | None
    diverged: bool                       # the paper's dagger: retain perplexity up > factor x, or non-finite loss
    divergence_step: int | None
    divergence_reason: str | None
    steps: int                           # optimizer steps actually taken
    final: dict                          # metrics at the last evaluated step
    best_hazard_acc: float
    tokens_per_second: float
    train_seconds: float
    losses: list[float]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    # which came first: {kind: recovered | diverged | not_recovered, step, hazard_acc} (attacks.relearn.first_event)
    outcome: dict[str, Any] = dataclasses.field(default_factory=dict)
    recovery_rule: dict[str, Any] = dataclasses.field(default_factory=dict)  # the rule steps_to_recover used

    def summary(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("losses")
        return d


class Attack(Protocol):
    name: str

    def __call__(self, model, tokenizer, data: Data, evaluator: Evaluator, *, start: dict,
                 threshold: float | None) -> AttackResult: ...


class NoDefense:
    """The undefended model (`defense=none`)."""
    name = "none"

    def __init__(self):
        self.info: dict = {}

    def __call__(self, model, tokenizer, data):
        return model
