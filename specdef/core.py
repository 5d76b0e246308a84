"""SpecDef: amplify the top-k left singular subspace of a layer's output projection by α, compensate exactly.

For a layer y = W x + b and any matrix U (out x k) with orthonormal columns, P = U Uᵀ:

    W' = (I + (α−1) P) W,   b' = (I + (α−1) P) b,   C = I − (1 − 1/α) P,   C (W' x + b') = W x + b.

Expanding C (I + (α−1)P) gives I + ((α−1) − (1−1/α) − (α−1)(1−1/α)) P = I, because P² = P. So the
compensation is exact for *any* orthonormal U; the SVD only decides which subspace is amplified
(with U = top-k left singular vectors, σ_i(W') = α σ_i(W) for i ≤ k: the paper's construction).
The layers SpecDef defends (nn.Linear, transformers Conv1D, MoE experts) are in specdef/modules.py;
all are handled as a batch of E matrices Wₑ (E = 1 but for experts) sharing one U, the top-k left
singular subspace of [W₁ … W_E] side by side, and one C.
Two consequences shape the code:
- U must be orthonormal to float64 precision (P² = P), or the cancellation fails by α·‖UᵀU − I‖.
  A float32 SVD is re-orthonormalised by a float64 QR, which keeps the subspace.
- The algebra is done in float64 (`compute_dtype`; float32 is faster and within ~2 ulp) and only
  the results are rounded to the model's dtype. That rounding leaves an error ~ eps(dtype)·α in the
  amplified directions that C does not shrink back (results/precision_frontier.md: float32 carries
  α ≈ 1e5, bfloat16 ≈ 1e1); `specdef.drift` measures it.
Cost per layer (`method=lowrank`): 2·niter + 2 float32 passes over W for the subspace (randomized
block Krylov), one float64 pass that amplifies W in place and measures σ₁(W') on the way, and C.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Iterable, Sequence

import torch
from torch import nn

from harness.errors import ConfigError
from harness.patterns import matches
from specdef.modules import (SpecDefExperts, SpecDefLinear, SpecDefModule, kind, output_weights,
                             unsupported_reason, wrap)

__all__ = ["SpecDefLinear", "SpecDefExperts", "SpecDefModule", "apply_specdef", "transform", "specdef_modules"]

log = logging.getLogger(__name__)

# Each family's MLP output projection: Llama/Mistral/Qwen/Gemma/Phi3/OLMo/Granite (down_proj), MPT
# (ffn.down_proj), GPT-NeoX/Falcon/Bloom (dense_4h_to_h), OPT and Phi-1/2 (fc2), GPT-J/CodeGen
# (fc_out), GPT-2 (a Conv1D) and GPT-Neo/BigCode (c_proj), the routed experts of MoE blocks (their
# down_proj, all experts with one compensation) and the shared experts of Qwen2-MoE / DeepSeek-V3.
DEFAULT_LAYERS = ("*.mlp.down_proj", "*.ffn.down_proj", "*.mlp.dense_4h_to_h", "*.fc2", "*.mlp.fc_out",
                  "*.mlp.c_proj", "*.experts", "*.mlp.shared_expert.down_proj", "*.mlp.shared_experts.down_proj")
METHODS = ("lowrank", "exact")
K_POLICIES = ("error", "clip", "skip")
COMPUTE_DTYPES = {"float64": torch.float64, "float32": torch.float32}
NITER = 2
# Columns of W per float64 block: bounds the transient memory of one layer's update to out x CHUNK
# float64 values (4096 x 512 x 8 B = 17 MB) instead of a full float64 copy.
CHUNK = 512
# Rows of C per float64 block.
ROWS = 1024


@dataclasses.dataclass
class LayerReport:
    name: str
    kind: str                       # linear | conv1d | experts
    shape: tuple[int, int]          # (out, in) of the original weight (of one expert for experts)
    experts: int                    # matrices sharing U and C (1 but for experts)
    k: int                          # directions amplified (below the requested k under k_policy=clip)
    sigma1: float                   # σ₁(W) before ([W₁ … W_E] for experts)
    sigma1_defended: float          # σ₁(W') after (as stored, in the model's dtype)
    sigma_ratio: float              # σ₁(W') / (α σ₁(W)); 1 when U holds the top singular direction
    seconds: float


@dataclasses.dataclass
class LayerPlan:
    """Which layers a transform defends, with which k, and what it leaves out."""
    k: dict[str, int]                                                   # name -> k
    clipped: list[dict] = dataclasses.field(default_factory=list)       # {name, rank}: k_policy=clip
    skipped: list[dict] = dataclasses.field(default_factory=list)       # {name, rank}: k_policy=skip
    uncovered_blocks: list[str] = dataclasses.field(default_factory=list)  # default layers only
    n_blocks: int = 0                                                   # decoder blocks of the model


# ---------------------------------------------------------------------------------------------
# Checks (one-line ConfigErrors naming key, value and what is allowed)

def check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"defense.alpha={alpha!r}: allowed a finite number > 0")
    return float(alpha)


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ConfigError(f"defense.method={method!r}: allowed {', '.join(METHODS)}")
    return method


def check_compute_dtype(name: str) -> torch.dtype:
    if name not in COMPUTE_DTYPES:
        raise ConfigError(f"defense.compute_dtype={name!r}: allowed {', '.join(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[name]


def check_k_policy(policy: str) -> str:
    if policy not in K_POLICIES:
        raise ConfigError(f"defense.k_policy={policy!r}: allowed {', '.join(K_POLICIES)}")
    return policy


def check_niter(niter) -> int:
    if isinstance(niter, bool) or not isinstance(niter, int) or niter < 0:
        raise ConfigError(f"defense.niter={niter!r}: allowed an integer >= 0")
    return niter


def rank_bound(module: nn.Module) -> int:
    """The largest rank the output projection can have: min(out, E·in) of [W₁ … W_E]."""
    w, _ = output_weights(module)
    return min(w.shape[1], w.shape[0] * w.shape[2])


def _shape_text(module: nn.Module) -> str:
    w, _ = output_weights(module)
    shape = f"({w.shape[1]}, {w.shape[2]})"
    return shape if w.shape[0] == 1 else f"{w.shape[0]} experts x {shape}"


def check_k(k, name: str, module: nn.Module, k_policy: str = "error") -> int | None:
    """The k to use on this layer: k itself, min(k, rank) under clip, None (leave it) under skip."""
    rank = rank_bound(module)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or (k > rank and k_policy == "error"):
        hint = "; or defense.k_policy=clip|skip for layers of lower rank" if isinstance(k, int) and k > rank else ""
        raise ConfigError(f"defense.k={k!r}: allowed an integer in 1..{rank} (the rank bound of {name}, "
                          f"shape {_shape_text(module)}){hint}")
    if k <= rank:
        return k
    return rank if k_policy == "clip" else None


# ---------------------------------------------------------------------------------------------
# Which layers

def defendable(model: nn.Module) -> dict[str, nn.Module]:
    """name -> module of every layer SpecDef can defend and has not defended yet."""
    modules = dict(model.named_modules())
    wrapped = [n for n, m in modules.items() if isinstance(m, SpecDefModule)]
    return {n: m for n, m in modules.items()
            if kind(m) is not None and not any(n.startswith(f"{w}.") for w in wrapped)}


def _aliases(name: str, module: nn.Module) -> tuple[str, ...]:
    # an experts module is also found by its parameter's name, e.g. model.layers.0.mlp.experts.down_proj
    return (name, f"{name}.down_proj") if kind(module) == "experts" else (name,)


def match_layers(model: nn.Module, layers: Sequence[str] | None) -> list[str]:
    """Names of the layers matched by `layers` (default: each family's MLP output projections).

    With explicit patterns every pattern must match at least one layer; with the default at least
    one pattern must. Layers already defended are refused rather than stacked.
    """
    explicit = layers is not None
    patterns = [str(p) for p in (layers if explicit else DEFAULT_LAYERS)]
    modules = dict(model.named_modules())
    units = defendable(model)
    found: list[str] = []
    for pattern in patterns:
        defended = [n for n, m in modules.items() if isinstance(m, SpecDefModule) and matches(n, pattern)]
        if defended:
            raise ConfigError(f"defense.layers={pattern!r}: allowed layers not yet defended; "
                              f"{defended[0]} already is a {type(modules[defended[0]]).__name__}")
        hits = [n for n, m in units.items() if any(matches(a, pattern) for a in _aliases(n, m))]
        if explicit and not hits:
            raise ConfigError(f"defense.layers={pattern!r}: matches no nn.Linear, Conv1D or MoE experts module; "
                              f"allowed module names such as {', '.join(_examples(list(units)))} "
                              "(glob, or 're:<regex>')")
        for n in hits:
            reason = unsupported_reason(units[n])
            if reason and explicit:
                raise ConfigError(f"defense.layers={pattern!r}: {n} cannot be defended: {reason}; "
                                  "allowed other layers")
        found += [n for n in hits if n not in found and not unsupported_reason(units[n])]
    if not found:
        raise ConfigError(f"defense.layers=null: the defaults {list(DEFAULT_LAYERS)} match no nn.Linear, Conv1D "
                          f"or MoE experts module; allowed explicit names such as {', '.join(_examples(list(units)))}")
    return found


def _examples(names: list[str], n: int = 6) -> list[str]:
    # prefer the last block's layers: they show the naming scheme without listing every block
    return names[-n:] if names else ["<the model has none>"]


def decoder_blocks(model: nn.Module) -> list[str]:
    """Names of the decoder blocks: the ModuleList with one entry per `config.num_hidden_layers`
    (the one holding most parameters, should there be several). Empty when the model has no such config."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not n or not lists:
        return []
    name, _ = max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))
    return [f"{name}.{i}" for i in range(n)]


