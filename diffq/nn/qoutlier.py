"""LLM.int8()-style Linear: a few outlier input channels through a 16-bit matmul, the rest
through int8 weights with dynamic per-token int8 activations (Dettmers et al. 2022, eq. 3)."""
from __future__ import annotations

import torch
from torch import nn

from diffq import ops
from diffq.core.recipe import ActivationSpec, WeightSpec
from diffq.core.weights import QuantizedWeight, quantize_weight
from diffq.nn.base import QuantizedLayer


def outlier_slots(max_abs: torch.Tensor, threshold: float, slots: int) -> torch.Tensor:
    """Channel indices [slots] of the largest max |x| [K] that reach `threshold`, largest first;
    unused slots are -1. A fixed slot count keeps the stored shapes independent of the data."""
    order = torch.argsort(max_abs, descending=True, stable=True)[:slots]
    idx = torch.where(max_abs[order] >= threshold, order, torch.full_like(order, -1))
    return torch.cat((idx, torch.full((slots - idx.numel(),), -1, dtype=idx.dtype)))


class QLinearOutlier(QuantizedLayer):
    """int8 weights with the outlier columns zeroed, plus `outlier_weight` [O, slots] (float16)
    for the input channels in `outlier_index` [slots] (-1: unused slot, weight zero)."""

    feature_axis = -1

    def __init__(self, linear: nn.Linear, weights: WeightSpec, activations: ActivationSpec,
                 outliers: torch.Tensor | None = None, empty: bool = False,
                 qweight: QuantizedWeight | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        slots = min(activations.max_outliers, linear.in_features)
        idx = torch.full((slots,), -1, dtype=torch.long) if outliers is None else outliers.long()
        if idx.shape != (slots,):
            raise ValueError(f"outliers must have {slots} slots, got {tuple(idx.shape)}")
        w = linear.weight.detach().float()
        used = idx >= 0
        ow = torch.zeros(w.shape[0], slots)
        ow[:, used] = w[:, idx[used]]
        if qweight is None and not empty:
            # the int8 part must not see the outlier columns: they would set its scales
            qweight = quantize_weight(w.index_fill(1, idx[used], 0.0), weights)
        qw = self._quantize_or_shape(linear.weight, weights, empty, qweight)
        self._init_quantized(weights, qw, linear.bias, activations, [linear.in_features])
        self.register_buffer("outlier_index", idx.clone())
        self.register_buffer("outlier_weight", ow.half())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = self.outlier_index
        used = idx >= 0  # padding slots read channel 0 against a zero weight column
        cols = torch.where(used, idx, torch.zeros_like(idx))
        mask = torch.zeros(x.shape[-1], dtype=torch.bool, device=x.device)
        mask[cols[used]] = True
        rest = x.masked_fill(mask, 0)  # outliers would dominate the per-token int8 scale
        y = ops.linear(rest, self._kernel_weight(rest), self.bias, self.act_params(),
                       self.kernel_cache, self.backend)
        self._after_call(rest)
        side = x.index_select(-1, cols).float() @ self.outlier_weight.float().t()
        return y + side.to(y.dtype)

    @property
    def weight_nbytes(self) -> int:
        return super().weight_nbytes + self.outlier_weight.nbytes + self.outlier_index.nbytes

    def describe(self) -> dict:
        return {**super().describe(), "outlier_slots": int(self.outlier_index.numel())}

    def extra_repr(self) -> str:
        n = int((self.outlier_index >= 0).sum())
        return f"{self.in_features}, {self.out_features}, weights=int8, outliers={n}"
