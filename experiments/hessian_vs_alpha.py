"""Theorem 3 check: the top Hessian eigenvalue of the LM loss grows with α (at least linearly).

    python -m experiments.hessian_vs_alpha            # α ∈ {1, 10, 100, 1e3, 1e4}, ~1 min on 2 cores
    python -m experiments.hessian_vs_alpha --alphas 1 100 --iters 10 --texts 8

SpecDef on every MLP down projection of the pretrained tiny model (k = 8), σ₁(H) over all parameters
on one batch of held-out text (Lanczos with Hessian-vector products), the log-log slope of σ₁(H)
against α, and results/hessian_vs_alpha.{csv,md,png}. The theorem's bound is linear in α; the
compensation layer's own block of the Hessian sees α-scaled activations, so ~α² is expected.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from harness.batches import encode
from harness.models import from_pretrained
from harness.train import lm_loss
from specdef.core import transform
from experiments.common import RESULTS_DIR, script_command, tiny_setup, write_table
from specdef.hessian import top_eigenvalue

ALPHAS = (1.0, 10.0, 100.0, 1e3, 1e4)


def measure(model_path: Path, data, alphas: Sequence[float] = ALPHAS, k: int = 8, layers=None,
            texts: int = 16, iters: int = 30, tol: float = 1e-4) -> pd.DataFrame:
    """One row per α: sigma1_H (max |eigenvalue| of the Hessian), HVPs used, seconds; one batch for all α."""
    _, tokenizer = from_pretrained(model_path)
    batch = encode(tokenizer, data.heldout_text(texts), data.max_length)
    rows = []
    for alpha in alphas:
        model, _ = from_pretrained(model_path)
        transform(model, alpha=alpha, k=k, layers=layers)
        t0 = time.perf_counter()
        value, n_hvp = top_eigenvalue(model, lm_loss, batch, iters=iters, tol=tol)
        rows.append({"alpha": alpha, "sigma1_H": abs(value), "n_hvp": n_hvp,
                     "seconds": round(time.perf_counter() - t0, 2)})
    return pd.DataFrame(rows)


def loglog_slope(df: pd.DataFrame) -> float:
    """Least-squares slope of log σ₁(H) against log α."""
    return float(np.polyfit(np.log10(df["alpha"]), np.log10(df["sigma1_H"]), 1)[0])


def plot(df: pd.DataFrame, slope: float, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.loglog(df["alpha"], df["sigma1_H"], "o-", label=f"measured (slope {slope:.2f})")
    base = df["sigma1_H"].iloc[0] / df["alpha"].iloc[0]
    ax.loglog(df["alpha"], base * df["alpha"], "--", color="gray", label="∝ α (Theorem 3 bound)")
    ax.set_xlabel("α"), ax.set_ylabel("σ₁(Hessian of LM loss)")
    ax.set_title("SpecDef on the tiny model: Hessian vs α")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS))
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--texts", type=int, default=16, help="held-out texts in the one batch")
    parser.add_argument("--iters", type=int, default=30, help="max Lanczos iterations (HVPs)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the tiny model and world, e.g. scale=tiny")
    args = parser.parse_args(argv)
    path, data = tiny_setup(args.overrides)
    df = measure(path, data, args.alphas, k=args.k, texts=args.texts, iters=args.iters)
    slope = loglog_slope(df)
    stem = args.out / "hessian_vs_alpha"
    note = (f"log-log slope {slope:.3f} (Theorem 3 needs >= 1). SpecDef on all MLP down projections, k={args.k}; "
            f"σ₁(H) over all parameters, one batch of {args.texts} held-out texts, Lanczos (tol 1e-4).")
    files = write_table(df, stem, "Top Hessian eigenvalue vs α", [note],
                        command=script_command("experiments.hessian_vs_alpha", argv)) + [plot(df, slope, stem.with_suffix(".png"))]
    print(df.to_string(index=False))
    print(note)
    print("wrote", ", ".join(str(f) for f in files))
    return slope


if __name__ == "__main__":
    main()
