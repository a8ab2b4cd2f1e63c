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


def _symmetric_int_search(xb, dims, fmt: Format, grid: int, min_ratio: float, norm: float) -> QParams:
    """Same search as the general path, in place on one buffer: the hot loop of weight
    quantization for large models."""
    amax = xb.abs().amax(dim=dims, keepdim=True)
    best_scale, best_err = None, None
    buf = torch.empty_like(xb)
    for ratio in torch.linspace(1.0, min_ratio, grid).tolist():
        scale = amax * ratio / fmt.qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        torch.div(xb, scale, out=buf)
        buf.round_().clamp_(fmt.qmin, fmt.qmax).mul_(scale).sub_(xb).abs_()
        err = (buf.pow_(norm) if norm != 1 else buf).sum(dim=dims, keepdim=True)
        if best_scale is None:
            best_scale, best_err = scale, err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    return QParams(best_scale)
