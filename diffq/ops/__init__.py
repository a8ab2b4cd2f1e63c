"""The one dispatch point for quantized compute. Quantized modules call only `linear` and
`conv2d` here. W8A8 calls (static symmetric int8 activations, symmetric int8 per-channel
weights) go through the `diffq::w8a8_*` custom ops, whose CPU kernel is oneDNN int8 when a
prepacked weight is available and whose CUDA kernel is Triton (`diffq.ops.cuda`); Linear calls
with dynamic per-token int8 activations go through `diffq::w8a8_dynamic_linear` (oneDNN's
packed int8 GEMM on x86, else torch._int_mm); weight-only int4 per-group layers on CUDA go
through `diffq::w4a16_linear`;
weight-only int8 / int4 layers with a few bf16 rows on CPU (LLM decode) go through torch's
weight-only packed kernels. Conv2d with dynamic int8 activations runs as a Linear over pixels
(1x1, per-pixel scales) or through `diffq::w8a8_dynamic_conv2d` (kxk, one scale per image).
Every other scheme runs the pure-torch reference, which dequantizes and runs the float op.
Eager CPU calls run the W8A8 ops' implementations without the dispatcher (`library.call`);
inside torch.compile on CPU they are split into traced quantization and rescale around bare
int8 kernels (`diffq.ops.traced`)."""
from __future__ import annotations

from dataclasses import replace

import torch

from diffq.core.weights import QuantizedWeight
from diffq.ops import cuda as _cuda  # noqa: F401  (registers the CUDA kernels; no triton import)
from diffq.ops import fused, library, onednn, reference, traced
from diffq.ops.kernels import Kernels
from diffq.ops.types import ActQuant

__all__ = ["ActQuant", "BACKENDS", "linear", "conv2d", "quantize_activation", "kernel_of"]

BACKENDS = ("auto", "reference")
quantize_activation = reference.quantize_activation


_INT8_CODES = ("int8", "int7")  # int7: int8 codes on half the grid (unsplit on CPUs without VNNI)


def _int8_per_channel(layout) -> bool:
    """Symmetric int8 with one scale per output channel (or tensor): what the kernels take."""
    return layout.format in _INT8_CODES and layout.symmetric and layout.group_size is None


def _cached(cache: Kernels | None, key: tuple, make):
    """`make()`, kept in the calling module's kernel store under `key` when it has one (not
    while torch.compile traces: the store is opaque there, and only the ops read it)."""
    if cache is None or torch.compiler.is_compiling():
        return make()
    return cache.get(key, make)


def _w8a8(weight: QuantizedWeight, act: ActQuant | None, x: torch.Tensor, backend: str) -> bool:
    # On CUDA the op would run Triton whatever is packed, so "reference" must bypass it here.
    if backend == "reference" and x.device.type == "cuda":
        return False
    return (act is not None and not act.dynamic and act.fmt.name == "int8"
            and act.zero_point is None and _int8_per_channel(weight.layout))


def _w8a8_dynamic(weight: QuantizedWeight, act: ActQuant | None, x: torch.Tensor, backend: str) -> bool:
    """Per-token dynamic symmetric int8 activations with int8 per-channel weights: int8 GEMM."""
    return (backend == "auto" and act is not None and act.dynamic and act.fmt.name == "int8"
            and act.zero_point is None and act.feature_axis in (-1, x.dim() - 1)
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and _int8_per_channel(weight.layout))


pointwise = reference.pointwise


def _w8a8_dynamic_rows(weight: QuantizedWeight, act: ActQuant | None, x: torch.Tensor, backend: str) -> bool:
    """Dynamic per-pixel int8 activations (scales along the channel axis) on an image batch."""
    return (act is not None and act.dynamic and act.feature_axis in (1, -3) and x.dim() == 4
            and _w8a8_dynamic(weight, replace(act, feature_axis=-1), x.movedim(1, -1), backend))


def _traced(x: torch.Tensor) -> bool:
    """A CPU call inside torch.compile: the W8A8 ops split into traceable quantization and
    rescale around the bare int8 kernel (`diffq.ops.traced`)."""
    return torch.compiler.is_compiling() and x.device.type == "cpu"


