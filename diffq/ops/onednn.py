"""x86 CPU fast path: W8A8 linear and conv2d through oneDNN int8 kernels (VNNI/AMX).

Weights are prepacked once per module (the cache lives on the module). Activations use the
static, time-step-aware per-tensor scale of the current call; oneDNN takes uint8 inputs for
and linear (VNNI multiplies u8 x s8), so symmetric int8 codes q become q + 128 with zero
point 128: the same grid as the reference path. Layers with skip-split scales run one convolution per channel segment.
"""
from __future__ import annotations

import torch

from diffq.core.granularity import PerChannel, PerTensor
from diffq.core.weights import QuantizedWeight
from diffq.ops.types import ActQuant

_U8_ZP = 128


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv2d_pointwise")


def accepts(x: torch.Tensor, weight: QuantizedWeight, act: ActQuant | None) -> bool:
    """Static symmetric int8 activations, symmetric int8 per-channel/per-tensor weights, CPU."""
    return (
        x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
        and act is not None and not act.dynamic and act.fmt.name == "int8"
        and act.zero_point is None and weight.spec.format == "int8"
        and weight.zero_point is None
        and isinstance(weight.spec.granularity_obj(), (PerChannel, PerTensor))
        and available()
    )


def accepts_conv(x, weight: QuantizedWeight, act: ActQuant | None, padding, groups: int) -> bool:
    split = act is not None and act.segments is not None and len(act.segments) > 1
    return (accepts(x, weight, act) and not isinstance(padding, str)
            and (groups == 1 or not split))


def _channel_scales(weight: QuantizedWeight) -> torch.Tensor:
    return weight.scale.float().reshape(-1).expand(weight.shape[0]).contiguous()


def _segments(act: ActQuant, channels: int) -> list[tuple[int, int, float]]:
    """(start, stop, scale) per channel segment of the input."""
    scale = act.scale.reshape(-1)
    if scale.numel() == 1:
        return [(0, channels, float(scale))]
    out, start = [], 0
    for size in act.segments:
        out.append((start, start + size, float(scale[start])))
        start += size
    return out


def _cached(cache: dict, key, make):
    value = cache.get(key)
    if value is None:
        value = cache[key] = make()
    return value


def _quantize_u8(x: torch.Tensor, scale: float) -> torch.Tensor:
    q = torch.round(x.float() / scale).add_(_U8_ZP).clamp_(0, 255)
    return q.to(torch.uint8)


def linear(x, weight: QuantizedWeight, bias, act: ActQuant, cache: dict) -> torch.Tensor:
    ((_, _, xs),) = _segments(act, x.shape[-1])
    w_scale = _cached(cache, "w_scale", lambda: _channel_scales(weight))
    packed = _cached(cache, ("linear", weight.data.data_ptr()),
                     lambda: torch.ops.onednn.qlinear_prepack(weight.data, None))
    # uint8 inputs: VNNI multiplies u8 x s8; int8 inputs take a reference path ~1000x slower
    qx = _quantize_u8(x, xs)
    zeros = _cached(cache, "w_zp", lambda: torch.zeros(weight.shape[0], dtype=torch.int32))
    b = None if bias is None else bias.float()
    return torch.ops.onednn.qlinear_pointwise(qx, xs, _U8_ZP, packed, w_scale, zeros, b, 1.0, 0,
                                              x.dtype, "none", [], "")


def conv2d(x, weight: QuantizedWeight, bias, act: ActQuant, stride, padding, dilation,
           groups: int, cache: dict) -> torch.Tensor:
    segs = _segments(act, x.shape[1])
    w = weight.data.reshape(weight.shape)
    w_scale = _cached(cache, "w_scale", lambda: _channel_scales(weight))
    zeros = _cached(cache, "w_zp", lambda: torch.zeros(weight.shape[0], dtype=torch.int32))
    pad = list(padding) if not isinstance(padding, str) else None
    out = None
    for i, (start, stop, xs) in enumerate(segs):
        part = x if len(segs) == 1 else x[:, start:stop]
        qx = _quantize_u8(part, xs).contiguous(memory_format=torch.channels_last)
        packed = _cached(cache, ("conv", i, weight.data.data_ptr()), lambda: torch.ops.onednn.qconv_prepack(
            (w if len(segs) == 1 else w[:, start:stop]).contiguous(), w_scale, xs, _U8_ZP,
            list(stride), pad, list(dilation), groups, None))
        b = None if (bias is None or i > 0) else bias.float()
        y = torch.ops.onednn.qconv2d_pointwise(qx, xs, _U8_ZP, packed, w_scale, zeros, b,
                                               list(stride), pad, list(dilation), groups, 1.0, 0,
                                               x.dtype, "none", [], None)
        out = y if out is None else out.add_(y)
    return out
