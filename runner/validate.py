"""Check the whole resolved config before any heavy work.

Each rule names a config key, a predicate and what is allowed; the first failing rule raises a
`ConfigError` with one line: `<key>=<value>: allowed <...>`. Method-specific checks that need the
model (k against a layer's rank, a layer pattern that matches nothing) live with the method.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from harness.errors import ConfigError
from harness.models import DTYPES

_MISSING = object()


def _get(cfg: DictConfig, key: str):
    return OmegaConf.select(cfg, key, default=_MISSING)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def positive(x) -> bool:
    return _number(x) and math.isfinite(x) and x > 0


def non_negative_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def positive_int(x) -> bool:
    return non_negative_int(x) and x > 0


def unit_interval_or_none(x) -> bool:
    return x is None or (_number(x) and 0 <= x <= 1)


def one_of(*choices) -> Callable[[Any], bool]:
    return lambda x: x in choices


def _device(x) -> bool:
    return isinstance(x, str) and (x in ("cpu", "cuda", "auto", "mps") or x.startswith("cuda:"))


# (key, predicate, what is allowed). Keys absent from the config are skipped: not every
# defense or attack has every field.
RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("lr", positive, "a finite number > 0"),
    ("seed", non_negative_int, "an integer >= 0"),
    ("threads", lambda x: x is None or positive_int(x), "null or an integer >= 1"),
    ("model.dtype", one_of(*DTYPES), f"one of {', '.join(DTYPES)}"),
    ("model.device", _device, "cpu, cuda, cuda:N, mps or auto"),
    ("attack.steps", non_negative_int, "an integer >= 0"),
    ("attack.batch_size", positive_int, "an integer >= 1"),
    ("attack.grad_accum", positive_int, "an integer >= 1"),
    ("attack.eval_every", positive_int, "an integer >= 1"),
    ("attack.warmup_steps", non_negative_int, "an integer >= 0"),
    ("attack.schedule", one_of("constant", "linear", "cosine"), "constant, linear or cosine"),
    ("attack.recover_threshold", unit_interval_or_none, "null or a number in [0, 1]"),
    ("attack.divergence_factor", positive, "a finite number > 0"),
    ("attack.recovery_rule", one_of("intact", "legacy"), "intact or legacy"),
    ("attack.intact_ppl_factor", positive, "a finite number > 0"),
    ("attack.max_utility_drop", lambda x: x is not None and unit_interval_or_none(x), "a number in [0, 1]"),
    ("attack.data.source", one_of("forget", "questions", "retain", "unrelated"), "forget, questions, retain or unrelated"),
    ("attack.data.n_samples", lambda x: x is None or positive_int(x), "null or an integer >= 1"),
    ("attack.undo", one_of(None, "collapse", "spectral"), "null, collapse or spectral"),
    ("attack.param_split", one_of(None, "muon"), "null or muon"),
    ("attack.lora_placement", one_of("around", "inner", "comp", "parts"), "around, inner, comp or parts"),
    ("attack.recover_metric", one_of("hazard_acc", "relearned_acc", "heldout_acc"),
     "hazard_acc, relearned_acc or heldout_acc"),
    ("attack.sharpness_every", lambda x: x is None or positive_int(x), "null or an integer >= 1"),
    ("attack.checkpoint_every", lambda x: x is None or positive_int(x), "null or an integer >= 1"),
    ("data.world.bylines", lambda x: isinstance(x, bool), "true or false"),
    ("eval.limit", lambda x: x is None or positive_int(x), "null or an integer >= 1"),
    ("eval.batch_size", positive_int, "an integer >= 1"),
    ("defense.alpha", positive, "a finite number > 0"),
    ("defense.k", positive_int, "an integer >= 1"),
    ("defense.drift_tolerance", positive, "a finite number > 0"),
    ("defense.drift_samples", positive_int, "an integer >= 1"),
    ("defense.method", one_of("lowrank", "exact"), "lowrank or exact"),
    ("defense.k_policy", one_of("error", "clip", "skip"), "error, clip or skip"),
    ("defense.niter", non_negative_int, "an integer >= 0"),
    ("defense.compute_dtype", one_of("float64", "float32"), "float64 or float32"),
    ("defense.rm_steps", non_negative_int, "an integer >= 0"),
    ("defense.outer_steps", non_negative_int, "an integer >= 0"),
    ("defense.inner_steps", positive_int, "an integer >= 1"),
    ("defense.inner_subsample", positive_int, "an integer >= 1"),
    ("defense.steps", non_negative_int, "an integer >= 0"),
    ("defense.batch_size", positive_int, "an integer >= 1"),
    ("defense.lr", positive, "a finite number > 0"),
    ("plan", lambda x: isinstance(x, bool), "true or false"),
    ("dist.device_memory_gb", lambda x: x is None or positive(x), "null or a number of GiB > 0"),
    ("dist.timeout_min", positive, "a number of minutes > 0"),
    ("dist.activation_checkpointing", lambda x: isinstance(x, bool), "true or false"),
    ("dist.cpu_offload", lambda x: isinstance(x, bool), "true or false"),
    ("dist.reshard_after_forward", lambda x: isinstance(x, bool), "true or false"),
    ("defense.retain_corpus", one_of("retain", "unrelated"), "retain or unrelated"),
    ("defense.warmup_epochs", lambda x: _number(x) and x >= 0, "a number >= 0"),
]


def _check_splits(cfg: DictConfig) -> None:
    n = _get(cfg, "data.n_splits")
    if n is _MISSING:
        n = _get(cfg, "data.world.n_splits")
    splits = _get(cfg, "attack.data.splits")
    if n is _MISSING or splits is _MISSING or splits is None:
        return
    for s in splits:
        if not (isinstance(s, int) and 0 <= s < n):
            raise ConfigError(f"attack.data.splits={list(splits)}: allowed hazard split indices 0..{n - 1}")


def _check_model_path(cfg: DictConfig) -> None:
    path = _get(cfg, "model.path")
    if isinstance(path, str) and path.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(path)):
        raise ConfigError(f"model.path={path!r}: no such folder; allowed a local model folder or a hub id")


def _check_optimizer_fits_parameters(cfg: DictConfig) -> None:
    """torch.optim.Muon orthogonalises matrices: it rejects embeddings' 1-D neighbours (norms, biases)."""
    target = _get(cfg, "attack.optimizer._target_")
    if isinstance(target, str) and target.endswith("Muon") and _get(cfg, "attack.param_split") in (None, _MISSING) \
            and _get(cfg, "attack.peft") in (None, _MISSING):
        raise ConfigError(f"attack.param_split=None with attack.optimizer._target_={target}: Muon takes only the "
                          "hidden 2-D weights; allowed attack.param_split=muon (AdamW on the rest) or LoRA")


