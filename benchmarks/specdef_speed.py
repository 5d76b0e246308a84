"""How fast and how lean is SpecDef at Llama-3.1-8B and GPT-OSS-20b layer size? (Not a test: timings depend
on the machine, and on a shared one on what else runs: the load average is printed first.)

    python -m benchmarks.specdef_speed                # 10 dense layers, their floor, one full SVD, one MoE layer
    python -m benchmarks.specdef_speed --layers 3 --skip-full --skip-moe
    python -m benchmarks.specdef_speed --small        # small shapes: a smoke run in seconds

Dense: float32 nn.Linear layers of 4096 x 14336 (MLP down projections) with a decaying spectrum like
trained weights: W = A·diag(s)·B (rank 64, s_i = i^-0.5) plus a flat noise floor. Reported in one run:
- the fast path (`apply_specdef` defaults: lowrank, float64 algebra), total and per layer;
- its floor: the same passes over W as bare matmuls (2·niter + 2 float32 products with the Krylov
  blocks, the float64 round trip of W with the two rank-k float64 products and the σ₁ probe, and the
  product U Uᵀ of C), timed on one layer; fast / floor is the overhead of everything else;
- the full-SVD path (`method=exact`) on one layer, and full / fast per layer;
- peak extra resident memory while defending, with the inserted compensation layers counted apart;
- how much of σ₁ the fast path's subspace captures on a flat-spectrum layer (the worst case),
  beside the previous default, torch.svd_lowrank with 4 power iterations.
MoE: one GPT-OSS-20b experts module (32 experts, hidden 2880, intermediate 2880, down_proj stored
transposed with biases; shapes from its config) through the experts path: time, peak extra memory, the
σ₁ check and the parameter cost of the one shared compensation against one per expert. Its gate_up_proj
stays on the meta device: SpecDef never reads it.
Targets: ≤ 1 s per dense layer at k = 16 on 2 cores; transient memory ≤ 2 x one layer.
"""
from __future__ import annotations

import argparse
import os
import threading
import time

import psutil
import torch
from torch import nn
from transformers import GptOssConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

from specdef.core import CHUNK, NITER, krylov_basis, rayleigh_ritz, top_subspaces, transform

BIG = (4096, 14336)     # Llama-3.1-8B: hidden x intermediate (down_proj is out=4096, in=14336)
SMALL = (256, 896)
GPT_OSS_20B = {"hidden_size": 2880, "intermediate_size": 2880, "num_local_experts": 32}
GPT_OSS_SMALL = {"hidden_size": 256, "intermediate_size": 256, "num_local_experts": 8}


class Container(nn.Module):
    """Just enough model for `transform`: layers.<i>.mlp.<name>, as in a Llama or a GPT-OSS."""

    def __init__(self, modules: list[nn.Module], name: str = "down_proj"):
        super().__init__()
        self.layers = nn.ModuleList()
        for module in modules:
            block = nn.Module()
            block.mlp = nn.Module()
            setattr(block.mlp, name, module)
            self.layers.append(block)


