"""`defense=specdef`: SpecDef as a harness defense, optionally on top of another defense (`base`).

The paper's Table 1 applies SpecDef to an unlearned model (ELM), so `base` names another config of
conf/defense/ (merged with `base_overrides`) that runs first; its record lands in `info["base"]`.
Every run measures the function drift in the model's own dtype (the dtype, not the algebra, bounds
α: results/precision_frontier.md) and says which α the dtype can carry when the drift is over
`drift_tolerance`.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Sequence

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from harness import distributed, hooks
from harness.errors import ConfigError
from harness.memory import Costs, Defended, Shape, Stage, training_stages
from harness.models import DTYPES
from harness.rules import Rule, check_rules, non_negative_int, one_of, positive, positive_int
from specdef.core import (COMPUTE_DTYPES, K_POLICIES, METHODS, NITER, check_alpha, check_k_policy, check_method,
                          match_layers, plan_layers, transform)
from specdef.drift import data_drift, max_supported_alpha
from specdef.modules import output_weights
from specdef.release import manifest_record, save_defended

log = logging.getLogger(__name__)
DEFENSE_CONF = Path(__file__).resolve().parents[1] / "conf" / "defense"
SCALE_CONF = Path(__file__).resolve().parents[1] / "conf" / "defense_scale"
# SpecDef's own keys (harness/rules.py), checked before any model loads (`SpecDef.check_config`).
RULES: list[Rule] = [
    ("alpha", positive, "a finite number > 0"),
    ("k", positive_int, "an integer >= 1"),
    ("drift_tolerance", positive, "a finite number > 0"),
    ("drift_samples", positive_int, "an integer >= 1"),
    ("method", one_of(*METHODS), "lowrank or exact"),
    ("k_policy", one_of(*K_POLICIES), "error, clip or skip"),
    ("niter", non_negative_int, "an integer >= 0"),
    ("compute_dtype", one_of(*COMPUTE_DTYPES), "float64 or float32"),
]


def load_base_config(base: str | Mapping, overrides: Mapping | None, scale: str | None = None) -> DictConfig:
    """The base defense's config: conf/defense/<base>.yaml, then the scale's values for it
    (conf/defense_scale/<scale>/<base>.yaml, as Hydra merges them for a run's own defense), or an
    inline mapping; then the overrides."""
    if isinstance(base, str):
        path = DEFENSE_CONF / f"{base}.yaml"
        if not path.is_file():
            names = sorted(p.stem for p in DEFENSE_CONF.glob("*.yaml") if not p.stem.startswith("specdef"))
            raise ConfigError(f"defense.base={base!r}: no conf/defense/{base}.yaml; allowed {', '.join(names)}")
        cfg = OmegaConf.load(path)
        scaled = SCALE_CONF / str(scale) / f"{base}.yaml"
        if scale and scaled.is_file():
            cfg = OmegaConf.merge(cfg, OmegaConf.load(scaled))
    else:
        cfg = OmegaConf.create(dict(base))
    cfg = OmegaConf.merge(cfg, OmegaConf.create(dict(overrides or {})))
    if str(cfg.get("_target_", "")).startswith("specdef."):
        raise ConfigError(f"defense.base={base!r}: allowed a defense other than specdef (it would nest)")
    return cfg


def build_base(base, overrides: Mapping | None, scale: str | None = None):
    """The base defense from a conf/defense name or an inline config; a defense object is used as is
    (Hydra instantiates an inline `base: {_target_: ...}` before SpecDef sees it)."""
    if callable(base) and hasattr(base, "info"):
        if overrides:
            raise ConfigError(f"defense.base_overrides={dict(overrides)!r}: allowed only with a base given by "
                              "name; put the values into the inline base config")
        return base
    cfg = load_base_config(base, overrides, scale)
    try:
        return instantiate(cfg)
    except InterpolationResolutionError as e:
        # a base config read on its own cannot see the run's root keys (e.g. ${seed})
        raise ConfigError(f"defense.base={base!r}: {e.__class__.__name__} ({str(e).splitlines()[0]}); "
                          "allowed: give the value in defense.base_overrides") from None


def check_alpha_fits(alpha: float, dtype: torch.dtype, tolerance: float, strict: bool) -> None:
    """With strict_drift, refuse before any work an α whose rounding error eps·α (the measured constant
    is below 1: results/precision_frontier.md) already exceeds the tolerance."""
    bound = tolerance / torch.finfo(dtype).eps
    if strict and alpha > bound:
        name = str(dtype).removeprefix("torch.")
        raise ConfigError(f"defense.alpha={alpha:g}: {name} carries alpha up to about {bound:.2g} within "
                          f"defense.drift_tolerance={tolerance:g} (error ~ eps*alpha); allowed alpha "
                          f"<= {bound:.2g}, a wider defense.dtype, or defense.strict_drift=false")


def check_strict_alpha(cfg, defense) -> None:
    """With strict_drift, an α the storage dtype (defense.dtype, else the model's) cannot carry."""
    dtype = defense.get("dtype") or (cfg.get("model") or {}).get("dtype")
    if defense.get("strict_drift") and dtype in DTYPES and isinstance(defense.get("alpha"), (int, float)):
        check_alpha_fits(float(defense.alpha), DTYPES[dtype], defense.get("drift_tolerance", 1e-2), True)


def base_config(defense) -> DictConfig | None:
    """The config of the defense SpecDef runs first (None: none); what its hooks are asked about."""
    base = defense.get("base")
    if not isinstance(base, (str, Mapping)):
        return None
    return load_base_config(base, defense.get("base_overrides"), defense.get("base_scale"))


def check_base(cfg, defense) -> None:
    """The base defense's own checks (e.g. a released checkpoint out of reach), on its merged config."""
    base = base_config(defense)
    if base is not None:
        hooks.check_config(cfg, base, "defense.base_overrides")


def defended_widths(shape: Shape, defense) -> list[int]:
    """Output width of every layer SpecDef defends (its layer patterns, or each family's defaults): Linear,
    Conv1D and MoE experts modules alike, each getting one out x out compensation."""
    layers = defense.get("layers")
    names = match_layers(shape.meta_model, None if layers is None else list(layers))
    return [output_weights(shape.meta_model.get_submodule(n))[0].shape[1] for n in names]


class SpecDef:
    """Amplify the top-k singular subspace of the matched layers by α and insert compensation layers.

    alpha: spectral amplification (the paper's Table 1 uses 1e4).  k: singular directions per layer.
    layers: module-name globs ('re:' for regexes) of nn.Linear, Conv1D or MoE experts modules;
    null = each family's MLP output projection in every block (a warning names blocks it misses).
    k_policy: a layer of rank below k stops the run (error), gets k = its rank (clip) or is left
    undefended (skip); both are recorded and written into the release manifest.
    method: lowrank (randomized block Krylov, `niter` iterations) | exact (full SVD).
    compute_dtype: float64 | float32, the dtype of the algebra before W' and C are rounded to the model's.
    drift_tolerance: relative logit error on held-out text above which a warning names the largest α
    the dtype carries; strict_drift: make that a ConfigError.  drift_samples: held-out texts measured.
    base / base_overrides: a defense applied first; base_scale: the scale whose values it takes
    (conf/defense_scale/<base_scale>/<base>.yaml; null = conf/defense/<base>.yaml alone).
    dtype: the dtype the defended model is stored and released in (null = the loaded model's); a
    wider one than the model's carries a larger α (the cast is exact). With strict_drift, an α the
    dtype cannot carry (eps·α > drift_tolerance) stops the run before the base defense trains.
    save_dir: also write the release there.
    """
    name = "specdef"

    # Hooks (harness/hooks.py): what the runner asks of the defense before anything is built.

    @staticmethod
    def check_config(cfg, node, key: str) -> None:
        check_rules(node, RULES, f"{key}.")
        check_base(cfg, node)  # a released base out of reach stops here, before any model is loaded
        check_strict_alpha(cfg, node)

    @staticmethod
    def memory_stages(node, shape: Shape, costs: Costs) -> list[Stage]:
        """SpecDef itself trains nothing; over a base, the base's training comes first."""
        base = base_config(node)
        if base is None:
            return []
        return [dataclasses.replace(s, name=f"specdef over {s.name}") for s in training_stages(base, shape, costs)]

    @staticmethod
    def memory_defended(node, shape: Shape) -> Defended:
        """An out x out compensation per defended layer (its input kept for backward), in defense.dtype."""
        widths = defended_widths(shape, node)
        return Defended(extra_params=sum(w * w for w in widths), extra_per_block=shape.hidden if widths else 0,
                        dtype=node.get("dtype"))

    @staticmethod
    def cache_sources(node) -> list[Path]:
        """SpecDef's package and, over a base, the base's sources: the defended model runs code of both."""
        base = base_config(node)
        return hooks.package_sources(SpecDef) + (hooks.cache_sources(base) if base is not None else [])

    def __init__(self, alpha: float, k: int, layers: Sequence[str] | None = None, method: str = "lowrank",
                 niter: int = NITER, compute_dtype: str = "float64", drift_tolerance: float = 1e-2,
                 strict_drift: bool = False, drift_samples: int = 64, base: str | Mapping | None = None,
                 base_overrides: Mapping | None = None, save_dir: str | None = None, compensate: bool = True,
                 k_policy: str = "error", dtype: str | None = None, base_scale: str | None = None):
        self.alpha, self.method, self.k_policy = check_alpha(alpha), check_method(method), check_k_policy(k_policy)
        self.compensate = compensate  # False: the paper's ablation, sigma_1 scaled with no compensation layer
        self.k, self.niter, self.compute_dtype = k, niter, compute_dtype
        self.layers = None if layers is None else [str(p) for p in layers]
        self.drift_tolerance, self.strict_drift, self.drift_samples = drift_tolerance, strict_drift, drift_samples
        self.base, self.base_overrides, self.save_dir = base, base_overrides, save_dir
        self.base_scale = base_scale
        if dtype is not None and dtype not in DTYPES:
            raise ConfigError(f"defense.dtype={dtype!r}: allowed null (the model's) or {', '.join(DTYPES)}")
        self.dtype = dtype
        self.info: dict = {}

    def __call__(self, model, tokenizer, data):
        # the layer and k checks run before the base defense trains: bad input fails before heavy work
        plan_layers(model, self.layers, self.k, self.k_policy)
        check_alpha_fits(self.alpha, DTYPES[self.dtype] if self.dtype else next(model.parameters()).dtype,
                         self.drift_tolerance, self.strict_drift)
        if self.base is not None:
            base = build_base(self.base, self.base_overrides, self.base_scale)
            model = base(model, tokenizer, data)
            self.info["base"] = {"name": base.name, **base.info}
        if self.dtype:
            model.to(DTYPES[self.dtype])  # exact when widening: the drift then measures SpecDef alone
        plan = plan_layers(model, self.layers, self.k, self.k_policy)
        originals = {n: copy.deepcopy(model.get_submodule(n)) for n in plan.k}  # reference for the drift
        t0 = time.perf_counter()
        reports = transform(model, alpha=self.alpha, k=self.k, layers=self.layers, method=self.method,
                            niter=self.niter, compensate=self.compensate, compute_dtype=self.compute_dtype,
                            k_policy=self.k_policy)
        seconds = time.perf_counter() - t0
        drift = data_drift(model, tokenizer, data, originals, self.drift_samples)
        self._record(model, plan, reports, drift, seconds)
        self._check_drift(drift)
        if self.save_dir:  # dist=fsdp: every rank holds the whole plain model; rank 0 writes the release
            if distributed.is_main():
                save_defended(model, tokenizer, self.save_dir, record=manifest_record(self.info))
            self.info["release_dir"] = str(Path(self.save_dir))
        return model

    def _record(self, model, plan, reports, drift: dict, seconds: float) -> None:
        dtype = next(model.parameters()).dtype
        self.info.update({
            "alpha": self.alpha, "k": self.k, "compensate": self.compensate, "method": self.method, "niter": self.niter,
            "compute_dtype": self.compute_dtype, "k_policy": self.k_policy,
            "layers": self.layers, "layers_matched": [r.name for r in reports],
            "layers_clipped": plan.clipped, "layers_skipped": plan.skipped,
            "blocks_without_defended_layer": plan.uncovered_blocks,
            "sigma_ratio": {r.name: r.sigma_ratio for r in reports},
            "layer_reports": [dataclasses.asdict(r) for r in reports],
            "params_added": sum(r.shape[0] ** 2 for r in reports) if self.compensate else 0, "seconds": seconds,
            "drift": drift, "drift_tolerance": self.drift_tolerance,
            "max_supported_alpha": max_supported_alpha(self.alpha, drift["rel_logit_error"],
                                                       self.drift_tolerance, dtype)["max_alpha"],
            "eps": torch.finfo(dtype).eps,
            "release_dtype": str(dtype).removeprefix("torch."),  # ship the release in this dtype, or re-measure
        })
        off = {n: r for n, r in self.info["sigma_ratio"].items() if not abs(r - 1) <= 0.01}
        if off:
            log.warning("specdef: sigma1(W') / (alpha sigma1(W)) off by more than 1%% on %s; "
                        "raise defense.niter or use defense.method=exact", off)

    def _check_drift(self, drift: dict) -> None:
        err = drift["rel_logit_error"]
        if err <= self.drift_tolerance:
            return
        dtype = drift["dtype"]
        line = (f"defense.alpha={self.alpha:g}: relative logit error {err:.3g} on held-out text exceeds "
                f"defense.drift_tolerance={self.drift_tolerance:g}; {dtype} carries alpha up to about "
                f"{self.info['max_supported_alpha']:.2g} (error ~ c*eps*alpha, eps={self.info['eps']:.2g})")
        if self.strict_drift:
            raise ConfigError(f"{line}; allowed alpha within that bound, a wider model dtype, "
                              "or defense.strict_drift=false")
        log.warning("specdef: %s", line)
