"""Quantized compute as `torch.library` custom ops: one schema, a pure-torch default
implementation (any device; what CPU runs unless noted), a fake implementation so
`torch.compile` can trace through quantized models, and device kernels: oneDNN int8 on CPU
for the W8A8 ops, packed into the layer's `Kernels` store (here), Triton on CUDA
(`diffq.ops.cuda`). oneDNN runs in the default implementation rather than a "cpu" kernel so
that the packs never cross the dispatcher as tensors (see `diffq.ops.kernels`).

Static per-tensor activation scales are passed as fp32 tensors on x's device, one per channel
segment (`x_scales` [S], `segments`): a UNet layer that consumes cat(h, skip) quantizes each
half with its own scale. Tensors, not Python floats, so that a call never waits on the device.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from diffq.core.weights import check_held
from diffq.ops import onednn, reference
from diffq.ops.fused import apply_post
from diffq.ops.kernels import Kernels


def _qdq(x: Tensor, scales: Tensor, segments: list[int], axis: int) -> Tensor:
    """Quantize to symmetric int8 per channel segment and back (the reference grid)."""
    shape = [1] * x.dim()
    shape[axis] = -1
    s = reference.per_channel_scales(scales.reshape(-1).float(), segments).reshape(shape)
    return reference.int8_codes(x.float(), s).float().mul_(s).to(x.dtype)


def _dequant_weight(qweight: Tensor, w_scale: Tensor, dtype: torch.dtype) -> Tensor:
    shape = [-1] + [1] * (qweight.dim() - 1)
    return (check_held(qweight).float() * w_scale.float().reshape(shape)).to(dtype)


def linear_reference(x, qweight, w_scale, bias, x_scale, post: str = ""):
    """The W8A8 linear in x's dtype: quantize-dequantize x, dequantize W, F.linear."""
    b = None if bias is None else bias.to(x.dtype)
    w = _dequant_weight(qweight, w_scale, x.dtype)
    return apply_post(F.linear(_qdq(x, x_scale, [x.shape[-1]], -1), w, b), post)


def conv2d_reference(x, qweight, w_scale, bias, x_scales, segments, stride, padding, dilation, groups):
    """The W8A8 conv in x's dtype: x quantized per channel segment and back, then F.conv2d."""
    b = None if bias is None else bias.to(x.dtype)
    return F.conv2d(_qdq(x, x_scales, segments, 1), _dequant_weight(qweight, w_scale, x.dtype), b,
                    stride, padding, dilation, groups)


# Implementations eager CPU calls run without the dispatcher (`call`): dispatching a custom op
# costs ~12 us a call (8 x 384 x 384 dynamic W8A8 layer: 76 us direct, 88 us dispatched,
# `python samples/bench_cpu_ops.py --threads 2`, section 5), and naming the call for the
# profiler with record_function cost as much again in a trial, so profiles of eager calls show
# the oneDNN kernels, not the diffq op. Filled at import by `_direct`, never changed after.
_DIRECT: dict[str, Callable] = {}


def _direct(fn: Callable) -> Callable:
    _DIRECT[fn.__name__] = fn
    return fn


def call(name: str, *args):
    """The op `name` on args: its implementation directly for eager CPU tensors, through
    torch.library while compiling or on other devices (their kernels, and the fake
    implementations torch.compile traces)."""
    if torch.compiler.is_compiling() or args[0].device.type != "cpu":
        return getattr(torch.ops.diffq, name)(*args)
    return _DIRECT[name](*args)


def _onednn(t: Tensor, fast: bool) -> bool:
    """Whether a call on `t` runs oneDNN's int8 kernels (packed into the layer's `kernels`)."""
    return fast and t.device.type == "cpu" and onednn.available()


def _cpu_int8(x: Tensor, fast: bool) -> bool:
    """`_onednn` for a float input the op quantizes itself."""
    return _onednn(x, fast) and x.dtype in (torch.float32, torch.bfloat16)


