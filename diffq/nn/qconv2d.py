"""Quantized nn.Conv2d (any stride, padding, dilation and groups)."""
from __future__ import annotations

import torch
from torch import nn

from diffq import ops
from diffq.core.recipe import ActivationSpec, WeightSpec
from diffq.core.weights import QuantizedWeight
from diffq.nn.base import QuantizedLayer


class QConv2d(QuantizedLayer, nn.Conv2d):
    """Conv2d with real low-bit weight storage; forward dispatches to `diffq.ops.conv2d`. An
    `nn.Conv2d` to libraries that wrap convolutions (PEFT's LoRA), with no float weight (see
    QLinear)."""

    feature_axis = 1

    def __new__(cls, *args, **kwargs):
        # Called with nn.Conv2d's own arguments (PEFT builds a LoRA adapter's convolutions as
        # type(base_layer)(in_channels, rank, kernel_size, ...)): a plain float nn.Conv2d.
        if (args and not isinstance(args[0], nn.Conv2d)) or "in_channels" in kwargs:
            return nn.Conv2d(*args, **kwargs)
        return super().__new__(cls)

    def __init__(self, conv: nn.Conv2d, weights: WeightSpec, activations: ActivationSpec | None,
                 segments: list[int] | None = None, empty: bool = False,
                 qweight: QuantizedWeight | None = None, input_scale: torch.Tensor | None = None):
        nn.Module.__init__(self)  # not nn.Conv2d's: it would allocate a float weight
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode {conv.padding_mode!r} is not supported")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.padding_mode, self.transposed, self.output_padding = "zeros", False, (0, 0)
        qw = self._quantize_or_shape(conv.weight, weights, empty, qweight)
        self._init_quantized(weights, qw, conv.bias, activations, segments or [conv.in_channels],
                             input_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.scale_input(x)
        y = ops.conv2d(x, self._kernel_weight(x), self.bias, self.act_params(), self.stride, self.padding,
                       self.dilation, self.groups, self.kernel_cache, self.backend)
        self._after_call(x)
        return y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, groups={self.groups}, weights={self.weight_spec.format}")
