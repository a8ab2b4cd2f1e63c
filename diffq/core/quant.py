"""Affine quantization primitives: choose scales, quantize, dequantize. Pure functions on tensors.

Scales and zero points have the keepdim shape of the *blocked* view (see `granularity.blocked`),
so they broadcast against it. Quantized values are returned unpacked: int8 for int formats,
uint8 code indices for lookup formats, torch float8 for fp8; see `pack` for 4-bit storage.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from diffq.core.formats import NF4_CODE, Format
from diffq.core.granularity import Granularity, blocked, reduce_dims


class QParams(NamedTuple):
    scale: torch.Tensor
    zero_point: torch.Tensor | None = None


def _amax(xb: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return xb.abs().amax(dim=dims, keepdim=True)


def choose_qparams(
    x: torch.Tensor,
    fmt: Format,
    gran: Granularity,
    symmetric: bool = True,
    clip_ratio: float | torch.Tensor = 1.0,
) -> QParams:
    """Scale (and zero point when asymmetric) mapping the clipped range of `x` onto `fmt`.

    `clip_ratio` shrinks the range (scalar, or a tensor shaped like the scale) for clipping search.
    """
    xb = blocked(x, gran).float()
    dims = reduce_dims(xb, gran)
    if symmetric or not fmt.supports_zero_point:
        if not symmetric:
            raise ValueError(f"format {fmt.name} has no zero point; use symmetric quantization")
        amax = _amax(xb, dims) * clip_ratio
        scale = amax / fmt.qmax
        return QParams(torch.where(scale > 0, scale, torch.ones_like(scale)))
    lo = xb.amin(dim=dims, keepdim=True).clamp(max=0) * clip_ratio
    hi = xb.amax(dim=dims, keepdim=True).clamp(min=0) * clip_ratio
    scale = (hi - lo) / (fmt.qmax - fmt.qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zp = (fmt.qmin - torch.round(lo / scale)).clamp(fmt.qmin, fmt.qmax).to(torch.int32)
    return QParams(scale, zp)


def _nf4_code(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def quantize(x: torch.Tensor, qp: QParams, fmt: Format, gran: Granularity) -> torch.Tensor:
    """Quantize `x` (original shape) into unpacked codes in the blocked view's shape."""
    xs = blocked(x, gran).float() / qp.scale
    if fmt.kind == "int":
        q = torch.round(xs)
        if qp.zero_point is not None:
            q = q + qp.zero_point
        return q.clamp(fmt.qmin, fmt.qmax).to(torch.int8)
    if fmt.kind == "float":
        return xs.clamp(fmt.qmin, fmt.qmax).to(fmt.storage)
    if fmt.kind == "lut":
        code = _nf4_code(x.device)
        # Nearest code word via midpoints: bucketize is exact and avoids a [..., 16] distance tensor.
        mids = (code[1:] + code[:-1]) / 2
        return torch.bucketize(xs.clamp(-1, 1), mids).to(torch.uint8)
    raise ValueError(f"unknown format kind {fmt.kind}")


def dequantize(
    q: torch.Tensor, qp: QParams, fmt: Format, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Codes (blocked shape, unpacked) back to real values, still in the blocked shape."""
    if fmt.kind == "lut":
        v = _nf4_code(q.device)[q.long()]
    else:
        v = q.to(torch.float32, copy=True)
        if qp.zero_point is not None:
            v.sub_(qp.zero_point)
    # v is q-shaped and its own tensor, and scales broadcast against it: in place saves two
    # full-size temporaries (dequantizing is the whole cost of a large-batch quantized matmul)
    return v.mul_(qp.scale.float()).to(dtype)


def fake_quantize(
    x: torch.Tensor, qp: QParams, fmt: Format, gran: Granularity
) -> torch.Tensor:
    """Quantize then dequantize, in x's shape and dtype. Fake-quant: for calibration and
    sensitivity analysis only; deployed layers hold real codes."""
    return dequantize(quantize(x, qp, fmt, gran), qp, fmt, x.dtype).reshape(x.shape)


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB, computed in float64."""
    ref = ref.detach().double()
    approx = approx.detach()
    noise = (ref - approx.double()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / noise))