def plan_layers(model: nn.Module, layers: Sequence[str] | None, k, k_policy: str = "error") -> LayerPlan:
    """The layers to defend and their k; raises a ConfigError before anything is touched."""
    check_k_policy(k_policy)
    plan = LayerPlan(k={})
    for name in match_layers(model, layers):
        module = model.get_submodule(name)
        k_layer = check_k(k, name, module, k_policy)
        if k_layer is None:
            plan.skipped.append({"name": name, "rank": rank_bound(module)})
            continue
        if k_layer < k:
            plan.clipped.append({"name": name, "rank": k_layer})
        plan.k[name] = k_layer
    if not plan.k:
        raise ConfigError(f"defense.k={k}: above the rank of every matched layer, and defense.k_policy=skip "
                          "skips them all; allowed a smaller k or defense.k_policy=clip")
    blocks = decoder_blocks(model)
    plan.n_blocks = len(blocks)
    if layers is None:
        plan.uncovered_blocks = [b for b in blocks if not any(n.startswith(f"{b}.") for n in plan.k)]
    return plan


def _warn(plan: LayerPlan, k: int) -> None:
    if plan.clipped:
        log.warning("specdef: defense.k=%d exceeds the rank of %d layer(s), clipped to their rank "
                    "(defense.k_policy=clip): %s", k, len(plan.clipped), plan.clipped)
    if plan.skipped:
        log.warning("specdef: defense.k=%d exceeds the rank of %d layer(s), left undefended "
                    "(defense.k_policy=skip): %s", k, len(plan.skipped), plan.skipped)
    if plan.uncovered_blocks:
        log.warning("specdef: the default layers cover %d of %d decoder blocks; no defended layer in %s "
                    "(name them in defense.layers)", plan.n_blocks - len(plan.uncovered_blocks), plan.n_blocks,
                    plan.uncovered_blocks)


