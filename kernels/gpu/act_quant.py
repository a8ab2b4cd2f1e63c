"""Symmetric int8 activation quantization: q = clamp(round(x / s), -128, 127), round half to even
as torch.round does, with the division done exactly (`div_rn`) so that the codes match the
pure-torch reference bit for bit.

- static: s is per channel segment, read from a timestep-group table row on the device, so a
  layer that consumes cat(h, skip) quantizes each part with its own scale;
- dynamic: s = amax(|x_row|) / 127 per token (1 for an all-zero row), as `choose_qparams`.

Inputs are [..., C] (channels last) with any strides; codes come out contiguous.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from diffq.kernels import interpreting


@triton.jit
def round_to_int8(y):
    """fp32 -> int8, saturating, round half to even like torch.round: after clamping,
    |y| < 2^22, where adding and removing 1.5 * 2^23 leaves the nearest even-tied integer."""
    y = tl.minimum(tl.maximum(y, -128.0), 127.0)
    return ((y + 12582912.0) - 12582912.0).to(tl.int8)


@triton.jit
def _quant_static_kernel(
    x_ptr, q_ptr, scale_ptr, starts_ptr, R, C, S, sxb, sxr, sxc,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_r, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    # Segment of each channel: how many segment starts (after the first) lie at or below it.
    seg = tl.zeros([BLOCK_C], dtype=tl.int32)
    for i in range(1, S):
        seg += (cols >= tl.load(starts_ptr + i)).to(tl.int32)
    scale = tl.load(scale_ptr + seg, mask=cols < C, other=1.0).to(tl.float32)
    base = b.to(tl.int64) * sxb
    x = tl.load(x_ptr + base + rows.to(tl.int64)[:, None] * sxr + cols[None, :] * sxc, mask=mask,
                other=0.0)
    q = round_to_int8(tl.math.div_rn(x.to(tl.float32), scale[None, :]))
    out = (b.to(tl.int64) * R + rows[:, None]) * C + cols[None, :]
    tl.store(q_ptr + out, q, mask=mask)


@triton.jit
def _quant_dynamic_kernel(
    x_ptr, q_ptr, s_ptr, M, C, sxm, sxc, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * sxm
    amax = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        x = tl.load(x_rows + cols[None, :] * sxc, mask=row_ok[:, None] & (cols[None, :] < C), other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
    scale = tl.math.div_rn(amax, 127.0)
    scale = tl.where(scale > 0, scale, 1.0)
    tl.store(s_ptr + rows, scale, mask=row_ok)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (cols[None, :] < C)
        x = tl.load(x_rows + cols[None, :] * sxc, mask=mask, other=0.0)
        q = round_to_int8(tl.math.div_rn(x.to(tl.float32), scale[:, None]))
        tl.store(q_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], q, mask=mask)


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    """[..., C] -> [B, R, C] without a copy where the strides allow (NCHW.permute(0, 2, 3, 1)
    and channels-last both merge H and W)."""
    if x.dim() == 1:
        return x[None, None]
    if x.dim() == 2:
        return x[None]
    return x.flatten(1, -2) if x.dim() > 3 else x


def quantize_static(
    x: torch.Tensor, scale: torch.Tensor, segments: Sequence[int] | None = None, group: int = 0,
) -> torch.Tensor:
    """x [..., C] float -> int8 codes [..., C] (contiguous). `scale`: fp32 [S] per channel
    segment, or a timestep-group table [K, S] read at row `group`; `segments`: the S channel
    counts (default: one segment of C)."""
    c = x.shape[-1]
    segments = [c] if segments is None else list(segments)
    if sum(segments) != c:
        raise ValueError(f"segments {segments} do not add up to the {c} channels")
    row = (scale[group] if scale.dim() == 2 else scale.reshape(-1)).float()
    if row.numel() != len(segments):
        raise ValueError(f"{row.numel()} scales for {len(segments)} channel segments")
    starts = row  # unused when there is one segment
    if len(segments) > 1:
        bounds = [sum(segments[:i]) for i in range(len(segments))]
        starts = torch.tensor(bounds, dtype=torch.int32, device=x.device)
    x3 = _as_3d(x)
    q = torch.empty(x3.shape, dtype=torch.int8, device=x.device)
    block_r, block_c = (32, 32) if interpreting() else (64, 64)
    grid = (triton.cdiv(x3.shape[1], block_r), triton.cdiv(c, block_c), x3.shape[0])
    _quant_static_kernel[grid](x3, q, row, starts, x3.shape[1], c, len(segments), *x3.stride(),
                               BLOCK_R=block_r, BLOCK_C=block_c)
    return q.reshape(x.shape)


def quantize_dynamic(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., C] float -> (int8 codes [..., C], fp32 per-token scales [..., 1])."""
    c = x.shape[-1]
    x2 = x.reshape(-1, c)
    m = x2.shape[0]
    q = torch.empty((m, c), dtype=torch.int8, device=x.device)
    s = torch.empty((m,), dtype=torch.float32, device=x.device)
    block_m, block_c = (16, 32) if interpreting() else (8, min(1024, triton.next_power_of_2(c)))
    _quant_dynamic_kernel[(triton.cdiv(m, block_m),)](x2, q, s, m, c, *x2.stride(),
                                                      BLOCK_M=block_m, BLOCK_C=block_c)
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], 1)
