"""Layer patterns: one syntax for every key that names modules or parameters.

A pattern is a shell-style glob on a dotted name (`model.layers.*.mlp.down_proj`), or `re:<regex>`
for a regular expression that must match the whole name. SpecDef's `defense.layers` and the
attacker's `attack.trainable` / `attack.frozen` both read patterns through `matches`, so the same
string selects the same modules in either place.
"""
from __future__ import annotations

import fnmatch
import re

REGEX_PREFIX = "re:"


def matches(name: str, pattern: str) -> bool:
    if pattern.startswith(REGEX_PREFIX):
        return re.fullmatch(pattern[len(REGEX_PREFIX):], name) is not None
    return fnmatch.fnmatchcase(name, pattern)
