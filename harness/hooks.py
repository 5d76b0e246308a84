"""A method's hooks: what only a defense or an attack knows, read from the class its `_target_` names.

The runner never names a method. Before anything is built it looks up the class of `cfg.defense` or
`cfg.attack` (as it already reads an optimizer's `forward_only`) and asks it, through these optional
attributes (classmethods or staticmethods); a method without one gets the neutral answer.

On a defense or an attack class:
- `check_config(cfg, node, key) -> None`: raise a ConfigError for a value of the method's own config
  `node` (named `key` in messages: "defense", "attack", "defense.base_overrides") that cannot run,
  before any model loads; `cfg` is the whole run config, for checks across keys. Default: no check.
- memory (harness/memory.py): a defense's `memory_stages(node, shape, costs) -> list[Stage]` (the stages
  its training adds) and `memory_defended(node, shape) -> Defended` (what it adds to the model the
  attack gets); an attack's `memory_stage(node, shape, costs, defended) -> Stage`. Default: a stage
  that says "no memory estimate for <class>", counted as nothing.

On a defense class only:
- `cache_sources(node) -> list[Path]`: the source files whose text keys the defended-model cache (an
  edit to one retrains the defense). Default: every module of the class's own package.
- `cacheable = False` (a class attribute): the defended model is never cached (e.g. a release that is
  already on disk). Default: cached under `cache_defended=true`.

On an attack class only:
- `needs_double_backward(node) -> bool`: it trains with backward(create_graph=True), so the model switches
  to the eager attention kernel once the defense is built, and cannot be sharded. Default: False.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

from hydra.utils import get_class


def method_class(node) -> type | None:
    """The class `node._target_` names; None when the node has none or it cannot be imported (Hydra
    reports that, with its own message, when it builds the method)."""
    target = node.get("_target_") if hasattr(node, "get") else None
    if not isinstance(target, str):
        return None
    try:
        return get_class(target)
    except Exception:  # noqa: BLE001 - an unknown or broken class fails at instantiation
        return None


def hook(node, name: str) -> Callable[..., Any] | None:
    """The hook `name` of the method `node` configures, or None."""
    return getattr(method_class(node), name, None)


def check_config(cfg, node, key: str) -> None:
    check = hook(node, "check_config")
    if check is not None:
        check(cfg, node, key)


def needs_double_backward(attack) -> bool:
    needs = hook(attack, "needs_double_backward")
    return bool(needs is not None and needs(attack))


def cache_sources(defense) -> list[Path]:
    """The defense's own sources (its `cache_sources` hook), else every module of its package."""
    sources = hook(defense, "cache_sources")
    if sources is not None:
        return list(sources(defense))
    cls = method_class(defense)
    return package_sources(cls) if cls is not None else []


def package_sources(cls: type) -> list[Path]:
    """Every module of the package (the folder) that defines `cls`."""
    return sorted(Path(sys.modules[cls.__module__].__file__).parent.glob("*.py"))
