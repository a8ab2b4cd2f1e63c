"""Clipping search: per block, the range shrink that minimizes the quantization error."""
from __future__ import annotations

import torch

from diffq.core.formats import Format
from diffq.core.granularity import Granularity, blocked, reduce_dims
from diffq.core.quant import QParams, choose_qparams, dequantize, quantize


def mse_clip_qparams(
    x: torch.Tensor,
    fmt: Format,
    gran: Granularity,
    symmetric: bool = True,
    grid: int = 20,
    min_ratio: float = 0.5,
    norm: float = 2.0,
) -> QParams:
    """Try `grid` clip ratios in [min_ratio, 1] and keep, for every scale block independently,
    the one whose quantize-dequantize error (L`norm`) is smallest. Ratio 1 (plain min/max)
    is always a candidate, so the result is never worse than no clipping."""
    xb = blocked(x, gran).float()
    dims = reduce_dims(xb, gran)
    if symmetric and fmt.kind == "int":
        return _symmetric_int_search(xb, dims, fmt, grid, min_ratio, norm)
    best: QParams | None = None
    best_err = None
    for ratio in torch.linspace(1.0, min_ratio, grid).tolist():
        qp = choose_qparams(x, fmt, gran, symmetric, clip_ratio=ratio)
        err = (dequantize(quantize(x, qp, fmt, gran), qp, fmt) - xb).abs().pow(norm)
        err = err.sum(dim=dims, keepdim=True)
        if best is None:
            best, best_err = qp, err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        scale = torch.where(better, qp.scale, best.scale)
        zp = None if qp.zero_point is None else torch.where(better, qp.zero_point, best.zero_point)
        best = QParams(scale, zp)
    assert best is not None
    return best


def best_of(candidates, error):
    """The candidate tensor whose `error` is smallest, chosen per element of the error's shape
    (which broadcasts against the candidates); the first wins ties."""
    best = best_err = None
    for c in candidates:
        err = error(c)
        if best is None:
            best, best_err = c, err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, c, best)
    return best


def _symmetric_int_search(xb, dims, fmt: Format, grid: int, min_ratio: float, norm: float) -> QParams:
    """Same search as the general path, in place on one buffer: the hot loop of weight
    quantization for large models."""
    amax = xb.abs().amax(dim=dims, keepdim=True)
    buf = torch.empty_like(xb)

    def scale(ratio: float) -> torch.Tensor:
        s = amax * ratio / fmt.qmax
        return torch.where(s > 0, s, torch.ones_like(s))

    def error(s: torch.Tensor) -> torch.Tensor:
        torch.div(xb, s, out=buf)
        buf.round_().clamp_(fmt.qmin, fmt.qmax).mul_(s).sub_(xb).abs_()
        return (buf.pow_(norm) if norm != 1 else buf).sum(dim=dims, keepdim=True)

    return QParams(best_of((scale(r) for r in torch.linspace(1.0, min_ratio, grid).tolist()), error))
