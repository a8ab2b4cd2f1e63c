"""Histograms of |x| whose range grows by powers of two, so merging is exact.

A histogram covers [0, R) with R = 2^e in `BINS` equal bins. When a larger value arrives the
range doubles (possibly several times) and each run of 2^k old bins folds into one new bin:
no count moves to a wrong bin, so merging calls, prompts or processes gives the same result
in any order.
"""
from __future__ import annotations

import math

import torch

BINS = 1024


def range_exponent(amax: float) -> int:
    """Smallest e with 2^e > amax (a positive amax; tiny ranges clamp at 2^-24)."""
    return max(-24, math.floor(math.log2(amax)) + 1) if amax > 0 else -24


def fold(hist: torch.Tensor, shift: int) -> torch.Tensor:
    """Re-express [..., BINS] counts on a range 2^shift times larger."""
    if shift <= 0:
        return hist
    if shift >= math.log2(hist.shape[-1]):
        out = torch.zeros_like(hist)
        out[..., 0] = hist.sum(-1)
        return out
    f = 1 << shift
    folded = hist.reshape(*hist.shape[:-1], -1, f).sum(-1)
    pad = torch.zeros(*hist.shape[:-1], hist.shape[-1] - folded.shape[-1], dtype=hist.dtype)
    return torch.cat([folded, pad], dim=-1)


def histogram(x: torch.Tensor, exponent: int, bins: int = BINS, absolute: bool = False) -> torch.Tensor:
    """int64 counts of |x| over [0, 2^exponent) (x already non-negative when `absolute`)."""
    a = x.detach().float() if absolute else x.detach().abs().float()
    # histc counts in float32, exact up to 2^24 per bin and call; totals are kept in int64
    return torch.histc(a, bins=bins, min=0.0, max=2.0 ** exponent).long()


def merge(h1: torch.Tensor, e1: int, h2: torch.Tensor, e2: int) -> tuple[torch.Tensor, int]:
    """Sum two histograms with range exponents e1, e2 on the larger range."""
    e = max(e1, e2)
    return fold(h1, e - e1) + fold(h2, e - e2), e


def bin_width(exponent: int, bins: int = BINS) -> float:
    return 2.0 ** exponent / bins
