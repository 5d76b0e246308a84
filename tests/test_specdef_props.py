"""Property tests of the SpecDef algebra in float64 on random layers (hypothesis).

Tolerance of C·W' = W: W' has entries up to α·‖W‖, so rounding W' and the product C·W' leaves an
error of a few eps·α·‖W‖ per entry (eps = 2.2e-16), summed over at most 40 terms of the inner
product. 1e-12·α·‖W‖ (≈ 4500 eps·α) covers that with room; a wrong projector or a missed 1/α term is
off by O(1)·‖W‖ and fails by ten orders of magnitude. (Worst measured over 300 random layers:
2.7 eps·α·‖W‖.)
"""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specdef.core import amplify_, compensation, top_left_subspace


@st.composite
def layers(draw):
    out_f, in_f = draw(st.integers(2, 40)), draw(st.integers(2, 40))
    k = draw(st.integers(1, min(out_f, in_f)))
    alpha = 10 ** draw(st.floats(0, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    bias = draw(st.booleans())
    g = torch.Generator().manual_seed(seed)
    # a decaying spectrum, like trained weights: σ_i = 1/i on random singular vectors
    r = min(out_f, in_f)
    u = torch.linalg.qr(torch.randn(out_f, r, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(in_f, r, generator=g, dtype=torch.float64)).Q
    w = u @ torch.diag(1.0 / torch.arange(1, r + 1, dtype=torch.float64)) @ v.T
    b = torch.randn(out_f, generator=g, dtype=torch.float64) if bias else None
    return w, b, k, alpha


def defend(w, b, k, alpha, method):
    u = top_left_subspace(w, k, method)
    w2, b2 = w.clone(), None if b is None else b.clone()
    amplify_(w2, b2, u, alpha)
    return w2, b2, compensation(u, alpha, torch.float64)


def sigma1(m):
    return float(torch.linalg.matrix_norm(m, ord=2))


@settings(max_examples=50, deadline=None)
@given(layers(), st.sampled_from(["exact", "lowrank"]))
def test_compensation_undoes_the_amplification(layer, method):
    w, b, k, alpha = layer
    w2, b2, c = defend(w, b, k, alpha, method)
    scale = float(w.norm())
    assert float((c @ w2 - w).norm()) <= 1e-12 * alpha * scale
    if b is not None:
        assert float((c @ b2 - b).norm()) <= 1e-12 * alpha * float(b.norm())
    x = torch.randn(w.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = c @ (w2 @ x + (0 if b2 is None else b2))
    ref = w @ x + (0 if b is None else b)
    assert float((y - ref).norm()) <= 1e-12 * alpha * (scale * float(x.norm()) + (0 if b is None else float(b.norm())))


@settings(max_examples=50, deadline=None)
@given(layers())
def test_top_singular_value_is_multiplied_by_alpha_exact_svd(layer):
    w, b, k, alpha = layer
    w2, _, _ = defend(w, b, k, alpha, "exact")
    # σ_1..σ_k all scale by α, the rest stay, so σ₁(W') = α σ₁(W) up to float64 rounding
    assert abs(sigma1(w2) / (alpha * sigma1(w)) - 1) < 1e-9


@settings(max_examples=50, deadline=None)
@given(layers())
def test_top_singular_value_is_multiplied_by_alpha_lowrank_within_1pct(layer):
    w, b, k, alpha = layer
    w2, _, _ = defend(w, b, k, alpha, "lowrank")
    assert abs(sigma1(w2) / (alpha * sigma1(w)) - 1) < 0.01
