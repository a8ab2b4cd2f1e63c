"""int8 NHWC implicit-GEMM convolution (PyTorch has no int8 convolution on GPU).

Output pixels are GEMM rows, output channels GEMM columns, and the reduction runs over
(kh, kw, input channel): each step loads a [pixels, channels] tile of the NHWC input at the
shifted position (zero where the padding is) and a [channels, out] tile of the [O, kh, kw, C]
weight. An input that is a skip concatenation has one activation scale per channel segment:
each segment accumulates exactly in its own int32 accumulator, scaled into the fp32 sum,
before the epilogue of the GEMM (* w_scale[o] + bias[o], activation) runs once.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from diffq.kernels import act_quant, interpreting
from diffq.kernels.w8a8_gemm import ACTIVATIONS, scale_bias_activate


@triton.jit
def _int8_conv_kernel(
    x_ptr, w_ptr, y_ptr, xs_ptr, bounds_ptr, ws_ptr, bias_ptr,
    H, W, C, OH, OW, OC, P, S,
    syn, syc, syh, syw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < P, rn < OC
    ow = rm % OW
    oh = (rm // OW) % OH
    nb = (rm // (OW * OH)).to(tl.int64)
    w_cols = w_ptr + rn.to(tl.int64)[None, :] * (KH * KW * C)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(S):
        c_lo = tl.load(bounds_ptr + s)
        c_hi = tl.load(bounds_ptr + s + 1)
        acc_s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for r in tl.static_range(KH * KW):
            ih = oh * stride_h - pad_h + (r // KW) * dil_h
            iw = ow * stride_w - pad_w + (r % KW) * dil_w
            inside = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_pix = x_ptr + ((nb * H + ih) * W + iw) * C
            for c0 in range(c_lo, c_hi, BLOCK_K):
                cs = c0 + rk
                c_ok = cs < c_hi
                a = tl.load(x_pix[:, None] + cs[None, :], mask=inside[:, None] & c_ok[None, :], other=0)
                b = tl.load(w_cols + r * C + cs[:, None], mask=c_ok[:, None] & n_ok[None, :], other=0)
                acc_s = tl.dot(a, b, acc_s, out_dtype=tl.int32)
        acc += acc_s.to(tl.float32) * tl.load(xs_ptr + s)

    y = scale_bias_activate(acc, ws_ptr, bias_ptr, rn, OC, HAS_BIAS, ACTIVATION)
    y_ptrs = (y_ptr + nb[:, None] * syn + rn[None, :] * syc + oh[:, None] * syh + ow[:, None] * syw)
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _config() -> dict:
    if interpreting():
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
    # 64 divides every SD UNet channel count (320, 640, 960, 1280, ...) and segment.
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


def int8_conv2d(
    qx: torch.Tensor, w_ohwi: torch.Tensor, x_scales: torch.Tensor, segments: Sequence[int],
    w_scale: torch.Tensor, bias: torch.Tensor | None,
    stride: Sequence[int] = (1, 1), padding: Sequence[int] = (0, 0),
    dilation: Sequence[int] = (1, 1), activation: str = "none",
    out_dtype: torch.dtype = torch.float16, channels_last: bool = True,
) -> torch.Tensor:
    """int8 NHWC codes qx [N, H, W, C] (contiguous) conv int8 w_ohwi [O, kh, kw, C] -> out_dtype
    [N, O, OH, OW] (channels-last memory unless `channels_last=False`). x_scales: fp32 [S], one
    per channel segment of sizes `segments`; w_scale: [O]; groups=1 only."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {ACTIVATIONS}")
    nb, h, w, c = qx.shape
    o, kh, kw, wc = w_ohwi.shape
    if wc != c or sum(segments) != c or x_scales.numel() != len(segments):
        raise ValueError(f"input channels {c}, weight {tuple(w_ohwi.shape)}, segments "
                         f"{list(segments)} and {x_scales.numel()} scales do not agree")
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    y = torch.empty((nb, o, oh, ow), dtype=out_dtype, device=qx.device, memory_format=fmt)
    bounds = torch.tensor([sum(segments[:i]) for i in range(len(segments) + 1)], dtype=torch.int32,
                          device=qx.device)
    ws = w_scale.reshape(-1).float().contiguous()
    cfg = _config()
    p = nb * oh * ow
    grid = (triton.cdiv(p, cfg["BLOCK_M"]), triton.cdiv(o, cfg["BLOCK_N"]))
    _int8_conv_kernel[grid](
        qx.contiguous(), w_ohwi.contiguous(), y, x_scales.reshape(-1).float().contiguous(), bounds,
        ws, ws if bias is None else bias, h, w, c, oh, ow, o, p, len(segments), *y.stride(),
        sh, sw, ph, pw, dh, dw, KH=kh, KW=kw, HAS_BIAS=bias is not None, ACTIVATION=activation,
        **cfg)
    return y


def w8a8_conv2d(
    x: torch.Tensor, w_ohwi: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
    x_scales: torch.Tensor, segments: Sequence[int] | None = None,
    stride: Sequence[int] = (1, 1), padding: Sequence[int] = (0, 0),
    dilation: Sequence[int] = (1, 1), activation: str = "none",
) -> torch.Tensor:
    """Float x [N, C, H, W] -> int8 NHWC per channel segment -> int8 conv -> x's dtype, in x's
    memory format (channels-last in, channels-last out, as F.conv2d)."""
    segments = [x.shape[1]] if segments is None else list(segments)
    qx = act_quant.quantize_static(x.permute(0, 2, 3, 1), x_scales, segments)
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return int8_conv2d(qx, w_ohwi, x_scales, segments, w_scale, bias, stride, padding, dilation,
                       activation, x.dtype, channels_last)