def _needs_split(qweight: Tensor, kernels: Kernels) -> bool:
    """`onednn.needs_split` of the layer's weight, read once (a pass over its codes)."""
    return kernels.get(("split", qweight.data_ptr()), lambda: onednn.needs_split(check_held(qweight)))


def _linear_pack(qweight: Tensor, kernels: Kernels) -> Tensor:
    return kernels.get(("linear", qweight.data_ptr()),
                       lambda: onednn.pack_linear(check_held(qweight), _needs_split(qweight, kernels)))


def _conv_pack(qweight: Tensor, w_scale: Tensor, start: int, channels: int, stride, padding, dilation,
               groups: int, kernels: Kernels) -> Tensor:
    """The pack of the weight columns of input channels [start, start + channels) for codes with
    unit input scale. Static calls pass their scale at run time (oneDNN takes it again in every
    call), so one pack serves every timestep group, eager and compiled calls alike."""
    return kernels.get(("conv_u8", qweight.data_ptr(), start, channels), lambda: onednn.pack_conv_u8(
        _input_slice(check_held(qweight), start, channels, groups).contiguous(), w_scale, stride, padding,
        dilation, groups, _needs_split(qweight, kernels)))


def packed_codes(qweight: Tensor, groups: int, kernels: Kernels) -> Tensor | None:
    """qweight's codes rebuilt from its oneDNN packs in `kernels`, or None when they do not
    hold all of them: what lets a layer drop its plain codes once packed (`diffq.nn.base`)."""
    ptr = qweight.data_ptr()
    split = kernels.peek(("split", ptr))
    linear = kernels.peek(("linear", ptr))
    if split is None:
        return None
    if linear is not None:  # a Linear, or a 1x1 convolution run as one
        return onednn.unpack_linear(linear, split).reshape(qweight.shape)
    parts = sorted((k[2], k[3], kernels.peek(k)) for k in kernels if k[:2] == ("conv_u8", ptr))
    starts = [0] + [a + n for a, n, _ in parts]
    if not parts or [a for a, _, _ in parts] != starts[:-1] or starts[-1] != qweight.shape[1] * groups:
        return None
    return torch.cat([onednn.unpack_conv(pack, groups, split) for _, _, pack in parts], dim=1)


def _constants(qweight: Tensor, w_scale: Tensor, bias: Tensor | None, kernels: Kernels,
               groups: int = 1) -> onednn.Constants:
    """The layer's `onednn.Constants`, keyed by its stored tensors (w_scale may be made per
    call inside a compiled graph; the weight and bias are the module's own)."""
    b = None if bias is None else (bias.data_ptr(), bias._version)
    key = ("constants", qweight.data_ptr(), groups, b)
    return kernels.get(key, lambda: onednn.constants(w_scale, bias, groups, _needs_split(qweight, kernels)))


@torch.library.custom_op("diffq::w8a8_linear", mutates_args=())
@_direct
def w8a8_linear(x: Tensor, qweight: Tensor, w_scale: Tensor, bias: Tensor | None,
                x_scale: Tensor, kernels: Kernels, fast: bool = False, post: str = "") -> Tensor:
    """y = post(dq(q(x)) @ dq(W)^T + b); x [..., K], qweight int8 [N, K], w_scale [N], x_scale
    [1]; `kernels` the layer's pack store, used when `fast` (else the reference); `post` an
    activation of `fused.POSTS`, fused into the kernel where it can be."""
    if _cpu_int8(x, fast):
        return onednn.linear_packed(x, _linear_pack(qweight, kernels),
                                    _constants(qweight, w_scale, bias, kernels), bias, x_scale, post)
    return linear_reference(x, qweight, w_scale, bias, x_scale, post)


@w8a8_linear.register_fake
def _w8a8_linear_fake(x, qweight, w_scale, bias, x_scale, kernels, fast=False, post=""):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def _int_mm_fits(a: Tensor, b: Tensor) -> bool:
    """torch._int_mm takes any shape on CPU (with row-major strides: it misreads the (1, 1)
    strides a size-1 dimension may carry); cuBLAS wants m > 16 and k, n multiples of 8."""
    (m, k), n = a.shape, b.shape[1]
    if a.stride() != (k, 1) or b.stride() != (n, 1):
        return False
    return a.device.type == "cpu" or (a.device.type == "cuda" and m > 16 and k % 8 == 0 and n % 8 == 0)


