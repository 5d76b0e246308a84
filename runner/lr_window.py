"""The learning-rate window of one (α, optimizer) cell, as a pure search over run outcomes.

η_max is the largest learning rate whose run is not † (diverged); η_min the smallest that recovers
within the budget. The window is empty when no learning rate recovers (η_min > η_max, or no η_min):
SpecDef has won at that α. Each run's verdict is the record's `attack.outcome.kind` (harness/outcome.py
decides it); this module never re-derives it.

The search, in log10(lr):
1. the coarse ladder, `points_per_decade` points from `low` to `high`, run from the top down,
   `points_per_round` points a round (None: all at once). The descent stops at a run that neither
   recovered nor diverged (`patience` of them in a row until one has recovered): below it no run would
   recover either, and each would take the whole budget, the costly kind of run;
2. each round, one run per edge that is not yet pinned down:
   - η_max: between the largest non-† lr `a` and the smallest † lr above it `b`, the geometric middle,
     until log10(b / a) <= `resolution`;
   - η_min: between the smallest recovered lr `d` and the largest lr below it `c`, likewise;
   - an edge beyond the probed range (every run †, the top run not †, the bottom run recovered)
     moves the range by `extend` decades per round, at most `max_extension` decades past the ladder;
     at that bound the edge is reported censored.

Both edges are read literally from the runs made (largest non-†, smallest recovered), so every run
above η_max is † and every run below η_min did not recover: the brackets are always well formed and
the search ends, whatever the outcomes. When the runs are not monotone in lr (a † below a run that is
not †, or a run that did not recover between two that did), the window is still the literal one, and
`Window.inversions` names the runs that break the order, so a reader sees the cell is not clean. Runs
are deterministic for a given lr (fixed seed), so "noise" shows up only as such inversions. What is not
run cannot be seen: an inversion between two runs, or below where the descent stopped, goes unnoticed,
and a † island on the only ladder point under the edge hides the edge above it (tests/test_lr_window.py).

`find_window(outcome_of, ladder)` runs the search against any function lr -> outcome (the tests give it
synthetic ones); the Hydra sweeper (runner/lr_window_sweeper.py) drives one `WindowSearch` per cell
and launches every cell's pending runs of a round as one batch.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

RECOVERED, DIVERGED, NOT_RECOVERED = "recovered", "diverged", "not_recovered"
KINDS = (RECOVERED, DIVERGED, NOT_RECOVERED)


@dataclasses.dataclass(frozen=True)
class Ladder:
    """Where one cell's search starts and how far it refines (learning rates, decades)."""
    low: float                     # the coarse ladder's lowest learning rate
    high: float                    # ... and its highest
    points_per_decade: float = 1.0
    resolution: float = 0.25       # decades: an edge is pinned when its bracket is this narrow
    extend: float = 2.0            # decades the range moves per round when an edge lies beyond it
    max_extension: float = 6.0     # decades past low / high the range may move
    points_per_round: int | None = None  # ladder points run per round, from the top down (None: all at once)
    patience: int = 2              # the descent stops after this many ladder runs in a row neither recovered nor †

    def __post_init__(self):
        if not (0 < self.low < self.high and math.isfinite(self.high)):
            raise ValueError(f"ladder [{self.low}, {self.high}]: allowed 0 < low < high")
        if self.points_per_decade <= 0 or self.resolution <= 0 or self.extend <= 0 or self.max_extension < 0:
            raise ValueError("points_per_decade, resolution and extend must be > 0, max_extension >= 0")
        if self.points_per_round is not None and self.points_per_round < 1:
            raise ValueError(f"points_per_round={self.points_per_round}: allowed null or >= 1")
        if self.patience < 1:
            raise ValueError(f"patience={self.patience}: allowed >= 1")

    def points(self) -> list[float]:
        lo, hi = math.log10(self.low), math.log10(self.high)
        n = max(1, round((hi - lo) * self.points_per_decade))
        return [_round_lr(10 ** (lo + i * (hi - lo) / n)) for i in range(n + 1)]

    @property
    def floor(self) -> float:
        return _round_lr(self.low / 10 ** self.max_extension)

    @property
    def ceiling(self) -> float:
        return _round_lr(self.high * 10 ** self.max_extension)