# ---------------------------------------------------------------------------------------------
# The algebra on a batch W of E matrices (E, out, in), seen as M = [W₁ … W_E] (out x E·in)

def _read_dtype(dtype: torch.dtype) -> torch.dtype:
    # products with the basis run in float32 (float64 weights stay float64): half-precision
    # matmuls would round the basis to 3 digits
    return torch.float64 if dtype == torch.float64 else torch.float32


def _readable(w: torch.Tensor) -> torch.Tensor:
    return w.to(_read_dtype(w.dtype))


def _times(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """M x for x (E·in, q): Σₑ Wₑ xₑ (one batched matmul; half-precision experts one at a time, in float32)."""
    n = w.shape[2]
    if w.dtype == _read_dtype(w.dtype):
        return torch.bmm(w, x.view(w.shape[0], n, -1)).sum(0)
    y = _readable(w[0]) @ x[:n]
    for e in range(1, w.shape[0]):
        y.addmm_(_readable(w[e]), x[e * n:(e + 1) * n])
    return y


def _times_t(w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mᵀ y for y (out, q): the Wₑᵀ y stacked."""
    if w.dtype == _read_dtype(w.dtype):
        return torch.bmm(w.transpose(1, 2), y.expand(w.shape[0], *y.shape)).reshape(-1, y.shape[1])
    return torch.cat([_readable(w[e]).T @ y for e in range(w.shape[0])])


def _orth(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x).Q


def krylov_basis(w: torch.Tensor, block: int, niter: int, generator: torch.Generator) -> torch.Tensor:
    """Orthonormal basis (out x (niter+1)·block) of the block Krylov space [MΩ, (MMᵀ)MΩ, …, (MMᵀ)^niter MΩ].

    Per pass over W it finds the top singular subspace more accurately than subspace (power)
    iteration, which keeps only the last block. On a flat-spectrum (Gaussian) 4096 x 14336 layer, the
    worst case, niter=2 (6 passes) captures 0.95 of σ₁ where torch.svd_lowrank with 4 power iterations
    (10 passes, this project's previous default) captures 0.96 (`python -m benchmarks.specdef_speed`).
    Each block is orthogonalised twice against the earlier ones (twice is enough in float32); the
    final QR makes the whole basis orthonormal.
    """
    omega = torch.randn(w.shape[0] * w.shape[2], block, generator=generator, dtype=_read_dtype(w.dtype),
                        device=w.device)
    blocks = [_orth(_times(w, omega))]
    for _ in range(niter):
        y = _times(w, _times_t(w, blocks[-1]))
        basis = torch.cat(blocks, 1)
        for _ in range(2):
            y -= basis @ (basis.T @ y)
        blocks.append(_orth(y))
    return _orth(torch.cat(blocks, 1))


@dataclasses.dataclass
class Subspace:
    u: torch.Tensor         # out x k, float64, orthonormal: the subspace to amplify
    v1: torch.Tensor        # E·in: the top right singular vector found, to measure σ₁(W') by
    sigma1: float           # σ₁(M), or its Ritz estimate σ₁(QᵀM) ≤ σ₁(M) under lowrank


def rayleigh_ritz(w: torch.Tensor, q: torch.Tensor, k: int) -> Subspace:
    """The top-k singular triplets of M restricted to the basis Q: one pass Z = MᵀQ, then the
    eigenvectors of ZᵀZ = QᵀMMᵀQ (small, in float64). A LAPACK SVD of the wide QᵀM is ~100x slower."""
    z = _times_t(w, q).double()
    evals, evecs = torch.linalg.eigh(z.T @ z)
    top = evecs[:, -1]
    sigma1 = math.sqrt(max(float(evals[-1]), 0.0))
    u = q.double() @ evecs.flip(1)[:, :k]
    return Subspace(u=u, v1=(z @ top) / sigma1 if sigma1 > 0 else torch.zeros_like(z[:, 0]), sigma1=sigma1)


def top_subspaces(weight: torch.Tensor, k: int, method: str = "lowrank", niter: int = NITER,
                  seed: int = 0) -> Subspace:
    """The top-k left singular subspace of `weight` ((out, in), or (E, out, in) for [W₁ … W_E]).

    lowrank: randomized block Krylov with blocks of k+8 columns (seeded, so a release is
    reproducible) and a Rayleigh-Ritz step; exact: full SVD of M. Both run in float32 unless the
    weight is float64: the subspace only has to be good, the exactness of the compensation comes from
    the float64 QR below (P² = P to 1e-16).
    """
    w = weight.detach()
    w = w.unsqueeze(0) if w.dim() == 2 else w
    out = w.shape[1]
    block = min(k + 8, out)
    if method == "exact" or (niter + 1) * block >= min(out, w.shape[0] * w.shape[2]):
        # the Krylov space would hold the whole range of M: the exact SVD is no dearer
        m = torch.cat([_readable(w[e]) for e in range(w.shape[0])], dim=1)
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        sub = Subspace(u=u[:, :k], v1=vh[0], sigma1=float(s[0]))
    else:
        sub = rayleigh_ritz(w, krylov_basis(w, block, niter, torch.Generator(device=w.device).manual_seed(seed)), k)
    sub.u = torch.linalg.qr(sub.u.double()).Q
    return sub


def top_left_subspace(weight: torch.Tensor, k: int, method: str = "lowrank", niter: int = NITER) -> torch.Tensor:
    return top_subspaces(weight, k, method, niter).u


@torch.no_grad()
def amplify_(weight: torch.Tensor, bias: torch.Tensor | None, u: torch.Tensor, alpha: float,
             compute_dtype: torch.dtype = torch.float64, probe: torch.Tensor | None = None) -> torch.Tensor | None:
    """In place: W ← W + (α−1) U (Uᵀ W), b ← b + (α−1) U (Uᵀ b), computed in `compute_dtype`.

    `weight` is (out, in) or (E, out, in), `bias` (out) or (E, out); every matrix gets the same U.
    The update goes through blocks of CHUNK columns, so no full float64 copy of W exists, and the
    result is W' correctly rounded to the weight's dtype. With `probe` (a vector of E·in) it also
    returns W'·probe, read from the stored W' while each block is still in cache.
    """
    w = weight.unsqueeze(0) if weight.dim() == 2 else weight
    u = u.to(compute_dtype)
    u_t = u.T.contiguous()
    y = None
    if probe is not None:
        probe = probe.to(_read_dtype(w.dtype))
        y = torch.zeros(w.shape[1], dtype=probe.dtype, device=w.device)
    n = w.shape[2]
    # one buffer for every block (a fresh one per step would page-fault its memory in each time), laid
    # out like a block: W stored transposed (Conv1D, GPT-OSS experts) then copies without transposing
    buffer = None if w.dtype == compute_dtype else torch.empty_like(w[0, :, :CHUNK], dtype=compute_dtype)
    for e in range(w.shape[0]):
        for j in range(0, n, CHUNK):
            block = w[e, :, j:j + CHUNK]
            work = block if buffer is None else buffer[:, :block.shape[1]].copy_(block)
            work.addmm_(u, u_t @ work, alpha=alpha - 1)
            if work is not block:
                block.copy_(work)
            if y is not None:
                y.addmv_(_readable(block), probe[e * n + j:e * n + j + block.shape[1]])
    if bias is not None:
        b = bias.to(compute_dtype)
        bias.copy_(b + (alpha - 1) * ((b @ u) @ u_t))
    return y


@torch.no_grad()
def compensation(u: torch.Tensor, alpha: float, dtype: torch.dtype,
                 compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """C = I − (1 − 1/α) U Uᵀ (out x out), built in `compute_dtype` row blocks, stored in `dtype`."""
    out = u.shape[0]
    u = u.to(compute_dtype)
    u_t = u.T.contiguous()
    c = torch.empty(out, out, dtype=dtype, device=u.device)
    buffer = torch.empty(min(ROWS, out), out, dtype=compute_dtype, device=u.device)
    for i in range(0, out, ROWS):
        rows = buffer[:min(ROWS, out - i)]
        torch.mm(u[i:i + ROWS], u_t, out=rows)
        rows.mul_(-(1 - 1 / alpha))
        rows[:, i:i + ROWS].diagonal().add_(1.0)
        c[i:i + ROWS].copy_(rows)
    return c


@torch.no_grad()
def defend_layer(module: nn.Module, *, alpha: float, k: int, method: str = "lowrank", niter: int = NITER,
                 compute_dtype: torch.dtype = torch.float64, name: str = "",
                 compensate: bool = True) -> tuple[nn.Module, LayerReport]:
    """Defend one layer. Its output projection is amplified in place and the module becomes the
    `.inner` of the result, so no second copy of a (possibly 235 MB) weight is ever held.
    `compensate=False` is the paper's ablation: the amplified layer is returned alone, so the function changes.

    σ₁ check: ‖W'v₁‖ / (α σ₁(W)) with v₁ the top right singular vector the SVD found; it is 1 when U
    holds the top left singular direction and drops towards cos θ when U misses it by an angle θ.
    """
    t0 = time.perf_counter()
    w, b = output_weights(module)
    sub = top_subspaces(w, k, method, niter)
    s_after = float(amplify_(w, b, sub.u, alpha, compute_dtype, probe=sub.v1).double().norm())
    if not math.isfinite(s_after):
        s_after = float("inf")  # W' overflowed its dtype (float16 at large α); the drift shows the damage
    report = LayerReport(name=name, kind=kind(module), shape=(w.shape[1], w.shape[2]), experts=w.shape[0], k=k,
                         sigma1=sub.sigma1, sigma1_defended=s_after,
                         sigma_ratio=s_after / (alpha * sub.sigma1) if sub.sigma1 > 0 else float("nan"), seconds=0.0)
    if compensate:
        out = w.shape[1]
        comp = nn.Linear(out, out, bias=False, device="meta")
        comp.weight = nn.Parameter(compensation(sub.u, alpha, w.dtype, compute_dtype),
                                   requires_grad=any(p.requires_grad for p in module.parameters()))
        module = wrap(module, comp, alpha, k, method)
    report.seconds = time.perf_counter() - t0
    return module, report


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def transform(model: nn.Module, *, alpha: float, k: int, layers: Sequence[str] | None = None,
              method: str = "lowrank", niter: int = NITER, compute_dtype: str = "float64",
              compensate: bool = True, k_policy: str = "error") -> list[LayerReport]:
    """Apply SpecDef to every matched layer (in place) and return one report per defended layer.

    All checks run before the first layer is touched, so a config error leaves the model as it was.
    k_policy: what a layer of rank below k gets: error (stop), clip (k = its rank) or skip (left as it is);
    clipped and skipped layers, and decoder blocks the default layers miss, are logged in one line each.
    """
    alpha, method, dtype = check_alpha(alpha), check_method(method), check_compute_dtype(compute_dtype)
    niter = check_niter(niter)
    plan = plan_layers(model, layers, k, k_policy)
    _warn(plan, k)
    reports = []
    for name, k_layer in plan.k.items():
        defended, report = defend_layer(model.get_submodule(name), alpha=alpha, k=k_layer, method=method,
                                        niter=niter, compute_dtype=dtype, name=name, compensate=compensate)
        set_module(model, name, defended)
        reports.append(report)
    return reports


def apply_specdef(model: nn.Module, *, alpha: float, k: int, layers: Sequence[str] | None = None,
                  method: str = "lowrank", niter: int = NITER, compute_dtype: str = "float64",
                  k_policy: str = "error") -> nn.Module:
    """SpecDef on a causal LM in place; returns it. `layers`: globs (or 're:' regexes) on module names."""
    transform(model, alpha=alpha, k=k, layers=layers, method=method, niter=niter, compute_dtype=compute_dtype,
              k_policy=k_policy)
    return model


def specdef_modules(model: nn.Module) -> Iterable[tuple[str, SpecDefModule]]:
    """(name, module) of every defended layer: SpecDefLinear (Linear, Conv1D) and SpecDefExperts."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SpecDefModule)]
