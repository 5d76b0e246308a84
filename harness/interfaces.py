"""The three small interfaces every method plugs into, and the two methods that do nothing.

- A **defense** is built from `conf/defense/<name>.yaml` (`_target_` + its arguments) and called as
  `defense(model, tokenizer, data) -> model`. It may modify the model in place or return a new one,
  and leaves anything worth recording in `defense.info` (a dict).
- An **attack** is built from `conf/attack/<name>.yaml` and called as
  `attack(model, tokenizer, data, evaluator, start=<metrics>, threshold=<float>, on_eval=<callback>,
  checkpoint_dir=<folder>) -> AttackResult` (harness/outcome.py).
- An **evaluator** is called as `evaluator(model) -> dict` of metrics (see `harness.evaluate`).

Training-based defenses and attacks both train through `harness.train.train_loop`. A method may also
carry hooks that the runner finds through its `_target_` class (harness/hooks.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

from harness.memory import Stage
from harness.outcome import AttackResult, first_event, steps_to_recover

if TYPE_CHECKING:
    import torch

    from harness.data import Data


class Evaluator(Protocol):
    def __call__(self, model: torch.nn.Module) -> dict: ...


class Defense(Protocol):
    name: str
    info: dict

    def __call__(self, model: torch.nn.Module, tokenizer, data: Data) -> torch.nn.Module: ...


class Attack(Protocol):
    name: str
    recover_threshold: float | None  # None: the undefended model's hazard accuracy, or `default_threshold(base, data)`

    def __call__(self, model, tokenizer, data: Data, evaluator: Evaluator, *, start: dict,
                 threshold: float | None, on_eval: Callable[[dict], None] | None = None,
                 checkpoint_dir: Path | None = None) -> AttackResult: ...


class NoDefense:
    """The undefended model (`defense=none`)."""
    name = "none"

    @staticmethod
    def memory_stages(node, shape, costs) -> list[Stage]:
        return []  # nothing trains (a memory hook: harness/hooks.py)

    def __init__(self):
        self.info: dict = {}

    def __call__(self, model, tokenizer, data):
        return model


class NoAttack:
    """`attack=none`: score the defended model only (e.g. for the utility table)."""
    name = "none"

    def __init__(self, recover_threshold: float | None = None):
        self.recover_threshold = recover_threshold

    @staticmethod
    def memory_stage(node, shape, costs, defended) -> Stage:
        return Stage("none", {})  # nothing trains; the evaluation stage counts the model

    def __call__(self, model, tokenizer, data, evaluator, *, start, threshold, on_eval=None, checkpoint_dir=None):
        point = {"step": 0, "loss": None, **start}
        recovered = steps_to_recover([point], threshold)  # the start is intact by definition
        return AttackResult(trajectory=[point], steps_to_recover=recovered,
                            threshold=threshold, diverged=False, divergence_step=None, divergence_reason=None,
                            steps=0, final=dict(start), best_hazard_acc=start.get("hazard_acc", float("nan")),
                            tokens_per_second=float("nan"), train_seconds=0.0, losses=[],
                            outcome=first_event([point], recovered, None, 0))