def _w8a8_dynamic_image(weight: QuantizedWeight, act: ActQuant | None, x: torch.Tensor, backend: str,
                        stride, padding, dilation, groups: int) -> bool:
    """Dynamic int8 activations of a kxk convolution (one scale per image) with int8
    per-channel weights: the int8 convolution."""
    return (backend == "auto" and reference.per_image(act, weight.shape, stride, padding, dilation, groups)
            and act.zero_point is None and _int8_per_channel(weight.layout) and not isinstance(padding, str)
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16))


def kernel_of(layout, act, conv: bool, device: str = "cpu", pointwise: bool = False) -> str:
    """The compute a layer with weight `layout` and activation spec `act` (None: weight-only)
    runs on `device` for float inputs of many rows: what the report lists per layer (`pointwise`:
    a 1x1 convolution, which dynamic activations run as a Linear over pixels). A "simulated"
    entry is fake-quant: its activations are rounded to int8 and computed in float."""
    compute = layout.storage.compute_layout(layout)
    if compute is not None:  # int4_i8: the kernels take its int8 products
        return f"{kernel_of(compute, act, conv, device, pointwise)} on {layout.format} codes"
    if act is not None and act.format == "int8" and act.symmetric and _int8_per_channel(layout):
        if layout.format != "int8":  # int7: int8 codes on half the grid
            as_int8 = kernel_of(replace(layout, format="int8"), act, conv, device, pointwise)
            return f"{as_int8} on {layout.format} codes"
        if act.mode == "static":
            if device == "cuda":
                return "Triton int8"
            return "oneDNN int8" if onednn.available() else "reference (int8 activations simulated)"
        if device == "cpu" and onednn.available():
            return "oneDNN int8 (dynamic)" if not conv or pointwise else "oneDNN int8 (dynamic, per image)"
        if not conv or pointwise:
            return "int8 GEMM (torch._int_mm)"
    if act is None:
        if device == "cuda" and layout.format == "int4" and layout.group_size is not None:
            return "Triton w4a16"
        return "weight-only: dequantize + float"
    return f"reference ({act.format} activations simulated)"


def _segment_scales(act: ActQuant, channels: int) -> tuple[torch.Tensor, list[int]]:
    """One fp32 scale per channel segment [S] on the scale's device (no host round trip)."""
    scale = act.scale.reshape(-1).float()
    if scale.numel() == 1:
        return scale, [channels]
    segments = list(act.segments)
    return scale[reference.segment_starts(segments)], segments


def _w_scale(weight: QuantizedWeight, cache: Kernels | None, dtype=torch.float32) -> torch.Tensor:
    """Weight scales as a contiguous [out] vector, kept in the module's cache (traced as plain
    tensor ops under torch.compile, see `_cached`)."""
    return _cached(cache, ("w_scale", weight.scale.data_ptr(), dtype),
                   lambda: weight.scale.reshape(-1).expand(weight.shape[0]).to(dtype).contiguous())


def _store(cache: Kernels | None, backend: str) -> tuple[Kernels, bool]:
    """(the layer's pack store, whether the ops may use their fast kernels): a call without a
    store (a bare functional call) runs the reference and keeps nothing."""
    return (Kernels(), False) if cache is None else (cache, backend == "auto")


# Weight-only int8 / int4 kernels beat bf16 F.linear only for a handful of rows (LLM decode;
# 1.8x / 3.8x at 1x2048x5632, bf16 inputs only: fp32 inputs run 5x slower than fp32 F.linear).
# Their cost grows ~0.35 / 0.31 ms per row there, while the alternative, dequantizing the
# weight (35-58 ms) then bf16 F.linear (~0.11 ms per row), breaks even near 200 rows, so
# prompts (prefill) up to 128 tokens stay on the kernels and only longer ones dequantize.
_DECODE_MAX_ROWS = 128


def scale_input(x: torch.Tensor, factor: torch.Tensor, axis: int) -> torch.Tensor:
    """x times a per-channel fp32 factor along `axis` (SmoothQuant / AWQ), rounded to x's dtype:
    on CPU rows one compiled pass (BERT row, `llm-w8a8-smoothquant`: 98 -> 78 ms a batch)."""
    if axis == -1 and x.device.type == "cpu" and not torch.compiler.is_compiling():
        return fused.scaled(x, factor)
    shape = [1] * x.dim()
    shape[axis] = -1
    return (x * factor.reshape(shape)).to(x.dtype)


