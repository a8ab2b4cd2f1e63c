"""W8A8 on CPU as torch.compile traces it: the activation quantization and the rescale as plain
tensor ops, the int8 GEMM / convolution alone as an opaque op on the u8 codes
(`diffq::u8_linear`, `diffq::u8_conv2d`).

Eager calls run the fused W8A8 ops (`diffq.ops.library`), which quantize, multiply and rescale
inside one call. Inside a compiled graph that call is a wall Inductor cannot see through; split
like this, Inductor writes the codes in the loop that computes the input (the LayerNorm,
GroupNorm + SiLU or residual add before the layer), computes a shared input's codes once (to_q /
to_k / to_v reading one hidden state at one scale), and applies scales, bias and the next
elementwise ops to the GEMM's output in one loop. Same grid as every other path: the `fused`
functions, which run as plain ops while a model is being compiled."""
from __future__ import annotations

from torch import Tensor

from diffq.ops import fused, library, reference
from diffq.ops.kernels import Kernels


def linear(x: Tensor, qweight: Tensor, w_scale: Tensor, bias: Tensor | None, x_scale: Tensor | None,
           kernels: Kernels, fast: bool, post: str = "") -> Tensor:
    """post(dq(q(x)) @ dq(W)^T + b); `x_scale` [1] static, None for per-token dynamic scales."""
    rows = x.reshape(-1, x.shape[-1])
    if x_scale is None:
        u8, s = fused.u8_dynamic(rows)
    else:
        u8, s = fused.u8_static(rows, x_scale), x_scale
    y = library.u8_linear(u8, qweight, w_scale, kernels, fast)
    return fused.rescale(y, s, bias, x.dtype, post).reshape(*x.shape[:-1], -1)


def conv2d(x: Tensor, qweight: Tensor, w_scale: Tensor, bias: Tensor | None,
           x_scales: Tensor | None, segments: list[int], stride: list[int], padding: list[int],
           dilation: list[int], groups: int, kernels: Kernels, fast: bool) -> Tensor:
    """conv(dq(q(x)), dq(W)) + b; `x_scales` [S] static, one per channel segment of `segments`,
    or None for one dynamic scale per image."""
    if x_scales is None:
        s = reference.per_image_scales(x)
        parts = [(fused.u8_per_image_nhwc(x, s), s, 0)]
    else:
        starts = reference.segment_starts(segments)
        parts = [(fused.u8_static_nhwc(x if len(segments) == 1 else x[:, a:a + n], x_scales[i:i + 1]),
                  x_scales[i].reshape(1, 1, 1, 1), a)
                 for i, (a, n) in enumerate(zip(starts, segments, strict=True))]
    out = None
    for u8, s, start in parts:
        y = library.u8_conv2d(u8, qweight, w_scale, start, stride, padding, dilation, groups, kernels,
                              fast) * s
        out = y if out is None else out + y
    if bias is not None:
        out = out + bias.float().reshape(1, -1, 1, 1)
    return out.to(x.dtype)