@torch.no_grad()
def decaying_matrix(out_f: int, in_f: int, seed: int, rank: int = 64, noise: float = 1e-3) -> torch.Tensor:
    """W = A diag(s) B + noise (out_f x in_f, float32), built in place (no full-size temporaries)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.empty(out_f, in_f)
    torch.randn(out_f, in_f, generator=g, out=w)
    w.mul_(noise / in_f ** 0.5)
    s = torch.arange(1, rank + 1, dtype=torch.float32) ** -0.5
    a = torch.randn(out_f, rank, generator=g) / out_f ** 0.5
    b = torch.randn(rank, in_f, generator=g) / in_f ** 0.5
    return w.addmm_(a * s, b)


def decaying_linear(out_f: int, in_f: int, seed: int) -> nn.Linear:
    layer = nn.Linear(in_f, out_f, bias=False, device="meta")
    layer.weight = nn.Parameter(decaying_matrix(out_f, in_f, seed))
    return layer


@torch.no_grad()
def gpt_oss_experts(shape: dict, seed: int = 0) -> GptOssExperts:
    """A GPT-OSS experts module of the given shape: each expert's down projection (out = hidden,
    in = intermediate, stored transposed) with its own decaying spectrum, and random biases."""
    config = GptOssConfig(**shape, num_experts_per_tok=4)
    with torch.device("meta"):
        experts = GptOssExperts(config)
    down = torch.empty(experts.down_proj.shape)
    for e in range(down.shape[0]):
        down[e] = decaying_matrix(shape["hidden_size"], shape["intermediate_size"], seed + e).T
    experts.down_proj = nn.Parameter(down)
    experts.down_proj_bias = nn.Parameter(torch.randn(experts.down_proj_bias.shape,
                                                      generator=torch.Generator().manual_seed(seed)) * 0.02)
    return experts


class RssSampler:
    """Peak resident memory above a baseline, sampled every 5 ms in a thread. Torch allocations are
    invisible to tracemalloc, and ru_maxrss is a lifetime maximum that model construction already set.
    `credited` (bytes) is subtracted from each sample: the compensation layers finished so far."""

    def __init__(self, interval: float = 0.005):
        self.proc = psutil.Process()
        self.interval = interval
        self.credited = 0
        self.peak = 0
        self.peak_transient = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.baseline = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            extra = self.proc.memory_info().rss - self.baseline
            self.peak = max(self.peak, extra)
            self.peak_transient = max(self.peak_transient, extra - self.credited)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def defend_each(model: Container, name: str, k: int, alpha: float,
                compute_dtype: str) -> tuple[list, RssSampler, float]:
    """SpecDef with the defaults through the public `transform`, one layer per call so the sampler
    can credit each finished compensation matrix."""
    reports = []
    t0 = time.perf_counter()
    with RssSampler() as rss:
        for i, block in enumerate(model.layers):
            reports += transform(model, alpha=alpha, k=k, layers=[f"layers.{i}.mlp.{name}"],
                                 compute_dtype=compute_dtype)
            comp = getattr(block.mlp, name).comp.weight
            rss.credited += comp.numel() * comp.element_size()
    return reports, rss, time.perf_counter() - t0


@torch.no_grad()
def floor_seconds(weight: torch.Tensor, k: int, niter: int = NITER) -> float:
    """The passes over W the fast path makes, as bare matmuls of the same shapes (best of 3)."""
    weight = weight.clone()  # the float64 round trip writes into it
    out, n = weight.shape
    b = k + 8
    x, y = torch.randn(n, b), torch.randn(out, b)
    basis = torch.randn(out, (niter + 1) * b)
    u, probe = torch.randn(out, k, dtype=torch.float64), torch.randn(n)
    buffer = torch.empty(out, CHUNK, dtype=torch.float64)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        weight @ x                                      # the first Krylov block
        for _ in range(niter):
            weight.T @ y, weight @ x                    # one Krylov iteration
        weight.T @ basis                                # Rayleigh-Ritz
        for j in range(0, n, CHUNK):                    # amplify in float64, in blocks, and the σ₁ probe
            block = buffer[:, :min(CHUNK, n - j)].copy_(weight[:, j:j + CHUNK])
            block.addmm_(u, u.T @ block)
            weight[:, j:j + CHUNK].copy_(block)
            weight[:, j:j + CHUNK] @ probe[j:j + CHUNK]
        (u @ u.T).float()                               # C
        best = min(best, time.perf_counter() - t0)
    return best


def run_full(shape: tuple[int, int], k: int, alpha: float, compute_dtype: str) -> float:
    model = Container([decaying_linear(*shape, seed=10_000)])
    t0 = time.perf_counter()
    transform(model, alpha=alpha, k=k, layers=["layers.0.mlp.down_proj"], method="exact", compute_dtype=compute_dtype)
    return time.perf_counter() - t0


@torch.no_grad()
def subspace_quality(shape: tuple[int, int], k: int) -> dict:
    """σ₁(UᵀW) / σ₁(W) on a flat-spectrum (Gaussian) layer, the worst case for randomized methods:
    the fast path's U against torch.svd_lowrank(q=k+8, niter=4), the previous default (10 passes).
    σ₁(W) from a block Krylov run far past convergence (blocks of 64, 8 iterations)."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) / shape[1] ** 0.5
    reference = rayleigh_ritz(w[None], krylov_basis(w[None], 64, 8, torch.Generator().manual_seed(1)), 1).sigma1
    fast = top_subspaces(w, k).u.float()
    torch.manual_seed(0)
    previous = torch.svd_lowrank(w, q=k + 8, niter=4)[0][:, :k]
    captured = {name: float(torch.linalg.matrix_norm(u.T @ w, ord=2)) / reference
                for name, u in (("fast", fast), ("previous", previous))}
    print(f"subspace on a flat-spectrum layer (worst case): sigma1(U^T W) / sigma1(W) = {captured['fast']:.4f} "
          f"(block Krylov, niter={NITER}, {2 * NITER + 2} passes); {captured['previous']:.4f} "
          "(torch.svd_lowrank, niter=4, 10 passes)", flush=True)
    return {"flat_captured_fast": captured["fast"], "flat_captured_previous": captured["previous"]}


