"""Quantized weights: real low-bit storage for a [out, in * kh * kw] weight matrix."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from diffq.core import ggml
from diffq.core.clip import mse_clip_qparams
from diffq.core.formats import Format, get_format
from diffq.core.granularity import PerGroup
from diffq.core.pack import pack_int4, pack_nibbles, unpack_int4, unpack_nibbles
from diffq.core.quant import QParams, choose_qparams, dequantize, quantize
from diffq.core.recipe import WeightSpec

_SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def storage_format(spec: WeightSpec) -> Format:
    return get_format("int8" if spec.format == "q8_0" else spec.format)


@dataclass
class QuantizedWeight:
    """Stored codes plus scales. `data` is int8 [O, K], packed uint8 [O, K/2] (int4, nf4) or
    float8 [O, K]; `scale`/`zero_point` broadcast over the blocked [O, (K/g,) g|K] view."""

    data: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    spec: WeightSpec
    shape: tuple[int, ...]

    def codes(self) -> torch.Tensor:
        """Unpacked codes in the blocked view."""
        fmt = storage_format(self.spec)
        if fmt.name == "int4":
            q = unpack_int4(self.data)
        elif fmt.name == "nf4":
            q = unpack_nibbles(self.data)
        else:
            q = self.data
        g = self.spec.granularity_obj()
        if isinstance(g, PerGroup):
            q = q.reshape(q.shape[0], -1, g.group_size)
        return q

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight in its original shape (e.g. [O, I/groups, kh, kw] for a conv)."""
        w = dequantize(self.codes(), QParams(self.scale, self.zero_point), storage_format(self.spec))
        return w.reshape(self.shape).to(dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of storage: codes, scales and zero points."""
        zp = 0 if self.zero_point is None else self.zero_point.nbytes
        return self.data.nbytes + self.scale.nbytes + zp


def quantize_weight(weight: torch.Tensor, spec: WeightSpec) -> QuantizedWeight:
    """Quantize a Linear [O, K] or Conv2d [O, I, kh, kw] weight according to `spec`."""
    shape = tuple(weight.shape)
    w2 = weight.detach().reshape(shape[0], -1).float()
    g = spec.granularity_obj()
    if isinstance(g, PerGroup) and w2.shape[1] % g.group_size:
        raise ValueError(
            f"group size {g.group_size} does not divide the reduction dimension {w2.shape[1]}"
        )
    if spec.format == "q8_0":
        codes, d = ggml.quantize_q8_0(w2)
        return QuantizedWeight(codes.reshape(w2.shape), d, None, spec, shape)
    fmt = storage_format(spec)
    if spec.clip == "mse":
        qp = mse_clip_qparams(w2, fmt, g, spec.symmetric)
    else:
        qp = choose_qparams(w2, fmt, g, spec.symmetric)
    scale = qp.scale.to(_SCALE_DTYPES[spec.scale_dtype])
    # Quantize with the scale as stored, so dequantization reproduces exactly what was chosen.
    qp = QParams(scale.float(), qp.zero_point)
    q = quantize(w2, qp, fmt, g).reshape(w2.shape[0], -1)
    zp = None if qp.zero_point is None else qp.zero_point.to(torch.int8)
    return QuantizedWeight(pack_codes(q, fmt), scale, zp, spec, shape)


def pack_codes(codes: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Codes [O, K] as stored: two 4-bit codes per byte for int4 / nf4, unchanged otherwise."""
    if fmt.name == "int4":
        return pack_int4(codes)
    if fmt.name == "nf4":
        return pack_nibbles(codes)
    return codes