def _transposed(qweight: Tensor) -> Tensor:
    """W [N, K] as [K, N] with explicit row-major strides (torch._int_mm's right operand;
    .t().contiguous() of a [N, 1] weight keeps strides (1, 1), which _int_mm misreads)."""
    return torch.empty(qweight.shape[1], qweight.shape[0], dtype=qweight.dtype,
                       device=qweight.device).copy_(check_held(qweight).t())


@torch.library.custom_op("diffq::w8a8_dynamic_linear", mutates_args=())
@_direct
def w8a8_dynamic_linear(x: Tensor, qweight: Tensor, w_scale: Tensor, bias: Tensor | None,
                        kernels: Kernels, fast: bool = False, post: str = "") -> Tensor:
    """y = post(dq(q(x)) @ dq(W)^T + b) with x quantized per token at run time (symmetric int8,
    the reference grid), an int8 x int8 -> int32 GEMM, then both scales: oneDNN's packed int8
    GEMM on CPU when `fast`, else torch._int_mm. x [..., K], qweight int8 [N, K], w_scale [N]."""
    if _cpu_int8(x, fast):
        return onednn.linear_packed_dynamic(x, _linear_pack(qweight, kernels),
                                            _constants(qweight, w_scale, None, kernels), bias, post)
    n, k = qweight.shape
    w_t = kernels.get(("w_t", qweight.data_ptr()), lambda: _transposed(qweight))
    codes, s = reference.quantize_act(x.reshape(-1, k), None, [k])
    if _int_mm_fits(codes, w_t):
        y = torch._int_mm(codes, w_t).float().mul_(s.float()).mul_(w_scale.float())
    else:
        y = (codes.float() * s.float()) @ _dequant_weight(qweight, w_scale, torch.float32).t()
    if bias is not None:
        y = y.add_(bias.float())
    return apply_post(y, post).to(x.dtype).reshape(*x.shape[:-1], n)


@w8a8_dynamic_linear.register_fake
def _w8a8_dynamic_linear_fake(x, qweight, w_scale, bias, kernels, fast=False, post=""):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@torch.library.custom_op("diffq::w8a8_conv2d", mutates_args=())
@_direct
def w8a8_conv2d(x: Tensor, qweight: Tensor, w_scale: Tensor, bias: Tensor | None,
                x_scales: Tensor, segments: list[int], stride: list[int],
                padding: list[int], dilation: list[int], groups: int,
                kernels: Kernels, fast: bool = False) -> Tensor:
    """2-D convolution of dq(q(x)) [N, C, H, W] with dq(W) [O, C/groups, kh, kw]; `kernels`
    the layer's pack store (oneDNN packs per channel segment on CPU), used when `fast`."""
    if _cpu_int8(x, fast) and onednn.can_pack_conv(padding, groups, segments):
        starts = reference.segment_starts(segments)
        packs = [_conv_pack(qweight, w_scale, a, n, stride, padding, dilation, groups, kernels)
                 for a, n in zip(starts, segments, strict=True)]
        y = onednn.conv2d_packed(x, packs, _constants(qweight, w_scale, bias, kernels, groups), bias,
                                 x_scales, segments, stride, padding, dilation, groups)
    else:
        y = conv2d_reference(x, qweight, w_scale, bias, x_scales, segments, stride, padding,
                             dilation, groups)
    return y.contiguous(memory_format=_layout_of(x))