def _check_forward_only(cfg: DictConfig) -> None:
    """A zeroth-order optimizer (class attribute `forward_only`, e.g. attacks.mezo.MeZO) computes no
    gradient: clipping, a double backward or a second optimizer cannot apply."""
    target = _get(cfg, "attack.optimizer._target_")
    if not isinstance(target, str):
        return
    try:
        from hydra.utils import get_class
        forward_only = getattr(get_class(target), "forward_only", False)
    except Exception:  # an unknown class fails at instantiation with Hydra's own message
        return
    for key in ("attack.max_grad_norm", "attack.second_order", "attack.param_split"):
        value = _get(cfg, key)
        if forward_only and value not in (None, False, _MISSING):
            raise ConfigError(f"{key}={value!r} with attack.optimizer._target_={target}: allowed null/false "
                              "(a forward-only optimizer takes no gradient)")


def _check_lr_grid(cfg: DictConfig) -> None:
    """experiment=table1 takes `lr` from the optimizer's own grid (table1.grids.<scale>.<optimizer>);
    a null lr there means the optimizer has no grid at this scale or the rank is past its end."""
    grids = _get(cfg, "table1.grids")
    if grids is _MISSING or _get(cfg, "lr") is not None:
        return
    scale, name, rank = _get(cfg, "scale.name"), _get(cfg, "attack.name"), _get(cfg, "table1.lr_rank")
    grid = OmegaConf.select(grids, f"{scale}.{name}")
    if grid is None:
        raise ConfigError(f"attack={name} with experiment=table1: no learning-rate grid table1.grids.{scale}.{name}; "
                          f"allowed {', '.join(OmegaConf.select(grids, str(scale)) or {})} (or an explicit lr=)")
    raise ConfigError(f"table1.lr_rank={rank!r}: allowed 0..{len(grid) - 1} (the {name} grid at scale {scale})")


