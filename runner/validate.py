"""Check the whole resolved config before any heavy work.

The run's own keys (those the runner reads: lr, seed, model, data, eval, dist, ...) are checked
here by rules (harness/rules.py): the first that fails raises a `ConfigError` with one line,
`<key>=<value>: allowed <...>`. The attack's and the defense's own keys are checked by the methods
themselves, through their `check_config` hook (harness/hooks.py). Checks that need the model (k
against a layer's rank, a layer pattern that matches nothing) run with the method, before it trains.
"""
from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf

from harness import hooks, numerics
from harness.distributed import check_rows_per_rank, launched_world_size
from harness.errors import ConfigError
from harness.models import DTYPES
from harness.rules import (MISSING, Rule, boolean, check_rules, get, non_negative_int, one_of, or_none, positive,
                           positive_int, unit_interval_or_none)
from runner.objective import check_settings as check_objective


def _device(x) -> bool:
    return isinstance(x, str) and (x in ("cpu", "cuda", "auto", "mps") or x.startswith("cuda:"))


# (key, predicate, what is allowed): the keys of the run itself, whatever the defense and the attack.
RULES: list[Rule] = [
    ("lr", positive, "a finite number > 0"),
    ("seed", non_negative_int, "an integer >= 0"),
    ("threads", or_none(positive_int), "null or an integer >= 1"),
    ("model.dtype", one_of(*DTYPES), f"one of {', '.join(DTYPES)}"),
    ("model.device", _device, "cpu, cuda, cuda:N, mps or auto"),
    ("attack.recover_threshold", unit_interval_or_none, "null or a number in [0, 1]"),  # every attack has one
    ("data.world.bylines", boolean, "true or false"),
    ("data.world.documents", non_negative_int, "an integer >= 0 (0: one line per sentence)"),
    ("model.spec.numerics", one_of(*numerics.PINS, numerics.MACHINE),
     f"one of {', '.join([*numerics.PINS, numerics.MACHINE])}"),
    ("eval.limit", or_none(positive_int), "null or an integer >= 1"),
    ("eval.batch_size", positive_int, "an integer >= 1"),
    ("plan", boolean, "true or false"),
    ("dist.device_memory_gb", or_none(positive), "null or a number of GiB > 0"),
    ("dist.timeout_min", positive, "a number of minutes > 0"),
    ("dist.activation_checkpointing", boolean, "true or false"),
    ("dist.cpu_offload", boolean, "true or false"),
    ("dist.reshard_after_forward", boolean, "true or false"),
]


def _check_model_path(cfg: DictConfig) -> None:
    path = get(cfg, "model.path")
    if isinstance(path, str) and path.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(path)):
        raise ConfigError(f"model.path={path!r}: no such folder; allowed a local model folder or a hub id")


def _check_lr_grid(cfg: DictConfig) -> None:
    """experiment=table1 takes `lr` from the optimizer's own grid (table1.grids.<scale>.<optimizer>);
    a null lr there means the optimizer has no grid at this scale or the rank is past its end."""
    grids = get(cfg, "table1.grids")
    if grids is MISSING or get(cfg, "lr") is not None:
        return
    scale, name, rank = get(cfg, "scale.name"), get(cfg, "attack.name"), get(cfg, "table1.lr_rank")
    grid = OmegaConf.select(grids, f"{scale}.{name}")
    if grid is None:
        raise ConfigError(f"attack={name} with experiment=table1: no learning-rate grid table1.grids.{scale}.{name}; "
                          f"allowed {', '.join(OmegaConf.select(grids, str(scale)) or {})} (or an explicit lr=)")
    raise ConfigError(f"table1.lr_rank={rank!r}: allowed 0..{len(grid) - 1} (the {name} grid at scale {scale})")


