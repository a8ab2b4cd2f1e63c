"""W8A8 ops as `torch.library` custom ops: one schema, a pure-torch default implementation
(any device), a CPU kernel (oneDNN int8 when a prepacked weight is passed) and a fake
implementation so `torch.compile` can trace through quantized models.

Static per-tensor activation scales are passed per channel segment (`x_scales`, `segments`):
a UNet layer that consumes cat(h, skip) quantizes each half with its own scale.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from diffq.ops import onednn


def _qdq(x: Tensor, scales: list[float], segments: list[int], axis: int) -> Tensor:
    """Quantize to symmetric int8 per channel segment and back (the reference grid)."""
    parts = torch.split(x, segments, dim=axis) if len(segments) > 1 else (x,)
    out = [torch.round(p.float() / s).clamp_(-128, 127).mul_(s).to(x.dtype)
           for p, s in zip(parts, scales, strict=True)]
    return out[0] if len(out) == 1 else torch.cat(out, dim=axis)


def _dequant_weight(qweight: Tensor, w_scale: Tensor, dtype: torch.dtype) -> Tensor:
    shape = [-1] + [1] * (qweight.dim() - 1)
    return (qweight.float() * w_scale.float().reshape(shape)).to(dtype)


def _linear_reference(x, qweight, w_scale, bias, x_scale):
    b = None if bias is None else bias.to(x.dtype)
    return F.linear(_qdq(x, [x_scale], [x.shape[-1]], -1), _dequant_weight(qweight, w_scale, x.dtype), b)


def _conv2d_reference(x, qweight, w_scale, bias, x_scales, segments, stride, padding, dilation, groups):
    b = None if bias is None else bias.to(x.dtype)
    return F.conv2d(_qdq(x, x_scales, segments, 1), _dequant_weight(qweight, w_scale, x.dtype), b,
                    stride, padding, dilation, groups)


@torch.library.custom_op("diffq::w8a8_linear", mutates_args=())
def w8a8_linear(x: Tensor, qweight: Tensor, w_scale: Tensor, bias: Tensor | None,
                x_scale: float, packed: Tensor | None = None) -> Tensor:
    """y = dq(q(x)) @ dq(W)^T + b; x [..., K], qweight int8 [N, K], w_scale [N]."""
    return _linear_reference(x, qweight, w_scale, bias, x_scale)


@w8a8_linear.register_kernel("cpu")
def _w8a8_linear_cpu(x, qweight, w_scale, bias, x_scale, packed=None):
    if packed is None:
        return _linear_reference(x, qweight, w_scale, bias, x_scale)
    return onednn.linear_packed(x, packed, w_scale, bias, x_scale)


@w8a8_linear.register_fake
def _w8a8_linear_fake(x, qweight, w_scale, bias, x_scale, packed=None):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@torch.library.custom_op("diffq::w8a8_conv2d", mutates_args=())
def w8a8_conv2d(x: Tensor, qweight: Tensor, w_scale: Tensor, bias: Tensor | None,
                x_scales: list[float], segments: list[int], stride: list[int],
                padding: list[int], dilation: list[int], groups: int,
                packed: list[Tensor]) -> Tensor:
    """2-D convolution of dq(q(x)) [N, C, H, W] with dq(W) [O, C/groups, kh, kw];
    `packed`: oneDNN packs per segment, or [] for the reference computation."""
    return _conv2d_reference(x, qweight, w_scale, bias, x_scales, segments, stride, padding,
                             dilation, groups)


@w8a8_conv2d.register_kernel("cpu")
def _w8a8_conv2d_cpu(x, qweight, w_scale, bias, x_scales, segments, stride, padding, dilation,
                     groups, packed):
    if not packed:
        return _conv2d_reference(x, qweight, w_scale, bias, x_scales, segments, stride, padding,
                                 dilation, groups)
    return onednn.conv2d_packed(x, packed, w_scale, bias, x_scales, segments, stride, padding,
                                dilation, groups)


@w8a8_conv2d.register_fake
def _w8a8_conv2d_fake(x, qweight, w_scale, bias, x_scales, segments, stride, padding, dilation,
                      groups, packed):
    return F.conv2d(x, qweight.to(x.dtype), None, stride, padding, dilation, groups)