@dataclasses.dataclass
class Window:
    """One cell's result. `None` edges: η_max None = every run down to the floor was †; η_min None = no
    run recovered. A censored edge (`eta_max_censored`, `eta_min_censored`) sits at the end of the
    range the search may probe: the true edge is beyond it."""
    eta_max: float | None
    eta_max_above: float | None      # the smallest † lr above η_max (its bracket's upper end)
    eta_max_censored: bool           # η_max is the ceiling (no † found above) or None (every run †)
    eta_min: float | None
    eta_min_below: float | None      # the largest lr below η_min that did not recover
    eta_min_censored: bool           # η_min is the floor: smaller learning rates may recover too
    best_lr: float | None            # the attacker-best lr: fewest steps to recover, then highest accuracy
    best_steps: int | None
    best_hazard_acc: float | None
    inversions: list[str]            # runs out of the monotone order (see the module docstring)
    probes: list[dict]               # every run: {lr, kind, step, hazard_acc}, by lr
    rounds: int

    @property
    def empty(self) -> bool:
        return self.eta_min is None or self.eta_max is None or self.eta_min > self.eta_max

    @property
    def decades(self) -> float | None:
        """The window's width, log10(η_max / η_min); None when empty."""
        return None if self.empty else math.log10(self.eta_max / self.eta_min)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "empty": self.empty, "decades": self.decades}


class WindowSearch:
    """The search of one cell as a state machine: `pending()` lists the learning rates to run next
    (empty: done), `record(lr, outcome)` takes each run's outcome, `window()` reads the result."""

    def __init__(self, ladder: Ladder):
        self.ladder = ladder
        self.outcomes: dict[float, dict] = {}
        self.rounds = 0

    def record(self, lr: float, outcome: dict | str) -> None:
        self.outcomes[lr] = _outcome(outcome)

    def pending(self) -> list[float]:
        descent = self._descent()
        edges = [self._eta_max_next(descending=bool(descent))]
        if not descent:  # the bottom of the recovered runs is known only once the descent has stopped
            edges.append(self._eta_min_next())
        new = sorted(set(descent + [lr for lr in edges if lr is not None]) - set(self.outcomes))
        if new:
            self.rounds += 1
        return new

    def _lrs(self, keep: Callable[[str], bool]) -> list[float]:
        return sorted(lr for lr, o in self.outcomes.items() if keep(o["kind"]))

    def _descent(self) -> list[float]:
        """The next ladder points, from the top down. The descent stops at a run that neither recovered
        nor diverged: below it no run would recover either (if the runs are monotone in lr), and each
        would run the whole budget, the costly kind. Until a run has recovered it takes `patience` such
        runs in a row: a lone one just under the † edge (the model damaged, not †) must not hide a
        window below it."""
        points = self.ladder.points()
        done = [lr for lr in points if lr in self.outcomes]
        need = 1 if self._lrs(lambda k: k == RECOVERED) else self.ladder.patience
        tail = [self.outcomes[lr]["kind"] for lr in done[:need]]
        if len(tail) == need and set(tail) == {NOT_RECOVERED}:
            return []
        lowest = min(self.outcomes, default=math.inf)
        below = [lr for lr in points if lr < lowest]
        return below[::-1][: self.ladder.points_per_round or len(below)]

    def _eta_max_next(self, descending: bool = False) -> float | None:
        """The next run that narrows the †/not-† edge, or moves the range toward it."""
        stable = self._lrs(lambda k: k != DIVERGED)
        if not stable:  # every run †: the edge is below the range (the descent, then extension, go there)
            return None if descending or not self.outcomes else _step_down(min(self.outcomes), self.ladder)
        a = stable[-1]
        above = [lr for lr in self.outcomes if lr > a]
        if not above:  # the top run is not †: the edge is above the range
            return _step_up(a, self.ladder)
        return _middle(a, min(above), self.ladder.resolution)

    def _eta_min_next(self) -> float | None:
        """The next run that narrows the recovered/not edge, or moves the range below it."""
        recovered = self._lrs(lambda k: k == RECOVERED)
        if not recovered:  # no window found (yet: the η_max bisection may still land in one)
            return None
        d = recovered[0]
        below = [lr for lr in self.outcomes if lr < d]
        if not below:  # the bottom run recovered: smaller learning rates may too
            return _step_down(d, self.ladder)
        return _middle(max(below), d, self.ladder.resolution)

    def window(self) -> Window:
        stable = self._lrs(lambda k: k != DIVERGED)
        recovered = self._lrs(lambda k: k == RECOVERED)
        eta_max = stable[-1] if stable else None
        above = [lr for lr in self.outcomes if eta_max is not None and lr > eta_max]
        eta_min = recovered[0] if recovered else None
        below = [lr for lr in self.outcomes if eta_min is not None and lr < eta_min]
        best = _best(self.outcomes)
        return Window(
            eta_max=eta_max, eta_max_above=min(above) if above else None,
            eta_max_censored=eta_max is None or not above,
            eta_min=eta_min, eta_min_below=max(below) if below else None,
            eta_min_censored=eta_min is not None and not below,
            best_lr=best, best_steps=self.outcomes[best]["step"] if best else None,
            best_hazard_acc=self.outcomes[best]["hazard_acc"] if best else None,
            inversions=inversions(self.outcomes),
            probes=[{"lr": lr, **self.outcomes[lr]} for lr in sorted(self.outcomes)], rounds=self.rounds)