def run_dense(args, shape: tuple[int, int]) -> dict:
    layer_mb = shape[0] * shape[1] * 4 / 2**20
    print(f"building {args.layers} float32 layers of {shape[0]} x {shape[1]} ({layer_mb:.0f} MiB each)", flush=True)
    model = Container([decaying_linear(*shape, seed=i) for i in range(args.layers)])
    reports, rss, total = defend_each(model, "down_proj", args.k, args.alpha, args.compute_dtype)
    per_layer = total / args.layers
    floor = floor_seconds(model.layers[0].mlp.down_proj.inner.weight.data, args.k)
    result = {"layers": args.layers, "shape": shape, "compute_dtype": args.compute_dtype, "k": args.k,
              "fast_total_s": total, "fast_per_layer_s": per_layer, "floor_per_layer_s": floor,
              "fast_over_floor": per_layer / floor,
              "peak_extra_mib": rss.peak / 2**20, "peak_transient_mib": rss.peak_transient / 2**20,
              "comp_mib": rss.credited / 2**20, "layer_mib": layer_mb,
              "sigma_ratio_min": min(r.sigma_ratio for r in reports),
              "sigma_ratio_max": max(r.sigma_ratio for r in reports)}
    print(f"fast path (lowrank, niter={NITER}, k={args.k}, compute {args.compute_dtype}): {total:.2f} s for "
          f"{args.layers} layers ({per_layer:.2f} s/layer)")
    print(f"floor (the same passes over W as bare matmuls): {floor:.2f} s/layer; fast / floor = "
          f"{result['fast_over_floor']:.2f}")
    print(f"peak extra RSS {result['peak_extra_mib']:.0f} MiB, of which compensation layers "
          f"{result['comp_mib']:.0f} MiB; transient peak {result['peak_transient_mib']:.0f} MiB = "
          f"{result['peak_transient_mib'] / layer_mb:.2f} x one layer")
    print(f"sigma1(W') / (alpha sigma1(W)): {result['sigma_ratio_min']:.5f} .. {result['sigma_ratio_max']:.5f}")
    if not args.skip_full:
        full = run_full(shape, args.k, args.alpha, args.compute_dtype)
        result.update(full_per_layer_s=full, full_over_fast=full / per_layer)
        print(f"full SVD path (exact) on one layer: {full:.2f} s; per-layer full / fast = {full / per_layer:.1f}x",
              flush=True)
    del model
    result.update(subspace_quality(shape, args.k))
    return result


