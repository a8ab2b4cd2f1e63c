"""Quantized weights: real low-bit storage for a [out, in * kh * kw] weight matrix."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from diffq.core.quant import QParams, dequantize
from diffq.core.recipe import WeightSpec
from diffq.core.storage import Layout


@dataclass
class QuantizedWeight:
    """Stored codes plus scales, in `layout`. `data` is int8 [O, K], packed uint8 [O, K/2]
    (int4, nf4) or float8 [O, K]; `scale`/`zero_point` broadcast over the blocked
    [O, (K/g,) g|K] view. `shape` is the float weight's (e.g. [O, I/groups, kh, kw])."""

    data: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    layout: Layout
    shape: tuple[int, ...]

    @property
    def k(self) -> int:
        return int(torch.Size(self.shape[1:]).numel())

    def codes(self) -> torch.Tensor:
        """Unpacked codes in the blocked view."""
        return self.layout.storage.blocked(self.data, self.layout)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight in its original shape."""
        w = dequantize(self.codes(), QParams(self.scale, self.zero_point), self.layout.grid)
        return w.reshape(self.shape).to(dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of storage: codes, scales and zero points."""
        zp = 0 if self.zero_point is None else self.zero_point.nbytes
        return self.data.nbytes + self.scale.nbytes + zp

    @classmethod
    def empty(cls, layout: Layout, shape: tuple[int, ...]) -> QuantizedWeight:
        """Zero storage of the right shapes, to be filled by loading a state dict."""
        out, k = shape[0], int(torch.Size(shape[1:]).numel())
        return cls(*layout.empty(out, k), layout, tuple(shape))

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                   layout: Layout, shape: tuple[int, ...]) -> QuantizedWeight:
        """Unpacked codes [O, K] (and stored-dtype scales) -> storage, packed as the format packs."""
        return cls(*layout.storage.store(codes, scale, zero_point, layout), layout, tuple(shape))


def quantize_weight(weight: torch.Tensor, spec: WeightSpec | Layout, clip: str | None = None
                    ) -> QuantizedWeight:
    """Round-to-nearest of a Linear [O, K] or Conv2d [O, I, kh, kw] weight into `spec`'s layout
    (with the spec's clipping unless `clip` says otherwise)."""
    layout = spec if isinstance(spec, Layout) else spec.layout()
    clip = clip or ("none" if isinstance(spec, Layout) else spec.clip)
    shape = tuple(weight.shape)
    w2 = weight.detach().reshape(shape[0], -1).float()
    layout.check(*w2.shape)
    codes, scale, zp = layout.storage.round(w2, layout, clip)
    return QuantizedWeight.from_codes(codes, scale, zp, layout, shape)


__all__ = ["QuantizedWeight", "quantize_weight"]
