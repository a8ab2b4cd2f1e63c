"""W4A16: fp16/bf16 activations x int4 group-wise weights, dequantized in the kernel from
exactly diffq's storage (`QuantizedWeight` with `PerGroup`):

- codes: uint8 [N, K/2], element 2i in the low nibble, 2i+1 in the high one, stored + 8
  (`core.pack.pack_int4`);
- scale: [N, K/g(, 1)] in fp32/fp16/bf16; zero point: int8 [N, K/g(, 1)] or None (symmetric);
- w[n, k] = (code - 8 - zero_point[n, k // g]) * scale[n, k // g].

GEMM (tensor cores): the K step is one group, so (code - zero point) are small integers, exact in
fp16/bf16, go through `tl.dot` and the group's scale multiplies the fp32 partial product.
GEMV (a few rows, LLM decode): no tensor cores, the weight stream is the cost; each step
dequantizes a [BLOCK_K, BLOCK_N] tile and reduces it against the activation row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from diffq.kernels import interpreting

GEMV_MAX_ROWS = 4  # below this, tensor-core tiles (16 rows minimum) would idle


@triton.jit
def _int4_tile(w_ptr, z_ptr, rk, rn, n_ok, K, GROUP: tl.constexpr, HAS_ZP: tl.constexpr):
    """int32 (code - zero point) tile [len(rk), len(rn)] for reduction indices rk."""
    packed = tl.load(w_ptr + rn.to(tl.int64)[None, :] * (K // 2) + (rk // 2)[:, None],
                     mask=(rk < K)[:, None] & n_ok[None, :], other=0x88)
    q = ((packed.to(tl.int32) >> ((rk % 2) * 4)[:, None]) & 0xF) - 8
    if HAS_ZP:
        zp = tl.load(z_ptr + rn[None, :] * (K // GROUP) + (rk // GROUP)[:, None],
                     mask=(rk < K)[:, None] & n_ok[None, :], other=0)
        q -= zp.to(tl.int32)
    return q


@triton.jit
def _w4a16_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, y_ptr, M, N, K, sxm, sxk, sym, syn,
    GROUP: tl.constexpr, HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, GROUP)
    m_ok, n_ok = rm < M, rn < N
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * sxm + rk[None, :] * sxk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, K // GROUP):
        x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
        q = _int4_tile(w_ptr, z_ptr, g * GROUP + rk, rn, n_ok, K, GROUP, HAS_ZP)
        scale = tl.load(s_ptr + rn * (K // GROUP) + g, mask=n_ok, other=0.0).to(tl.float32)
        acc += tl.dot(x, q.to(x.dtype)) * scale[None, :]
        x_ptrs += GROUP * sxk
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * sym + rn[None, :] * syn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, y_ptr, N, K, sxm, sxk, sym, syn,
    GROUP: tl.constexpr, HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row = tl.program_id(1).to(tl.int64)
    n_ok = rn < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * sxm + rk * sxk, mask=rk < K, other=0.0).to(tl.float32)
        q = _int4_tile(w_ptr, z_ptr, rk, rn, n_ok, K, GROUP, HAS_ZP)
        scale = tl.load(s_ptr + rn[None, :] * (K // GROUP) + (rk // GROUP)[:, None],
                        mask=(rk < K)[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(x[:, None] * (q.to(tl.float32) * scale), axis=0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * sym + rn * syn, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


def _gemm_config(m: int) -> dict:
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1)
    if m <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=4)
    if m <= 64:
        return dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)


def _gemv_config(group: int) -> dict:
    if interpreting():
        return dict(BLOCK_N=32, BLOCK_K=max(group, 64), num_warps=4, num_stages=1)
    # Narrow column blocks give the 132 SMs of an H100 enough programs at N = 4096.
    return dict(BLOCK_N=32, BLOCK_K=max(group, 256), num_warps=4, num_stages=3)


def w4a16_matmul(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
    bias: torch.Tensor | None, group_size: int,
) -> torch.Tensor:
    """x [..., K] fp16/bf16 @ W^T -> [..., N] in x's dtype, W the int4 weight [N, K] stored as
    `packed` uint8 [N, K/2] with per-group `scale` / `zero_point` [N, K/g(, 1)]."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"w4a16 takes fp16 or bf16 activations, got {x.dtype}")
    k = x.shape[-1]
    n = packed.shape[0]
    if packed.shape[1] * 2 != k or k % group_size or group_size % 16:
        raise ValueError(f"x has K={k}, codes are {tuple(packed.shape)}, group size {group_size}: "
                         "need K = 2 * codes.shape[1], K % group == 0 and group % 16 == 0")
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    s = scale.reshape(n, k // group_size).contiguous()
    z = None if zero_point is None else zero_point.reshape(n, k // group_size).contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    w = packed.contiguous()
    args = (x2, w, s, s if z is None else z, s if bias is None else bias, y)
    flags = dict(GROUP=group_size, HAS_ZP=z is not None, HAS_BIAS=bias is not None)
    if m <= GEMV_MAX_ROWS:
        cfg = _gemv_config(group_size)
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), m)
        _w4a16_gemv_kernel[grid](*args, n, k, *x2.stride(), *y.stride(), **flags, **cfg)
    else:
        cfg = _gemm_config(m)
        grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
        _w4a16_gemm_kernel[grid](*args, m, n, k, *x2.stride(), *y.stride(), **flags, **cfg)
    return y.reshape(*x.shape[:-1], n)