@torch.no_grad()
def expert_sigma1(experts: GptOssExperts, iters: int = 30) -> torch.Tensor:
    """σ₁ of each expert's down projection by power iteration (a full SVD per expert would take minutes)."""
    w = experts.down_proj.detach()  # (E, in, out): Wₑ = w[e].T
    x = torch.randn(w.shape[0], w.shape[2], 1, generator=torch.Generator().manual_seed(0))
    for _ in range(iters):
        x = w.transpose(1, 2) @ (w @ x)
        x /= x.norm(dim=1, keepdim=True)
    return (w @ x).norm(dim=(1, 2))


def run_moe(args, shape: dict) -> dict:
    experts = gpt_oss_experts(shape)
    n_exp, hidden, inter = shape["num_local_experts"], shape["hidden_size"], shape["intermediate_size"]
    before = expert_sigma1(experts)
    layer_mb = experts.down_proj.numel() * 4 / 2**20
    print(f"GPT-OSS experts layer: {n_exp} experts, down_proj {tuple(experts.down_proj.shape)} float32 "
          f"({layer_mb:.0f} MiB) + biases", flush=True)
    model = Container([experts], name="experts")
    reports, rss, seconds = defend_each(model, "experts", args.k, args.alpha, args.compute_dtype)
    report = reports[0]
    per_expert = expert_sigma1(experts) / (args.alpha * before)
    result = {"moe_seconds": seconds, "moe_peak_transient_mib": rss.peak_transient / 2**20,
              "moe_expert_sigma_ratio_min": float(per_expert.min()),
              "moe_expert_sigma_ratio_max": float(per_expert.max()),
              "moe_comp_params": hidden ** 2, "moe_per_expert_comp_params": n_exp * hidden ** 2,
              "moe_down_proj_params": n_exp * hidden * inter, "moe_sigma_ratio": report.sigma_ratio}
    transient = result["moe_peak_transient_mib"]
    print(f"experts path (k={args.k}): {seconds:.2f} s per layer; transient peak {transient:.0f} MiB = "
          f"{transient / layer_mb:.2f} x the layer's down_proj; sigma1 ratio {report.sigma_ratio:.5f} "
          "(all experts side by side)")
    print(f"each expert alone: sigma1(W'_e) / (alpha sigma1(W_e)) {result['moe_expert_sigma_ratio_min']:.3f} .. "
          f"{result['moe_expert_sigma_ratio_max']:.3f} (an expert's sigma1 grows alpha-fold as far as its top "
          "direction lies in the shared U; these experts' top directions are independent)")
    print(f"compensation: {hidden ** 2:,} parameters per layer ({hidden ** 2 / (n_exp * hidden * inter):.1%} of the "
          f"experts' down_proj); one per expert would be {n_exp * hidden ** 2:,}")
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--small", action="store_true", help=f"{SMALL[0]} x {SMALL[1]} layers instead of {BIG}, "
                                                             "and 8 experts of 256 x 256")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=1e4)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: as set)")
    parser.add_argument("--compute-dtype", default="float64", choices=["float64", "float32"],
                        help="dtype of the algebra (defense.compute_dtype)")
    parser.add_argument("--skip-full", action="store_true", help="skip the full-SVD layer (~1 min at full size)")
    parser.add_argument("--skip-moe", action="store_true", help="skip the GPT-OSS experts layer")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        load = os.getloadavg()[0]
        print(f"torch threads {torch.get_num_threads()} of {os.cpu_count()} cores; load average {load:.1f} "
              f"(above the core count the timings are inflated)", flush=True)
        result = {"threads": torch.get_num_threads(), "load_average": load,
                  **run_dense(args, SMALL if args.small else BIG)}
        if not args.skip_moe:
            result.update(run_moe(args, GPT_OSS_SMALL if args.small else GPT_OSS_20B))
        return result
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