def _decode_kernels(backend: str) -> bool:
    # not under torch.compile: Inductor cannot lower these ops on a fused input (LoweringException
    # for aten._weight_int8pack_mm), and it compiles the dequantized float matmul well
    return backend == "auto" and not torch.compiler.is_compiling()


# fp32 rows go through the kernels as bf16 (a rounding far below the weights' own): else each
# call dequantized the whole weight, 582 ms a token for W4A16 decode against 72 ms in fp32
# (AVX2 EPYC, `diffq bench --model llm-decode`, one run).
_DECODE_DTYPES = (torch.bfloat16, torch.float32)


def _decode_rows(x: torch.Tensor, act: ActQuant | None, backend: str) -> bool:
    return (_decode_kernels(backend) and act is None and x.device.type == "cpu"
            and x.dtype in _DECODE_DTYPES and x.numel() // x.shape[-1] <= _DECODE_MAX_ROWS)


def _w8_decode(x: torch.Tensor, weight: QuantizedWeight, act: ActQuant | None, backend: str) -> bool:
    # the kernel steps K by 16 (AVX-512) or 8 (AVX2) with no tail: any other K read past each
    # row, wrong sums on AVX2 and a segfault on AVX-512 (K = 4 in tests/unseen_models.py)
    return (_decode_rows(x, act, backend) and _int8_per_channel(weight.layout)
            and x.shape[-1] % 16 == 0)


def _is_aligned(t: torch.Tensor) -> bool:
    # the int8 decode kernel reads rows with aligned vector loads and faults otherwise (a view at
    # an odd offset, or codes loaded from a safetensors buffer, whose tensors are 8-byte aligned)
    return t.is_contiguous() and t.data_ptr() % 64 == 0


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t, or a fresh copy (the CPU allocator aligns to 64 bytes)."""
    return t if _is_aligned(t) else t.clone(memory_format=torch.contiguous_format)


def _int8_rows(weight: QuantizedWeight, cache: Kernels | None) -> torch.Tensor:
    if _is_aligned(weight.data):
        return weight.data
    return _cached(cache, ("int8rows", weight.data.data_ptr()), lambda: _aligned(weight.data))


def _w4_decode(x: torch.Tensor, weight: QuantizedWeight, act: ActQuant | None, backend: str) -> bool:
    return (_decode_rows(x, act, backend)
            and weight.layout.format == "int4" and weight.layout.group_size in (32, 64, 128, 256)
            and x.shape[-1] % weight.layout.group_size == 0 and weight.shape[0] % 16 == 0)  # kernel limits


def _int4_pack(weight: QuantizedWeight, cache: Kernels | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tinygemm-packed codes, scales_and_zeros [K/g, O, 2] bf16) for torch's int4 CPU kernel,
    which computes w = (u - 8) * scale + zero from unsigned codes u = q + 8."""
    def make():
        codes = weight.codes().reshape(weight.shape[0], -1)  # signed int4 in [-8, 7]
        packed = torch._convert_weight_to_int4pack_for_cpu((codes.to(torch.int32) + 8).contiguous(), 2)
        scale = weight.scale.float().reshape(weight.shape[0], -1)  # [O, K/g]
        zp = weight.zero_point
        zero = torch.zeros_like(scale) if zp is None else -zp.float().reshape(scale.shape) * scale
        return packed, torch.stack((scale.t(), zero.t()), -1).to(torch.bfloat16).contiguous()
    return _cached(cache, ("int4pack", weight.data.data_ptr()), make)


def _w4a16(x: torch.Tensor, weight: QuantizedWeight, act: ActQuant | None, backend: str) -> bool:
    return (backend == "auto" and act is None and x.device.type == "cuda"
            and weight.layout.format == "int4" and weight.layout.group_size is not None)


def linear(
    x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None, act: ActQuant | None,
    cache: Kernels | None = None, backend: str = "auto", post: str = "",
) -> torch.Tensor:
    """y = post(x @ W^T + b) with W quantized and, when `act` is given, x quantized. x: [..., K].
    `cache` is the calling module's store for prepacked weights; `post` an activation of
    `fused.POSTS`, fused into the int8 kernels' epilogues (applied after the others)."""
    if _w8_decode(x, weight, act, backend):
        rows = _aligned(x.reshape(-1, x.shape[-1]).to(torch.bfloat16))
        scale = _w_scale(weight, cache, torch.bfloat16)
        y = torch._weight_int8pack_mm(rows, _int8_rows(weight, cache), scale)
        y = y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])
        return fused.apply_post(y if bias is None else y + bias.to(x.dtype), post)
    if _w4_decode(x, weight, act, backend):
        packed, sz = _int4_pack(weight, cache)
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
        y = torch._weight_int4pack_mm_for_cpu(rows, packed, weight.layout.group_size, sz)
        y = y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])
        return fused.apply_post(y if bias is None else y + bias.to(x.dtype), post)
    if _w4a16(x, weight, act, backend):
        return fused.apply_post(library.w4a16_linear(x, weight.data, weight.scale, weight.zero_point,
                                                     bias, weight.layout.group_size), post)
    kernels, fast = _store(cache, backend)
    if _w8a8_dynamic(weight, act, x, backend):
        if _traced(x):
            return traced.linear(x, weight.data, _w_scale(weight, cache), bias, None, kernels, fast, post)
        return library.call("w8a8_dynamic_linear", x, weight.data, _w_scale(weight, cache), bias,
                            kernels, fast, post)
    if not _w8a8(weight, act, x, backend):
        return fused.apply_post(reference.linear(x, weight, bias, act), post)
    xs, _ = _segment_scales(act, x.shape[-1])
    if _traced(x):
        return traced.linear(x, weight.data, _w_scale(weight, cache), bias, xs, kernels, fast, post)
    return library.call("w8a8_linear", x, weight.data, _w_scale(weight, cache), bias, xs, kernels,
                        fast, post)


