"""Config rules: (key, predicate, what is allowed), checked in order before any heavy work.

The first rule that fails raises a ConfigError of one line, `<key>=<value>: allowed <what>`. A key
absent from the config is skipped: not every defense or attack has every field. The runner checks
the run's own keys with them (runner/validate.py); each method checks its own keys, relative to its
config node, in its `check_config` hook (harness/hooks.py).
"""
from __future__ import annotations

import math
from typing import Any, Callable

from omegaconf import OmegaConf

from harness.errors import ConfigError

Rule = tuple[str, Callable[[Any], bool], str]
MISSING = object()


def get(node, key: str):
    """`node.<key>` (a dotted key), or MISSING."""
    return OmegaConf.select(node, key, default=MISSING)


def check_rules(node, rules: list[Rule], prefix: str = "") -> None:
    """Raise for the first rule whose key is in `node` and whose value it refuses; `prefix` is how
    messages name the node ("defense." for a defense's own rules)."""
    for key, ok, allowed in rules:
        value = get(node, key)
        if value is not MISSING and not ok(value):
            raise ConfigError(f"{prefix}{key}={value!r}: allowed {allowed}")


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def positive(x) -> bool:
    return _number(x) and math.isfinite(x) and x > 0


def non_negative(x) -> bool:
    return _number(x) and x >= 0


def non_negative_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def positive_int(x) -> bool:
    return non_negative_int(x) and x > 0


def unit_interval(x) -> bool:
    return _number(x) and 0 <= x <= 1


def unit_interval_or_none(x) -> bool:
    return x is None or unit_interval(x)


def boolean(x) -> bool:
    return isinstance(x, bool)


def one_of(*choices) -> Callable[[Any], bool]:
    return lambda x: x in choices


def or_none(ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda x: x is None or ok(x)
