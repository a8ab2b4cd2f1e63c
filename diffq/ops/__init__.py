"""The one dispatch point for quantized compute. Quantized modules call only `linear` and
`conv2d` here; each picks the fastest backend that accepts the call and falls back to the
pure-torch reference, which dequantizes and runs the float op."""
from __future__ import annotations

import torch

from diffq.core.weights import QuantizedWeight
from diffq.ops import onednn, reference
from diffq.ops.types import ActQuant

BACKENDS = ("auto", "reference")

__all__ = ["ActQuant", "linear", "conv2d", "quantize_activation"]

quantize_activation = reference.quantize_activation


def linear(
    x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None, act: ActQuant | None,
    cache: dict | None = None, backend: str = "auto",
) -> torch.Tensor:
    """y = x @ W^T + b with W quantized and, when `act` is given, x quantized. x: [..., K].
    `cache` is the calling module's store for prepacked weights."""
    if backend == "auto" and cache is not None and onednn.accepts(x, weight, act):
        return onednn.linear(x, weight, bias, act, cache)
    return reference.linear(x, weight, bias, act)


def conv2d(
    x: torch.Tensor,
    weight: QuantizedWeight,
    bias: torch.Tensor | None,
    act: ActQuant | None,
    stride: tuple[int, int],
    padding: tuple[int, int] | str,
    dilation: tuple[int, int],
    groups: int,
    cache: dict | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """2-D convolution of x [N, C, H, W] with a quantized weight [O, C/groups, kh, kw]."""
    if backend == "auto" and cache is not None and onednn.accepts_conv(x, weight, act, padding, groups):
        return onednn.conv2d(x, weight, bias, act, stride, padding, dilation, groups, cache)
    return reference.conv2d(x, weight, bias, act, stride, padding, dilation, groups)
