"""x86 CPU kernels: W8A8 linear and conv2d through oneDNN int8 (VNNI/AMX).

Weights are prepacked once (callers cache the packs). oneDNN multiplies u8 x s8, so the
symmetric int8 activation codes q become q + 128 with zero point 128: the same grid as the
reference path. A conv whose input has per-segment scales (cat(h, skip)) runs as one
convolution per channel segment, summed.

CPUs without VNNI (AVX2, AVX-512 without VNNI) multiply u8 x s8 with vpmaddubsw, which
saturates each pair of products at int16: full-range codes give wrong sums (up to 1e5 off).
There a weight with codes beyond [-64, 64] is split into two halves whose pair sums cannot
saturate, hi = clamp(q, -64, 63) and lo = q - hi (|lo| <= 64), packed as one weight of twice the
output channels; the two halves of the output are added. Exact, at twice the multiply work, and
with the bias and the activation added after the join instead of inside the kernel. Weights on
the int7 grid (codes in [-64, 63]: 255 x 64 x 2 = 32640 fits int16) run unsplit.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from diffq.ops import fused, reference

_U8_ZP = 128


# a fact of this torch build, read once: torch.compile cannot trace mkldnn.is_available()
_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv2d_pointwise")


def available() -> bool:
    return _AVAILABLE


def native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 / AMX, or AVX-512 conversions
    oneDNN uses); without it (AVX2) a bf16 GEMM ran 7x slower than fp32 (2-core EPYC, one run
    of 256x1024x1024), so fp32 is what a user runs there."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return probe is not None and bool(probe())


_SATURATES: list[bool] = []  # the answer, once measured (a fact of this host, never changes)


def saturates() -> bool:
    """Whether this CPU's u8 x s8 int8 GEMM saturates pairs of products (no VNNI): measured
    once on a worst case (255 x 127 pairs), not guessed from CPU flags."""
    if not _SATURATES:
        _SATURATES.append(available() and _measure_saturation())
    return _SATURATES[0]


def _measure_saturation() -> bool:
    qx = torch.full((1, 64), 255, dtype=torch.uint8)
    qw = torch.full((8, 64), 127, dtype=torch.int8)
    y = torch.ops.onednn.qlinear_pointwise(
        qx, 1.0, 0, torch.ops.onednn.qlinear_prepack(qw, None), torch.ones(8), _zeros(8), None,
        1.0, 0, torch.float32, "none", [], "")
    return float(y[0, 0]) != 255.0 * 127 * 64


_SAFE = 64  # |code| <= 64 never saturates a pair: 255 x 64 x 2 = 32640 <= 32767


def needs_split(qweight: Tensor) -> bool:
    """Whether `qweight` runs split on this CPU: it saturates and some code lies beyond +-64."""
    return saturates() and bool((qweight < -_SAFE).any() | (qweight > _SAFE).any())


def _split(qweight: Tensor, groups: int, split: bool) -> Tensor:
    """Codes as [hi; lo] within each group's output channels when `split`, else as they are."""
    if not split:
        return qweight
    hi = qweight.clamp(-_SAFE, _SAFE - 1)
    per_group = lambda t: t.unflatten(0, (groups, -1))  # noqa: E731
    return torch.cat([per_group(hi), per_group(qweight - hi)], dim=1).flatten(0, 1)


def _unsplit(codes: Tensor, groups: int, split: bool) -> Tensor:
    """The codes `_split` laid out, each group's hi and lo added back (exact: hi + lo = q)."""
    if not split:
        return codes.contiguous()
    return codes.unflatten(0, (groups, 2, -1)).sum(1, dtype=torch.int8).flatten(0, 1)


def unpack_linear(pack: Tensor, split: bool) -> Tensor:
    """The int8 codes [N, K] in a `pack_linear` pack (oneDNN reorders its blocked layout back)."""
    return _unsplit(pack.to_dense().t(), 1, split)


def unpack_conv(pack: Tensor, groups: int, split: bool) -> Tensor:
    """The int8 codes [O, C/groups, kh, kw] in one `pack_conv_u8` pack."""
    return _unsplit(pack.to_dense(), groups, split)


def _scales(w_scale: Tensor, groups: int, split: bool) -> Tensor:
    """Per-output-channel scales laid out as `_split` lays out the codes."""
    w_scale = w_scale.float()
    return w_scale.unflatten(0, (groups, -1)).repeat(1, 2).flatten() if split else w_scale


def _join(y: Tensor, dim: int, groups: int, split: bool) -> Tensor:
    """The output of a split weight (channels on `dim` >= 0): each group's hi and lo added."""
    if not split:
        return y
    return y.unflatten(dim, (groups, 2, -1)).sum(dim + 1).flatten(dim, dim + 1)


def can_pack_conv(padding, groups: int, segments: list[int]) -> bool:
    return available() and not isinstance(padding, str) and (groups == 1 or len(segments) == 1)


def pack_linear(qweight: Tensor, split: bool) -> Tensor:
    return torch.ops.onednn.qlinear_prepack(_split(qweight, 1, split).contiguous(), None)


class Constants(NamedTuple):
    """What every call of one layer's kernel passes besides its input: made once per layer
    (`constants`, kept in its pack store), not per call (~10 us a call on small layers)."""

    scales: Tensor  # fp32 per-output-channel weight scales, laid out as the packed weight
    zeros: Tensor  # int32 zero points of those channels (oneDNN wants them)
    bias: Tensor | None  # fp32 bias the kernel adds; None if none, or on a split weight
    split: bool  # the weight is packed as [hi; lo] (`needs_split`)


