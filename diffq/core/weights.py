"""Quantized weights: real low-bit storage for a [out, in * kh * kw] weight matrix."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from diffq.core.quant import QParams, dequantize
from diffq.core.recipe import WeightSpec
from diffq.core.storage import Layout
from diffq.errors import QuantizedWeightError


def released_codes(shape: tuple[int, ...]) -> torch.Tensor:
    """What a layer keeps of int8 codes it dropped once a kernel holds them packed: their shape
    and dtype over one byte of storage (their values come back from the pack when asked for)."""
    return torch.zeros((), dtype=torch.int8).expand(shape)


def is_released(t: torch.Tensor) -> bool:
    """Whether `t` is a `released_codes` stand-in or a view of one (every dimension longer than
    one has stride 0: no stored tensor of more than one element has that)."""
    return t.numel() > 1 and all(st == 0 for n, st in zip(t.shape, t.stride(), strict=True) if n > 1)


def check_held(t: torch.Tensor) -> torch.Tensor:
    """`t`, refused in one line if it is a stand-in for released codes: reading it would compute
    with zeros where the codes were."""
    if is_released(t):
        raise QuantizedWeightError(
            "a diffq layer's int8 codes were released once its kernel packed them, and this call "
            "needs them: restore them first (diffq.nn.restore_codes(model))")
    return t


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
        return self.layout.storage.blocked(check_held(self.data), self.layout)

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


__all__ = ["QuantizedWeight", "quantize_weight", "released_codes", "is_released", "check_held"]
