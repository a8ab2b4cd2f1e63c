"""Int8 key/value cache maths: symmetric int8 codes with one scale per (batch, head, token),
taken over the head dimension. Per-token scales make the cache append-only: a new token never
changes the codes of the old ones."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from diffq.core.formats import get_format
from diffq.core.granularity import PerTensor, PerToken
from diffq.core.quant import QParams, choose_qparams, quantize
from diffq.core.storage import SCALE_DTYPES

_INT8 = get_format("int8")


@dataclass
class Int8KV:
    """codes int8 [B, H, T, D] and scale [B, H, T, 1] (scale_dtype)."""

    codes: torch.Tensor
    scale: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes


def quantize_kv(x: torch.Tensor, scale_dtype: str = "float32") -> Int8KV:
    """x [B, H, T, D] -> int8 codes with per-(b, h, t) scales max|x| / 127 (1 for all-zero rows),
    rounded with the scale as stored."""
    qp = choose_qparams(x, _INT8, PerToken(-1))
    scale = qp.scale.to(SCALE_DTYPES[scale_dtype])
    return Int8KV(quantize(x, QParams(scale.float()), _INT8, PerTensor()), scale)


def dequantize_kv(q: Int8KV, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Int8KV -> float [B, H, T, D] in `dtype`."""
    return (q.codes.float() * q.scale.float()).to(dtype)


def cat_kv(a: Int8KV | None, b: Int8KV) -> Int8KV:
    """Append b after a along the token axis."""
    if a is None:
        return b
    return Int8KV(torch.cat((a.codes, b.codes), -2), torch.cat((a.scale, b.scale), -2))
