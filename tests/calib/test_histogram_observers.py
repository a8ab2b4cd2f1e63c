import itertools
import math

import numpy as np
import pytest
import torch

from diffq.calib import histogram as H
from diffq.calib import observers as O
from diffq.core import PerTensor, choose_qparams, fake_quantize, get_format


def test_merge_is_exact_and_order_free(gen):
    xs = [torch.randn(5000, generator=gen) * s for s in (0.3, 2.0, 9.0)]
    whole = torch.cat(xs)
    e_all = H.range_exponent(float(whole.abs().max()))
    ref = H.histogram(whole, e_all)
    for order in itertools.permutations(range(3)):
        h, e = None, None
        for i in order:
            ei = H.range_exponent(float(xs[i].abs().max()))
            hi = H.histogram(xs[i], ei)
            h, e = (hi, ei) if h is None else H.merge(h, e, hi, ei)
        assert e == e_all and torch.equal(h, ref)
    assert int(ref.sum()) == 15000


def test_range_exponent_covers_amax():
    for a in (1e-3, 0.5, 1.0, 3.7, 1024.0):
        e = H.range_exponent(a)
        assert 2.0 ** e > a >= 2.0 ** (e - 1)


def test_percentile_matches_sorted_samples(gen):
    x = torch.randn(200_000, generator=gen).abs()
    e = H.range_exponent(float(x.max()))
    h = H.histogram(x, e)
    for p in (99.0, 99.9, 99.99):
        ref = float(np.percentile(x.numpy(), p))
        got = O.percentile_threshold(h, e, p)
        assert abs(got - ref) <= H.bin_width(e) + 1e-9, (p, got, ref)


def test_mse_threshold_near_brute_force_optimum(gen):
    x = torch.randn(100_000, generator=gen) ** 3  # heavy tails: the optimum clips
    amax = float(x.abs().max())
    e = H.range_exponent(amax)
    t = O.mse_threshold(H.histogram(x, e), e, 127, amax)
    fmt = get_format("int8")

    def mse(thr):
        qp = choose_qparams(torch.tensor([thr]), fmt, PerTensor())
        return float((fake_quantize(x, qp, fmt, PerTensor()) - x).pow(2).mean())

    brute = min(mse(thr) for thr in np.linspace(amax / 200, amax, 400))
    # it clipped, and clipping paid: over 40 seeds the error ratio to no clipping was 0.75-0.89
    # (a fixed "t < 0.9 amax" failed for about 1 draw in 30: the optimum sat at 0.906 amax)
    assert t < amax and mse(t) <= 0.95 * mse(amax)
    assert mse(t) <= 1.05 * brute              # and is within 5% of the best threshold


def _kl_reference(hist: np.ndarray, i: int, levels: int) -> float:
    """The TensorRT / MXNet entropy-calibration step for one candidate, written plainly."""
    sliced = hist[:i].astype(np.float64)
    p = sliced.copy()
    p[-1] += hist[i:].sum()
    nonzero = p != 0
    m = i // levels
    q = np.zeros(i)
    for j in range(levels):
        start = j * m
        stop = (j + 1) * m if j < levels - 1 else i
        norm = nonzero[start:stop].sum()
        if norm:
            q[start:stop] = sliced[start:stop].sum() / norm
    q[~nonzero] = 0
    p, q = p / p.sum(), q / q.sum()
    mask = p > 0
    return float((p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))).sum())


def test_kl_matches_plain_reference(gen):
    x = torch.randn(50_000, generator=gen) * torch.rand(50_000, generator=gen) ** 2 * 4
    e = H.range_exponent(float(x.abs().max()))
    h = H.histogram(x, e)
    last = int(torch.nonzero(h).max()) + 1
    candidates = list(range(128, last + 1))
    ref = [_kl_reference(h.numpy(), i, 128) for i in candidates]
    best_ref = candidates[int(np.argmin(ref))]
    for i in candidates[:: max(1, len(candidates) // 20)]:
        assert math.isclose(O._kl_divergence(h.double(), i, 128), _kl_reference(h.numpy(), i, 128),
                            rel_tol=1e-9, abs_tol=1e-12)
    got = O.kl_threshold(h, e, candidates=10_000)  # every candidate: must equal the reference
    assert got == pytest.approx(best_ref * H.bin_width(e))
    assert got < float(x.abs().max())