def conv2d(
    x: torch.Tensor,
    weight: QuantizedWeight,
    bias: torch.Tensor | None,
    act: ActQuant | None,
    stride: tuple[int, int],
    padding: tuple[int, int] | str,
    dilation: tuple[int, int],
    groups: int,
    cache: Kernels | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """2-D convolution of x [N, C, H, W] with a quantized weight [O, C/groups, kh, kw]."""
    if (pointwise(weight.shape, stride, padding, dilation, groups)
            and _w8a8_dynamic_rows(weight, act, x, backend)):
        # per-pixel dynamic scales factor out of a 1x1 convolution: it is a Linear over pixels
        c = x.shape[1]
        rows = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        flat = QuantizedWeight(weight.data.reshape(weight.shape[0], c), weight.scale, weight.zero_point,
                               weight.layout, (weight.shape[0], c))
        y = linear(rows, flat, bias, replace(act, feature_axis=-1), cache, backend)
        return y.permute(0, 3, 1, 2)
    if _w8a8_dynamic_image(weight, act, x, backend, stride, padding, dilation, groups):
        kernels, fast = _store(cache, backend)
        if _traced(x):
            return traced.conv2d(x, weight.data.reshape(weight.shape), _w_scale(weight, cache), bias, None,
                                 [x.shape[1]], list(stride), list(padding), list(dilation), groups,
                                 kernels, fast)
        return library.call("w8a8_dynamic_conv2d", x, weight.data.reshape(weight.shape),
                            _w_scale(weight, cache), bias, list(stride), list(padding), list(dilation),
                            groups, kernels, fast)
    if not _w8a8(weight, act, x, backend) or isinstance(padding, str):
        return reference.conv2d(x, weight, bias, act, stride, padding, dilation, groups)
    scales, segments = _segment_scales(act, x.shape[1])
    kernels, fast = _store(cache, backend)
    if _traced(x) and (groups == 1 or len(segments) == 1):
        return traced.conv2d(x, weight.data.reshape(weight.shape), _w_scale(weight, cache), bias, scales,
                             segments, list(stride), list(padding), list(dilation), groups, kernels, fast)
    return library.call("w8a8_conv2d", x, weight.data.reshape(weight.shape), _w_scale(weight, cache),
                        bias, scales, segments, list(stride), list(padding), list(dilation), groups,
                        kernels, fast)