def _check_long_budget_lr(cfg: DictConfig) -> None:
    """experiment=long_budget takes `lr` from long_budget.lrs.<scale>.<defense>.<optimizer>, measured per world."""
    lrs = get(cfg, "long_budget.lrs")
    if lrs is MISSING or get(cfg, "lr") is not None:
        return
    from hydra.core.hydra_config import HydraConfig  # the lrs are keyed by the defense's config choice
    scale, name, defense = get(cfg, "scale.name"), get(cfg, "attack.name"), HydraConfig.get().runtime.choices.defense
    known = [f"{s}: {', '.join(d)}" for s, d in lrs.items()]
    raise ConfigError(f"defense={defense} attack={name} with experiment=long_budget: no measured lr "
                      f"long_budget.lrs.{scale}.{defense}.{name}; allowed {'; '.join(known)} (or an explicit lr=)")


def _check_dist(cfg: DictConfig) -> None:
    """What cannot run sharded stops here, saying what to use instead."""
    if get(cfg, "dist.name") != "fsdp":
        return
    attack = get(cfg, "attack")
    double = ("its optimizer needs a double backward (backward(create_graph=True))" if attack is not MISSING
              and hooks.needs_double_backward(attack) else None)
    if double is None and get(cfg, "attack.sharpness_every") not in (None, MISSING):
        double = f"attack.sharpness_every={get(cfg, 'attack.sharpness_every')} takes Hessian-vector products"
    if double:
        raise ConfigError(f"attack={attack.name} with dist=fsdp: {double}, and FSDP2's gradients leave the autograd "
                          "graph at the reduce-scatter; allowed dist=none on one device, or a first-order attack "
                          "(sgd, adam, adamw, muon) without sharpness_every")
    ranks = launched_world_size()
    for key in ("attack.batch_size", "defense.batch_size"):
        check_rows_per_rank(key, get(cfg, key), ranks)


def _check_writable(cfg: DictConfig) -> None:
    root = get(cfg, "paths.output_root")
    if isinstance(root, str) and os.path.exists(root) and not os.path.isdir(root):
        raise ConfigError(f"paths.output_root={root!r}: is a file; allowed a writable folder")


LM_SOURCES = ("tiny", "hf")  # model.source of a causal LM: the tiny Llama, any Hugging Face one (model.path)
# conf/eval/ of each track, by data.kind (None: text, the language pipeline)
EVALS = {None: ("synthetic", "paper"), "images": ("vision",), "diffusion": ("diffusion", "stable_diffusion")}
TRACKS = {None: "text data", "images": "image data (experiment=vision)", "diffusion": "diffusion data (experiment=diffusion)"}


def check_track(cfg: DictConfig) -> None:
    """A model or an evaluation of another track stops here, in one line: an image model or evaluation with
    text data, a language evaluation with image data."""
    kind, source, evaluation = get(cfg, "data.kind"), get(cfg, "model.source"), get(cfg, "eval.name")
    kind = None if kind is MISSING else kind
    if kind is None and source is not MISSING and source not in LM_SOURCES:
        raise ConfigError(f"model.source={source!r} with data={get(cfg, 'data.name')} (text): allowed a causal LM "
                          "(model=tiny, llama31_8b_instruct, or model.path=<a Hugging Face causal LM>); image models "
                          "run with image data (experiment=vision, experiment=diffusion)")
    allowed = EVALS.get(kind)
    if allowed is not None and evaluation is not MISSING and evaluation not in allowed:
        raise ConfigError(f"eval={evaluation} with data={get(cfg, 'data.name')}: allowed eval={' or '.join(allowed)} "
                          f"with {TRACKS[kind]}")


def validate(cfg: DictConfig) -> None:
    check_track(cfg)
    _check_lr_grid(cfg)  # before the rules: it explains a null lr better than "lr=None"
    _check_long_budget_lr(cfg)
    check_rules(cfg, RULES)
    objective = get(cfg, "objective")  # what a sweeper maximises (experiment=strongest_attack)
    if objective is not MISSING and objective is not None:
        check_objective(objective)
    _check_model_path(cfg)
    if get(cfg, "model.spec.numerics") == numerics.MACHINE:
        numerics.machine_pin()  # SPECDEF_NUMERICS, if set, must name a pin that holds here
    hooks.check_config(cfg, get(cfg, "attack"), "attack")
    _check_writable(cfg)
    _check_dist(cfg)
    # last: a released defended model out of reach is looked up in the hub's cache (and the hub)
    hooks.check_config(cfg, get(cfg, "defense"), "defense")