def constants(w_scale: Tensor, bias: Tensor | None, groups: int, split: bool) -> Constants:
    scales = _scales(w_scale, groups, split).contiguous()
    b = None if bias is None or split else bias.float().contiguous()
    return Constants(scales, _zeros(len(scales)), b, split)


def _zeros(n: int) -> Tensor:
    return torch.zeros(n, dtype=torch.int32)


_POST_OPS = {"": ("none", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh")}


def linear_packed(x: Tensor, packed: Tensor, c: Constants, bias, x_scale: Tensor, post: str = "") -> Tensor:
    """The static W8A8 linear; `x_scale` [1] fp32; `post` (see fused.POSTS) runs as oneDNN's
    post-op."""
    split = c.split
    name, algorithm = _POST_OPS["" if split else post]
    y = torch.ops.onednn.qlinear_pointwise(
        fused.u8_static(x, x_scale), float(x_scale), _U8_ZP, packed, c.scales, c.zeros, c.bias, 1.0, 0,
        x.dtype, name, [], algorithm)
    if not split:
        return y
    y = _join(y, y.dim() - 1, 1, True)
    y = y if bias is None else y.add_(bias.to(y.dtype))
    return fused.apply_post(y, post)


def linear_u8(u8: Tensor, packed: Tensor, c: Constants) -> Tensor:
    """fp32 (u8 - 128) @ W^T * w_scale for rows of codes u8 [M, K]: the packed int8 GEMM with
    unit input scale (the caller applies the activation scales and the bias to its output)."""
    y = torch.ops.onednn.qlinear_pointwise(
        u8, 1.0, _U8_ZP, packed, c.scales, c.zeros, None, 1.0, 0, torch.float32, "none", [], "")
    return _join(y, 1, 1, c.split)


def linear_packed_dynamic(x: Tensor, packed: Tensor, c: Constants, bias, post: str = "") -> Tensor:
    """The W8A8 linear with x quantized per token at run time: codes on the packed int8 GEMM
    with unit input scale, fp32 out, then each row times its own scale (exact: the scale is
    constant along the reduction)."""
    u8, s = fused.u8_dynamic(x.reshape(-1, x.shape[-1]))
    y = linear_u8(u8, packed, c)
    return fused.rescale(y, s, bias, x.dtype, post).reshape(*x.shape[:-1], -1)


def conv2d_packed(x: Tensor, packs: list[Tensor], c: Constants, bias, x_scales: Tensor,
                  segments: list[int], stride, padding, dilation, groups: int) -> Tensor:
    out, start = None, 0
    for i, (size, xs) in enumerate(zip(segments, x_scales.tolist(), strict=True)):  # CPU: no sync
        part = x if len(segments) == 1 else x[:, start:start + size]
        qx = fused.u8_static_nhwc(part, x_scales[i:i + 1])
        y = torch.ops.onednn.qconv2d_pointwise(
            qx, xs, _U8_ZP, packs[i], c.scales, c.zeros, c.bias if i == 0 else None, list(stride),
            list(padding), list(dilation), groups, 1.0, 0, x.dtype, "none", [], None)
        y = _join(y, 1, groups, c.split)
        out = y if out is None else out.add_(y)
        start += size
    if c.split and bias is not None:
        out = out.add_(bias.to(out.dtype).reshape(1, -1, 1, 1))
    return out


def pack_conv_u8(qweight: Tensor, w_scale: Tensor, stride, padding, dilation, groups: int,
                 split: bool) -> Tensor:
    """A convolution pack for codes with unit input scale (`conv2d_u8`, and `conv2d_packed`,
    which passes each channel segment's static scale in the call). `split` as `needs_split`
    says of the whole weight."""
    return torch.ops.onednn.qconv_prepack(
        _split(qweight, groups, split).contiguous(), _scales(w_scale, groups, split), 1.0, _U8_ZP,
        list(stride), list(padding), list(dilation), groups, None)


def conv2d_u8(u8: Tensor, pack: Tensor, c: Constants, stride, padding, dilation, groups: int) -> Tensor:
    """fp32 conv((u8 - 128), W) * w_scale of channels-last codes u8 [N, C, H, W] (a pack from
    `pack_conv_u8`; the caller applies the activation scales and the bias)."""
    y = torch.ops.onednn.qconv2d_pointwise(
        u8, 1.0, _U8_ZP, pack, c.scales, c.zeros, None, list(stride), list(padding),
        list(dilation), groups, 1.0, 0, torch.float32, "none", [], None)
    return _join(y, 1, groups, c.split)


def conv2d_packed_dynamic(x: Tensor, pack: Tensor, c: Constants, bias, stride, padding,
                          dilation, groups: int) -> Tensor:
    """The W8A8 conv with x quantized per image at run time: codes on a conv packed for unit
    input scale, fp32 out, then each image times its own scale (exact: one scale per image is
    constant along every output's sums) and the bias, in x's dtype."""
    s = reference.per_image_scales(x)
    y = conv2d_u8(fused.u8_per_image_nhwc(x, s), pack, c, stride, padding, dilation, groups).mul_(s)
    if bias is not None:
        y = y.add_(bias.float().reshape(1, -1, 1, 1))
    return y.to(x.dtype)
