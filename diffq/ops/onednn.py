"""x86 CPU kernels: W8A8 linear and conv2d through oneDNN int8 (VNNI/AMX).

Weights are prepacked once (callers cache the packs). oneDNN multiplies u8 x s8, so the
symmetric int8 activation codes q become q + 128 with zero point 128: the same grid as the
reference path. A conv whose input has per-segment scales (cat(h, skip)) runs as one
convolution per channel segment, summed.
"""
from __future__ import annotations

import torch
from torch import Tensor

_U8_ZP = 128


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv2d_pointwise")


def can_pack_conv(padding, groups: int, segments: list[int]) -> bool:
    return available() and not isinstance(padding, str) and (groups == 1 or len(segments) == 1)


def pack_linear(qweight: Tensor) -> Tensor:
    return torch.ops.onednn.qlinear_prepack(qweight, None)


def pack_conv(qweight: Tensor, w_scale: Tensor, x_scales: list[float], segments: list[int],
              stride, padding, dilation, groups: int) -> list[Tensor]:
    """One pack per input channel segment (weight columns of that segment)."""
    packs, start = [], 0
    for size, xs in zip(segments, x_scales, strict=True):
        w = qweight if len(segments) == 1 else qweight[:, start:start + size]
        packs.append(torch.ops.onednn.qconv_prepack(w.contiguous(), w_scale, xs, _U8_ZP,
                                                    list(stride), list(padding), list(dilation),
                                                    groups, None))
        start += size
    return packs


def _quantize_u8(x: Tensor, scale: float) -> Tensor:
    return torch.round(x.float() / scale).add_(_U8_ZP).clamp_(0, 255).to(torch.uint8)


def _zeros(n: int) -> Tensor:
    return torch.zeros(n, dtype=torch.int32)


def linear_packed(x: Tensor, packed: Tensor, w_scale: Tensor, bias, x_scale: float) -> Tensor:
    b = None if bias is None else bias.float()
    return torch.ops.onednn.qlinear_pointwise(
        _quantize_u8(x, x_scale), x_scale, _U8_ZP, packed, w_scale.float(), _zeros(len(w_scale)),
        b, 1.0, 0, x.dtype, "none", [], "")


def conv2d_packed(x: Tensor, packs: list[Tensor], w_scale: Tensor, bias, x_scales: list[float],
                  segments: list[int], stride, padding, dilation, groups: int) -> Tensor:
    out, start = None, 0
    for i, (size, xs) in enumerate(zip(segments, x_scales, strict=True)):
        part = x if len(segments) == 1 else x[:, start:start + size]
        qx = _quantize_u8(part, xs).contiguous(memory_format=torch.channels_last)
        b = None if (bias is None or i > 0) else bias.float()
        y = torch.ops.onednn.qconv2d_pointwise(
            qx, xs, _U8_ZP, packs[i], w_scale.float(), _zeros(len(w_scale)), b, list(stride),
            list(padding), list(dilation), groups, 1.0, 0, x.dtype, "none", [], None)
        out = y if out is None else out.add_(y)
        start += size
    return out