def _check_recovery_rule(cfg: DictConfig) -> None:
    """The intact rule bounds the utility drop: it needs utility tasks to measure it."""
    tasks = _get(cfg, "eval.utility_tasks")
    if _get(cfg, "attack.recovery_rule") == "intact" and tasks is not _MISSING and tasks is not None and not len(tasks):
        raise ConfigError("attack.recovery_rule=intact with eval.utility_tasks=[]: allowed attack.recovery_rule=legacy, "
                          "or utility tasks to measure the model's utility")


def _check_split_metric(cfg: DictConfig) -> None:
    """relearned_acc / heldout_acc are the accuracies of the splits' own tasks (at paper scale the wmdp_bio
    folds): an explicit eval.hazard_tasks without them would leave both null in every record."""
    metric, tasks = _get(cfg, "attack.recover_metric"), _get(cfg, "eval.hazard_tasks")
    if metric not in ("relearned_acc", "heldout_acc") or tasks in (None, _MISSING):
        return
    from harness.data import split_task_names
    wanted = split_task_names(_get(cfg, "data"))
    if wanted is not None and not set(wanted.values()) <= set(tasks):
        raise ConfigError(f"attack.recover_metric={metric} with eval.hazard_tasks={list(tasks)}: the splits are scored "
                          f"by their own tasks {sorted(set(wanted.values()))}; allowed eval.hazard_tasks=null "
                          "(as experiment=heldout and experiment=rtt set) or a list containing them")


def _check_dist(cfg: DictConfig) -> None:
    """What cannot run sharded stops here, saying what to use instead."""
    if _get(cfg, "dist.name") != "fsdp":
        return
    from attacks.optimizers import config_needs_double_backward
    from harness.distributed import launched_world_size
    attack = _get(cfg, "attack")
    double = ("its optimizer needs a double backward (backward(create_graph=True))" if attack is not _MISSING
              and config_needs_double_backward(attack) else None)
    if double is None and _get(cfg, "attack.sharpness_every") not in (None, _MISSING):
        double = f"attack.sharpness_every={_get(cfg, 'attack.sharpness_every')} takes Hessian-vector products"
    if double:
        raise ConfigError(f"attack={attack.name} with dist=fsdp: {double}, and FSDP2's gradients leave the autograd "
                          "graph at the reduce-scatter; allowed dist=none on one device, or a first-order attack "
                          "(sgd, adam, adamw, muon) without sharpness_every")
    ranks = launched_world_size()
    for key in ("attack.batch_size", "defense.batch_size", "defense.adversary_batch_size"):
        size = _get(cfg, key)
        if isinstance(size, int) and size < ranks:
            raise ConfigError(f"{key}={size} with {ranks} ranks: every rank trains on its own rows of each batch; "
                              f"allowed {key} >= {ranks}")


def _check_writable(cfg: DictConfig) -> None:
    root = _get(cfg, "paths.output_root")
    if isinstance(root, str) and os.path.exists(root) and not os.path.isdir(root):
        raise ConfigError(f"paths.output_root={root!r}: is a file; allowed a writable folder")


def validate(cfg: DictConfig) -> None:
    _check_lr_grid(cfg)  # before the rules: it explains a null lr better than "lr=None"
    for key, ok, allowed in RULES:
        value = _get(cfg, key)
        if value is _MISSING:
            continue
        if not ok(value):
            raise ConfigError(f"{key}={value!r}: allowed {allowed}")
    _check_splits(cfg)
    _check_model_path(cfg)
    _check_optimizer_fits_parameters(cfg)
    _check_forward_only(cfg)
    _check_recovery_rule(cfg)
    _check_split_metric(cfg)
    _check_writable(cfg)
    _check_dist(cfg)
    from baselines.released import check_config as check_release
    from specdef.defense import check_config as check_specdef
    check_release(cfg)  # a released defended model out of reach stops here, before any model is loaded
    check_specdef(cfg)  # ... and an alpha the release dtype cannot carry (strict_drift)
