"""Partial fine-tuning: which parameters the attacker trains (`attack.trainable`, `attack.frozen`).

Patterns are shell-style globs on module or parameter names, or `re:<regex>` (full match): the
syntax of `defense.layers` (harness/patterns.py). A pattern selects a parameter when it matches the
parameter's name or the name of a module holding it, so `model.layers.*.mlp.down_proj` selects that
layer's weight on an undefended model and both its `inner` and `comp` weights on a SpecDef one.
`trainable` (null: everything) minus `frozen` (null: nothing) is what the optimizer gets. Every
pattern must select something: a pattern that selects nothing stops the run in one line, since a
typo would otherwise silently train the whole model (or nothing).
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

from torch import nn

from harness.errors import ConfigError
from harness.patterns import REGEX_PREFIX, matches


def check_patterns(key: str, patterns) -> list[str] | None:
    """The patterns as a list of strings; regexes compile (syntax only: names come with the model)."""
    if patterns is None:
        return None
    if isinstance(patterns, str) or not all(isinstance(p, str) and p for p in patterns):
        raise ConfigError(f"attack.{key}={patterns!r}: allowed null or a list of globs or 're:<regex>' strings")
    for p in patterns:
        if p.startswith(REGEX_PREFIX):
            try:
                re.compile(p[len(REGEX_PREFIX):])
            except re.error as e:
                raise ConfigError(f"attack.{key}={p!r}: not a regular expression ({e}); allowed a glob or "
                                  "'re:<regex>'") from None
    if not patterns:
        raise ConfigError(f"attack.{key}=[]: allowed null or a non-empty list of patterns")
    return list(patterns)


def _owners(param_name: str) -> list[str]:
    """The parameter's name and every module name above it: a.b.weight -> a.b.weight, a.b, a."""
    parts = param_name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def selected(names: Iterable[str], pattern: str) -> list[str]:
    return [n for n in names if any(matches(o, pattern) for o in _owners(n))]


def check_selects(key: str, patterns: Sequence[str] | None, names: Sequence[str]) -> None:
    """Each pattern selects at least one of `names`, or one line naming it and some real names."""
    for pattern in patterns or ():
        if not selected(names, pattern):
            examples = ", ".join(sorted({n.rsplit(".", 1)[0] for n in names})[-6:])
            raise ConfigError(f"attack.{key}={pattern!r}: matches no module or parameter of the model; allowed "
                              f"globs or 're:<regex>' on names such as {examples}")


def expected_names(model: nn.Module) -> list[str]:
    """Parameter names of `model`, plus the names its SpecDef-defendable layers take once defended
    (`<layer>.inner.*`, `<layer>.comp.weight`), so patterns are checked on the loaded model before
    any defense runs."""
    from specdef.modules import kind  # lazy: the SpecDef package is only needed for this check
    names = [n for n, _ in model.named_parameters()]
    for name, module in model.named_modules():
        if name and kind(module) is not None:
            names += [f"{name}.inner.{p}" for p, _ in module.named_parameters()] + [f"{name}.comp.weight"]
    return names


def apply(model: nn.Module, trainable: Sequence[str] | None, frozen: Sequence[str] | None) -> dict:
    """Set requires_grad from the patterns; returns what the run record keeps."""
    names = [n for n, _ in model.named_parameters()]
    check_selects("trainable", trainable, names)
    check_selects("frozen", frozen, names)
    train = set(names) if trainable is None else {n for p in trainable for n in selected(names, p)}
    train -= {n for p in frozen or () for n in selected(names, p)}
    if not train:
        raise ConfigError(f"attack.trainable={trainable} minus attack.frozen={frozen} leaves no parameter to "
                          "train; allowed patterns that leave at least one")
    for name, param in model.named_parameters():
        param.requires_grad_(name in train)
    params = dict(model.named_parameters())
    n_train = sum(params[n].numel() for n in train)
    return {"trainable_parameters": n_train, "frozen_parameters": sum(p.numel() for p in params.values()) - n_train,
            "trainable_tensors": len(train)}


def preflight(attack_cfg, model: nn.Module) -> None:
    """Check `attack.trainable` / `attack.frozen` on the freshly loaded model, before the defense
    and the evaluations run (the attack checks them again on the model it gets)."""
    if attack_cfg is None:
        return
    names = None
    for key in ("trainable", "frozen"):
        patterns = check_patterns(key, attack_cfg.get(key))
        if patterns:
            names = names or expected_names(model)
            check_selects(key, patterns, names)
