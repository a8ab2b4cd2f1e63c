"""Quantized nn.Linear."""
from __future__ import annotations

import torch
from torch import nn

from diffq import ops
from diffq.core.recipe import ActivationSpec, WeightSpec
from diffq.core.weights import QuantizedWeight
from diffq.nn.base import QuantizedLayer


class QLinear(QuantizedLayer, nn.Linear):
    """Linear layer with real low-bit weight storage; forward dispatches to `diffq.ops.linear`.

    An `nn.Linear` to the libraries that wrap Linear layers (PEFT's LoRA: the adapter runs as
    a float side branch on the layer's input while this layer keeps its int8 / int4 path), but
    with no float `weight`: it is a `FloatWeightStandIn` (shape, dtype, device; computing with it
    raises QuantizedWeightError, so merging an adapter into it, `fuse_lora`, is refused in one
    line)."""

    feature_axis = -1

    def __init__(self, linear: nn.Linear, weights: WeightSpec, activations: ActivationSpec | None,
                 segments: list[int] | None = None, empty: bool = False,
                 qweight: QuantizedWeight | None = None, input_scale: torch.Tensor | None = None):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a float weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        qw = self._quantize_or_shape(linear.weight, weights, empty, qweight)
        self._init_quantized(weights, qw, linear.bias, activations, segments or [linear.in_features],
                             input_scale)

    # an activation the module that owns this layer applies to its output, run by the kernel
    # instead (set at attach time by diffq.nn.fuse; "" for none)
    post = ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.scale_input(x)
        args = (self._kernel_weight(x), self.bias)
        prefix = self._float_prefix()
        if prefix and x.dim() == 3:  # leading tokens (BOS) with float activations
            head = ops.linear(x[:, :prefix], *args, None, self.kernel_cache, self.backend, self.post)
            tail = ops.linear(x[:, prefix:], *args, self.act_params(), self.kernel_cache, self.backend,
                              self.post)
            return torch.cat((head, tail), dim=1)
        y = ops.linear(x, *args, self.act_params(), self.kernel_cache, self.backend, self.post)
        self._after_call(x)
        return y

    def _float_prefix(self) -> int:
        """Leading tokens kept in float (see ActivationSpec.float_prefix)."""
        return 0 if self.input_quant is None else self.input_quant.spec.float_prefix

    def _releasable(self, x: torch.Tensor) -> bool:
        return super()._releasable(x) and not self._float_prefix()  # its float rows read the codes

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, weights={self.weight_spec.format}"
