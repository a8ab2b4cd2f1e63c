"""Pure-torch reference implementations: quantize the input for real, dequantize, run float."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from diffq.core.granularity import PerTensor, PerToken
from diffq.core.quant import QParams, choose_qparams, dequantize, quantize
from diffq.core.weights import QuantizedWeight
from diffq.ops.types import ActQuant


def _feature_shape(x: torch.Tensor, axis: int, v: torch.Tensor) -> torch.Tensor:
    if v.dim() == 0 or v.numel() == 1:
        return v.reshape(())
    shape = [1] * x.dim()
    shape[axis % x.dim()] = v.numel()
    return v.reshape(shape)


def quantize_activation(x: torch.Tensor, act: ActQuant) -> tuple[torch.Tensor, QParams]:
    """x -> (codes, qparams); codes int8 (or float8) in x's shape, qparams broadcastable."""
    if act.dynamic:
        qp = choose_qparams(x, act.fmt, PerToken(act.feature_axis))
    else:
        zp = None if act.zero_point is None else _feature_shape(x, act.feature_axis, act.zero_point)
        qp = QParams(_feature_shape(x, act.feature_axis, act.scale.float()), zp)
    return quantize(x, qp, act.fmt, PerTensor()), qp


def _dequant_input(x: torch.Tensor, act: ActQuant | None) -> torch.Tensor:
    if act is None:
        return x
    q, qp = quantize_activation(x, act)
    return dequantize(q, qp, act.fmt, x.dtype)


def linear(
    x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None, act: ActQuant | None
) -> torch.Tensor:
    w = weight.dequantize(x.dtype)
    return F.linear(_dequant_input(x, act), w, None if bias is None else bias.to(x.dtype))


def conv2d(x, weight, bias, act, stride, padding, dilation, groups) -> torch.Tensor:
    w = weight.dequantize(x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    return F.conv2d(_dequant_input(x, act), w, b, stride, padding, dilation, groups)