@torch.library.custom_op("diffq::w8a8_dynamic_conv2d", mutates_args=())
@_direct
def w8a8_dynamic_conv2d(x: Tensor, qweight: Tensor, w_scale: Tensor, bias: Tensor | None,
                        stride: list[int], padding: list[int], dilation: list[int], groups: int,
                        kernels: Kernels, fast: bool = False) -> Tensor:
    """2-D convolution of dq(q(x)) with dq(W), x quantized per image at run time (symmetric
    int8, `reference.per_image_scales`): oneDNN's int8 conv on CPU when `fast`."""
    if _cpu_int8(x, fast):
        pack = _conv_pack(qweight, w_scale, 0, qweight.shape[1] * groups, stride, padding, dilation, groups,
                          kernels)
        y = onednn.conv2d_packed_dynamic(x, pack, _constants(qweight, w_scale, None, kernels, groups), bias,
                                         stride, padding, dilation, groups)
    else:
        b = None if bias is None else bias.to(x.dtype)
        y = F.conv2d(reference.per_image_qdq(x), _dequant_weight(qweight, w_scale, x.dtype), b,
                     stride, padding, dilation, groups)
    return y.contiguous(memory_format=_layout_of(x))


@w8a8_dynamic_conv2d.register_fake
def _w8a8_dynamic_conv2d_fake(x, qweight, w_scale, bias, stride, padding, dilation, groups, kernels,
                              fast=False):
    y = F.conv2d(x, qweight.to(x.dtype), None, stride, padding, dilation, groups)
    return y.contiguous(memory_format=_layout_of(x))


def _layout_of(x: Tensor) -> torch.memory_format:
    """The output layout of a quantized conv on x, whichever kernel ran (so the fake can say
    it): channels-last on CPU, where oneDNN's int8 convolution computes in NHWC (as PyTorch's
    own convolution answers with channels-last weights; turning each output back to an NCHW
    input's layout cost SD1.5 W8A8 about 250 ms a step in copies); else x's layout."""
    nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if nhwc or x.device.type == "cpu" else torch.contiguous_format


@w8a8_conv2d.register_fake
def _w8a8_conv2d_fake(x, qweight, w_scale, bias, x_scales, segments, stride, padding, dilation,
                      groups, kernels, fast=False):
    y = F.conv2d(x, qweight.to(x.dtype), None, stride, padding, dilation, groups)
    return y.contiguous(memory_format=_layout_of(x))


def _int8_rows(u8: Tensor) -> Tensor:
    """oneDNN's u8 codes back to the int8 codes they hold."""
    return (u8.to(torch.int16) - 128).to(torch.int8)


@torch.library.custom_op("diffq::u8_linear", mutates_args=())
def u8_linear(u8: Tensor, qweight: Tensor, w_scale: Tensor, kernels: Kernels, fast: bool = False) -> Tensor:
    """fp32 (u8 - 128) @ W^T * w_scale: the int8 GEMM alone, on oneDNN's codes u8 [..., K]
    (int8 code + 128), qweight int8 [N, K], w_scale [N]. What torch.compile calls on CPU, with
    the quantization and the activation rescale traced around it (`diffq.ops.traced`), so
    Inductor fuses them into the ops that produce the input and consume the output. oneDNN when
    `fast`, else torch._int_mm."""
    rows = u8.reshape(-1, u8.shape[-1])
    if _onednn(u8, fast):
        y = onednn.linear_u8(rows, _linear_pack(qweight, kernels),
                             _constants(qweight, w_scale, None, kernels))
    else:
        w_t = kernels.get(("w_t", qweight.data_ptr()), lambda: _transposed(qweight))
        codes = _int8_rows(rows).contiguous()
        acc = torch._int_mm(codes, w_t) if _int_mm_fits(codes, w_t) else codes.float() @ w_t.float()
        y = acc.float() * w_scale.float()
    return y.reshape(*u8.shape[:-1], qweight.shape[0])


@u8_linear.register_fake
def _u8_linear_fake(u8, qweight, w_scale, kernels, fast=False):
    return u8.new_empty(*u8.shape[:-1], qweight.shape[0], dtype=torch.float32)


def _input_slice(qweight: Tensor, start: int, channels: int, groups: int) -> Tensor:
    """The weight columns of input channels [start, start + channels) (all of them if that is
    the whole input)."""
    if start == 0 and channels == qweight.shape[1] * groups:
        return qweight
    return qweight[:, start:start + channels]