def find_window(outcome_of: Callable[[float], dict | str], ladder: Ladder) -> Window:
    """The window of one cell, running `outcome_of(lr)` (a kind, or {kind, step, hazard_acc}) for each
    learning rate the search asks for, round after round."""
    search = WindowSearch(ladder)
    while lrs := search.pending():
        for lr in lrs:
            search.record(lr, outcome_of(lr))
    return search.window()


def inversions(outcomes: dict[float, dict]) -> list[str]:
    """Runs out of the monotone order: a † run below a run that is not †; a run that did not recover
    between two that did."""
    lrs = sorted(outcomes)
    kinds = [outcomes[lr]["kind"] for lr in lrs]
    found = []
    top_stable = max((lr for lr, k in zip(lrs, kinds) if k != DIVERGED), default=None)
    found += [f"† at lr={lr:.4g} below lr={top_stable:.4g}, not †"
              for lr, k in zip(lrs, kinds) if k == DIVERGED and top_stable is not None and lr < top_stable]
    recovered = [lr for lr, k in zip(lrs, kinds) if k == RECOVERED]
    if recovered:
        found += [f"{k} at lr={lr:.4g} between recovered runs" for lr, k in zip(lrs, kinds)
                  if k == NOT_RECOVERED and recovered[0] < lr < recovered[-1]]  # a † there is named above
    return found


def _outcome(outcome: dict | str) -> dict:
    o = {"kind": outcome} if isinstance(outcome, str) else dict(outcome)
    if o.get("kind") not in KINDS:
        raise ValueError(f"outcome kind {o.get('kind')!r}: allowed {', '.join(KINDS)}")
    return {"kind": o["kind"], "step": o.get("step"), "hazard_acc": o.get("hazard_acc")}


def _best(outcomes: dict[float, dict]) -> float | None:
    """The attacker-best recovered lr: fewest steps, then the highest hazard accuracy, then the smaller lr."""
    recovered = [(o["step"] if o["step"] is not None else math.inf, -(o["hazard_acc"] or 0.0), lr)
                 for lr, o in outcomes.items() if o["kind"] == RECOVERED]
    return min(recovered)[2] if recovered else None


def _round_lr(lr: float) -> float:
    """4 significant digits: readable overrides (lr=3.162e-05) and the same float on every round."""
    return float(f"{lr:.4g}")


def _middle(lo: float, hi: float, resolution: float) -> float | None:
    if math.log10(hi / lo) <= resolution:
        return None
    mid = _round_lr(math.sqrt(lo * hi))
    return mid if lo < mid < hi else None


def _step_down(lr: float, ladder: Ladder) -> float | None:
    return _round_lr(max(lr / 10 ** ladder.extend, ladder.floor)) if lr > ladder.floor else None


def _step_up(lr: float, ladder: Ladder) -> float | None:
    return _round_lr(min(lr * 10 ** ladder.extend, ladder.ceiling)) if lr < ladder.ceiling else None
