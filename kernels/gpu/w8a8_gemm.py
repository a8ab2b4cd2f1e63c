"""W8A8 GEMM: int8 activation codes x int8 weight codes -> int32 on tensor cores (`tl.dot`),
with the dequantization fused into the epilogue:

    y[m, n] = act(acc[m, n] * x_scale[m or 0] * w_scale[n] + bias[n])   in fp16 / bf16 / fp32

The int32 accumulation is exact, so the result equals the float reference up to fp32 rounding
of the epilogue. x_scale is one value (static per-tensor) or one per row (dynamic per-token).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from diffq.kernels import act_quant, interpreting

ACTIVATIONS = ("none", "silu", "gelu")


@triton.jit
def activate(y, ACTIVATION: tl.constexpr):
    """The fused activation: "none", "silu" or "gelu" (exact, erf form as nn.GELU())."""
    if ACTIVATION == "silu":
        y = y * tl.sigmoid(y)
    elif ACTIVATION == "gelu":
        y = 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))
    return y


@triton.jit
def scale_bias_activate(y, ws_ptr, bias_ptr, rn, N, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr):
    """Epilogue shared with the conv: y [BM, BN] fp32 (x scale applied) * w_scale[n] + bias[n]."""
    n_ok = rn < N
    y = y * tl.load(ws_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    return activate(y, ACTIVATION)


@triton.jit
def _w8a8_gemm_kernel(
    a_ptr, b_ptr, c_ptr, xs_ptr, ws_ptr, bias_ptr, M, N, K,
    sam, sak, sbn, sbk, scm, scn,
    XS_PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped launch order: GROUP_M row blocks in a row stream the same weight columns (L2 reuse).
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    rows_in_group = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows_in_group
    pid_n = (pid % width) // rows_in_group

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * sam + rk[None, :] * sak
    b_ptrs = b_ptr + rn.to(tl.int64)[None, :] * sbn + rk[:, None] * sbk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & k_ok[None, :], other=0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & (rn[None, :] < N), other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * sak
        b_ptrs += BLOCK_K * sbk

    if XS_PER_ROW:
        xs = tl.load(xs_ptr + rm, mask=rm < M, other=0.0)[:, None]
    else:
        xs = tl.load(xs_ptr)
    y = scale_bias_activate(acc.to(tl.float32) * xs, ws_ptr, bias_ptr, rn, N, HAS_BIAS, ACTIVATION)
    c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * scm + rn[None, :] * scn
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def _config(m: int) -> dict:
    """Block sizes by row count: a skinny tile for decode-like M, the large int8 tile
    (128 x 256 x 128, as inductor uses for int_mm) for diffusion-sized M."""
    if interpreting():
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    if m <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_M=1, num_warps=4, num_stages=4)
    if m <= 128:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)


def w8a8_matmul(
    qx: torch.Tensor, qweight: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None = None, activation: str = "none",
    out_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """int8 qx [M, K] @ int8 qweight [N, K]^T -> out_dtype [M, N] with the fused epilogue.
    x_scale: fp32 [1] (per tensor) or [M] (per token); w_scale: [N]; bias: [N] or None."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {ACTIVATIONS}")
    m, k = qx.shape
    n = qweight.shape[0]
    if qweight.shape[1] != k:
        raise ValueError(f"qx has K={k} but qweight is {tuple(qweight.shape)}")
    xs = x_scale.reshape(-1).float()
    if xs.numel() not in (1, m):
        raise ValueError(f"x_scale has {xs.numel()} values for {m} rows")
    ws = w_scale.reshape(-1).float().contiguous()
    y = torch.empty((m, n), dtype=out_dtype, device=qx.device)
    cfg = _config(m)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _w8a8_gemm_kernel[grid](
        qx, qweight, y, xs, ws, ws if bias is None else bias, m, n, k,
        *qx.stride(), *qweight.stride(), *y.stride(),
        XS_PER_ROW=xs.numel() != 1, HAS_BIAS=bias is not None,
        ACTIVATION=activation, **cfg)
    return y


def w8a8_linear(
    x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
    x_scale: torch.Tensor | float | None, activation: str = "none",
) -> torch.Tensor:
    """x [..., K] float -> int8 (static `x_scale`, or dynamic per token when None) -> W8A8 GEMM
    -> [..., N] in x's dtype."""
    k = x.shape[-1]
    if x_scale is None:
        qx, xs = act_quant.quantize_dynamic(x)
    else:
        xs = x_scale if isinstance(x_scale, torch.Tensor) else torch.full((1,), x_scale, device=x.device)
        qx = act_quant.quantize_static(x, xs)
    y = w8a8_matmul(qx.reshape(-1, k), qweight, xs, w_scale, bias, activation, x.dtype)
    return y.reshape(*x.shape[:-1], qweight.shape[0])