@torch.library.custom_op("diffq::u8_conv2d", mutates_args=())
def u8_conv2d(u8: Tensor, qweight: Tensor, w_scale: Tensor, cin_start: int, stride: list[int],
              padding: list[int], dilation: list[int], groups: int, kernels: Kernels,
              fast: bool = False) -> Tensor:
    """fp32 conv(u8 - 128, W[:, cin_start : cin_start + C]) * w_scale: the int8 convolution
    alone on channels-last codes u8 [N, C, H, W] (one channel segment of the layer's input when
    cin_start > 0 or C is less than the weight's), for torch.compile as `u8_linear`."""
    if _onednn(u8, fast):
        pack = _conv_pack(qweight, w_scale, cin_start, u8.shape[1], stride, padding, dilation, groups,
                          kernels)
        y = onednn.conv2d_u8(u8, pack, _constants(qweight, w_scale, None, kernels, groups), stride, padding,
                             dilation, groups)
    else:
        w = _input_slice(check_held(qweight), cin_start, u8.shape[1], groups)
        y = F.conv2d(_int8_rows(u8).float(), w.float(), None, stride, padding, dilation, groups)
        y = y * w_scale.float().reshape(1, -1, 1, 1)
    return y.contiguous(memory_format=_layout_of(u8))


@u8_conv2d.register_fake
def _u8_conv2d_fake(u8, qweight, w_scale, cin_start, stride, padding, dilation, groups, kernels, fast=False):
    w = _input_slice(qweight, cin_start, u8.shape[1], groups)
    y = F.conv2d(u8.float(), w.float(), None, stride, padding, dilation, groups)
    return y.contiguous(memory_format=_layout_of(u8))


@torch.library.custom_op("diffq::w4a16_linear", mutates_args=())
def w4a16_linear(x: Tensor, packed: Tensor, scale: Tensor, zero_point: Tensor | None,
                 bias: Tensor | None, group_size: int) -> Tensor:
    """y = x @ dq(W)^T + b; W int4 [N, K] as diffq stores it: `packed` uint8 [N, K/2], per-group
    `scale` / `zero_point` [N, K/g, 1]. CPU runs this default: torch's int4pack CPU kernel wants
    its own layout and zero-point convention and wins only at decode sizes."""
    return reference.w4a16_linear(x, packed, scale, zero_point, bias, group_size)


@w4a16_linear.register_fake
def _w4a16_linear_fake(x, packed, scale, zero_point, bias, group_size):
    return x.new_empty(*x.shape[:-1], packed.shape[0])


@torch.library.custom_op("diffq::int8_attention", mutates_args=())
def int8_attention(q: Tensor, k: Tensor, v: Tensor, sm_scale: float | None = None,
                   block_q: int = 128, block_k: int = 64) -> Tensor:
    """SageAttention-style softmax(q k^T * sm_scale) v with int8 Q (per `block_q` rows) and
    smoothed K (per `block_k` rows). q [B, H, Lq, D], k/v [B, H, Lk, D] -> [B, H, Lq, D]."""
    return reference.int8_attention(q, k, v, sm_scale, block_q, block_k)


@int8_attention.register_fake
def _int8_attention_fake(q, k, v, sm_scale=None, block_q=128, block_k=64):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("diffq::quantize_act", mutates_args=())
def quantize_act(x: Tensor, scale: Tensor | None, segments: list[int]) -> tuple[Tensor, Tensor]:
    """x [..., C] -> (int8 codes [..., C], fp32 scales): static per channel segment (`scale`
    [S] -> scales [C]) or dynamic per token (`scale` None -> scales [..., 1])."""
    return reference.quantize_act(x, scale, segments)


@quantize_act.register_fake
def _quantize_act_fake(x, scale, segments):
    shape = (x.shape[-1],) if scale is not None else (*x.shape[:-1], 1)
    return (torch.empty(x.shape, dtype=torch.int8, device=x.device),
            torch.empty(shape, dtype=torch.float32, device=x.device))
