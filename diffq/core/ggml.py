"""GGUF `q8_0`: blocks of 32 int8 values with one fp16 scale, the baseline llama.cpp format.

Matches ggml's reference quantizer (`quantize_row_q8_0_ref`): d = amax / 127 in fp32, codes
roundf(x / d) (half away from zero), d stored as fp16; one block is 34 bytes: d then 32 codes.
"""
from __future__ import annotations

import torch

from diffq.core.formats import get_format
from diffq.core.granularity import PerGroup
from diffq.core.storage import Layout, StorageFormat, register_format
from diffq.errors import RecipeError

QK8_0 = 32
BLOCK_BYTES = 2 + QK8_0


def quantize_q8_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] with K % 32 == 0 -> (codes int8 [..., K/32, 32], d fp16 [..., K/32, 1])."""
    if x.shape[-1] % QK8_0:
        raise ValueError(f"q8_0 needs the last dimension to be a multiple of 32, got {x.shape[-1]}")
    xb = x.float().reshape(*x.shape[:-1], x.shape[-1] // QK8_0, QK8_0)
    d = xb.abs().amax(dim=-1, keepdim=True) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    v = xb * inv
    codes = (torch.sign(v) * torch.floor(v.abs() + 0.5)).to(torch.int8)
    return codes, d.to(torch.float16)


def dequantize_q8_0(codes: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Blocks back to float32 [..., K]."""
    x = codes.float() * d.float()
    return x.reshape(*codes.shape[:-2], -1)


def to_gguf_bytes(codes: torch.Tensor, d: torch.Tensor) -> bytes:
    """Serialize blocks in GGUF's on-disk order: per block, little-endian fp16 d, then 32 int8."""
    d_bytes = d.reshape(-1, 1).contiguous().view(torch.uint8).reshape(-1, 2)
    q_bytes = codes.reshape(-1, QK8_0).contiguous().view(torch.uint8)
    return torch.cat((d_bytes, q_bytes), dim=1).numpy().tobytes()


def from_gguf_bytes(buf: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `to_gguf_bytes`: -> (codes int8 [nb, 32], d fp16 [nb, 1])."""
    if len(buf) % BLOCK_BYTES:
        raise ValueError(f"q8_0 data must be a multiple of {BLOCK_BYTES} bytes, got {len(buf)}")
    raw = torch.frombuffer(bytearray(buf), dtype=torch.uint8).reshape(-1, BLOCK_BYTES)
    d = raw[:, :2].contiguous().view(torch.float16)
    codes = raw[:, 2:].contiguous().view(torch.int8)
    return codes, d


class Q8_0(StorageFormat):
    """q8_0 as a diffq storage format: int8 codes, per-group 32, symmetric, fp16 scales,
    rounded as ggml rounds (with the fp32 d, half away from zero), so the codes equal GGUF's."""

    def check(self, spec) -> None:
        if spec.granularity != "per_group" or spec.group_size != QK8_0 or not spec.symmetric:
            raise RecipeError("weights.format 'q8_0' is per_group with group_size 32, symmetric")
        if spec.clip != "none":
            raise RecipeError("weights.format 'q8_0' rounds as ggml does: weights.clip must be 'none'")

    def layout(self, spec) -> Layout:
        return Layout(self.name, PerGroup(QK8_0), torch.float16, True)

    def round(self, w, layout, clip="none"):
        codes, d = quantize_q8_0(w)
        return codes.reshape(w.shape), d, None


register_format(Q8_0("q8_0", get_format("int8")))
