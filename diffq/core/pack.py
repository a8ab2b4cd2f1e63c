"""Two 4-bit codes per byte: element 2i in the low nibble, element 2i+1 in the high nibble."""
from __future__ import annotations

import torch


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 15], shape [..., K] with K even -> uint8 [..., K // 2]."""
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd last dimension ({codes.shape[-1]})")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles`: uint8 [..., K // 2] -> uint8 codes [..., K]."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Signed int4 values in [-8, 7] (int8 tensor) -> packed uint8, stored with an offset of 8."""
    return pack_nibbles((q.to(torch.int16) + 8).to(torch.uint8))


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Packed uint8 -> signed int4 values as int8 in [-8, 7]."""
    # nibbles are 0..15, so the uint8 bytes read as int8 are the same values
    return unpack_nibbles(packed).view(torch.int8).sub_(8)
