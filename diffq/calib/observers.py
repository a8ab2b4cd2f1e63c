"""Observers: from an |x| histogram (and min/max) to a clipping threshold. Pure functions.

All thresholds are for symmetric quantization of |x| onto `qmax` positive levels.
"""
from __future__ import annotations

import torch

from diffq.calib.histogram import bin_width


def minmax_threshold(amax: float) -> float:
    return float(amax)


def percentile_threshold(hist: torch.Tensor, exponent: int, percentile: float) -> float:
    """Upper edge of the first bin where the cumulative count reaches `percentile` %."""
    c = hist.double().cumsum(0)
    k = int(torch.searchsorted(c, c[-1] * percentile / 100.0))
    return (min(k, len(hist) - 1) + 1) * bin_width(exponent, len(hist))


def mse_threshold(hist: torch.Tensor, exponent: int, qmax: float, amax: float,
                  candidates: int = 128) -> float:
    """Threshold minimizing the expected squared error of quantizing the histogram's bin
    centres (clipping above T, rounding to T / qmax steps below)."""
    w = bin_width(exponent, len(hist))
    centres = (torch.arange(len(hist), dtype=torch.float64) + 0.5) * w
    counts = hist.double()
    ts = torch.linspace(amax / candidates, amax, candidates, dtype=torch.float64)
    step = (ts / qmax)[:, None]
    q = torch.clamp(torch.round(centres[None] / step), max=qmax) * step
    err = ((q - centres[None]) ** 2 * counts[None]).sum(1)
    return float(ts[int(err.argmin())])


def _kl_divergence(h: torch.Tensor, i: int, levels: int) -> float:
    """KL(P || Q) of candidate i: P is h[:i] with the tail folded into its last bin; Q merges
    h[:i] (without the tail) into `levels` chunks, spread evenly over P's non-empty bins."""
    sliced = h[:i]
    p = sliced.clone()
    p[-1] += h[i:].sum()
    m = i // levels
    chunk = torch.clamp(torch.arange(i) // m, max=levels - 1)
    sums = torch.zeros(levels, dtype=h.dtype).index_add_(0, chunk, sliced)
    nonzero = (p > 0).to(h.dtype)
    norm = torch.zeros(levels, dtype=h.dtype).index_add_(0, chunk, nonzero)
    q = torch.where(nonzero > 0, sums[chunk] / norm[chunk].clamp(min=1), torch.zeros_like(p))
    p, q = p / p.sum(), q / q.sum().clamp(min=1e-300)
    mask = p > 0
    return float((p[mask] * torch.log(p[mask] / q[mask].clamp(min=1e-12))).sum())


def kl_threshold(hist: torch.Tensor, exponent: int, levels: int = 128,
                 candidates: int = 128) -> float:
    """TensorRT-style entropy calibration: the threshold i * width (i >= levels bins) whose
    folded-and-requantized distribution is closest to the original in KL divergence.
    At most `candidates` values of i are tried, evenly spaced up to the last non-empty bin."""
    h = hist.double()
    nz = torch.nonzero(h).flatten()
    last = int(nz[-1]) + 1 if len(nz) else levels
    if last <= levels:
        return last * bin_width(exponent, len(hist))
    stride = max(1, (last - levels) // candidates)
    tried = list(range(levels, last + 1, stride))
    if tried[-1] != last:
        tried.append(last)
    divs = [_kl_divergence(h, i, levels) for i in tried]
    best = tried[min(range(len(tried)), key=divs.__getitem__)]
    return best * bin_width(exponent, len(hist))
