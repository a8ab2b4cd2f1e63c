"""Activation quantization for the CPU int8 kernels in one pass each.

The reference grid (x / scale in fp32, round half to even, clamp to [-128, 127]) plus oneDNN's
zero point of 128, as one loop that Inductor generates once per dtype and rank, instead of the
seven-odd eager passes (and fp32 copies) of `reference.quantize_act`: on 2048 x 1536 bf16 rows,
3.2 ms eager vs 1.6 ms compiled for dynamic per-token codes, same codes (2 threads,
`python samples/bench_cpu_ops.py --threads 2`). Where no compiler
works (Inductor needs a C++ toolchain), the same functions run eagerly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# ints, not floats: dynamo passes float globals into the compiled graph as run-time inputs,
# which kept Inductor from vectorizing the clamp (2048 x 1536 bf16 per-token codes: 1.7 ms with
# float bounds, 0.9 ms with these)
_QMIN, _QMAX, _ZP = -128, 127, 128


def _u8_static(x: Tensor, scale: Tensor) -> Tensor:
    """oneDNN u8 codes (int8 code + 128) of x with a broadcastable fp32 scale tensor."""
    # in place on the one fp32 temporary (eager calls on small inputs allocate once, not four
    # times); compiled, the same loop
    return torch.div(x.float(), scale).round_().clamp_(_QMIN, _QMAX).add_(_ZP).to(torch.uint8)


def _u8_dynamic(x: Tensor) -> tuple[Tensor, Tensor]:
    """(u8 codes, fp32 scales [M, 1]) of rows x [M, K], one symmetric scale per row."""
    xf = x.float()
    s = xf.abs().amax(-1, keepdim=True).div_(_QMAX)
    s = torch.where(s > 0, s, torch.ones_like(s))
    return _u8_static(xf, s), s


POSTS = ("", "gelu", "gelu_tanh")  # activations a Linear may apply to its own output


def apply_post(y: Tensor, post: str) -> Tensor:
    """The activation `post` (one of POSTS) applied to a Linear's output, eagerly in y's dtype
    (as the unfused module computes it; a compiled fp32 pass was no faster here, see
    samples/bench_cpu_ops.py)."""
    if not post:
        return y
    return F.gelu(y, approximate="tanh" if post == "gelu_tanh" else "none")


def _rescale(y: Tensor, row_scale: Tensor, bias: Tensor | None, dtype: torch.dtype,
             post: str) -> Tensor:
    """post(y [M, N] fp32 times per-row scales, plus bias), in `dtype`: one pass."""
    y = y * row_scale
    return apply_post(y if bias is None else y + bias.float(), post).to(dtype)


def _scaled(x: Tensor, factor: Tensor) -> Tensor:
    """x times a broadcastable fp32 factor, computed in fp32, back in x's dtype."""
    return (x.float() * factor).to(x.dtype)


_EAGER = {"static": _u8_static, "dynamic": _u8_dynamic, "rescale": _rescale, "scaled": _scaled}
# Compiled twins, made on first use; a function whose compile fails once stays eager (a fact
# of this host: no compiler).
_COMPILED: dict[str, object] = {}


def _kernel(name: str):
    fn = _COMPILED.get(name)
    if fn is None:
        # not fullgraph: past dynamo's recompile limit (many dtypes and shapes in one process)
        # a call runs eagerly instead of failing
        fn = _COMPILED[name] = torch.compile(_EAGER[name], dynamic=True)
    return fn


def _compile_errors() -> tuple[type[BaseException], ...]:
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import InductorError

    return BackendCompilerFailed, InductorError


def _run(name: str, *args):
    if torch.compiler.is_compiling():  # a whole model being compiled: its graph takes the ops
        return _EAGER[name](*args)
    fn = _kernel(name)
    if fn is _EAGER[name]:
        return fn(*args)
    try:
        return fn(*args)
    except _compile_errors():  # no C++ toolchain, or Inductor refuses: the same maths eagerly
        _COMPILED[name] = _EAGER[name]
        return _EAGER[name](*args)


# Below this many elements a call costs more to dispatch than to compute: run eagerly (and
# spare the compiler the size-1 shapes it would specialize on).
_SMALL = 1 << 14


def _run_rows(name: str, rows: Tensor, *args):
    """`name` on rows [M, K] (the one rank the compiled kernels see)."""
    if rows.numel() < _SMALL or min(rows.shape) < 2:
        return _EAGER[name](rows, *args)
    return _run(name, rows, *args)


def u8_static(x: Tensor, scale: Tensor) -> Tensor:
    """Codes of x [..., C] with `scale` [1] or [C] (fp32), in x's shape."""
    return _run_rows("static", x.reshape(-1, x.shape[-1]), scale).reshape(x.shape)


def u8_static_nhwc(x: Tensor, scale: Tensor) -> Tensor:
    """Codes of an image batch x [N, C, H, W] as a channels-last u8 tensor."""
    n, c, h, w = x.shape
    if x.is_contiguous() and scale.numel() == 1 and not x.is_contiguous(memory_format=torch.channels_last):
        # an NCHW input with one scale: codes in its own layout, then the u8 (not the
        # wider float) turned channels-last
        codes = _run_rows("static", x.reshape(-1, h * w), scale).view(n, c, h, w)
        return codes.contiguous(memory_format=torch.channels_last)
    rows = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(-1, c)
    return _run_rows("static", rows, scale).view(n, h, w, c).permute(0, 3, 1, 2)


def u8_per_image_nhwc(x: Tensor, scale: Tensor) -> Tensor:
    """Codes of an image batch x [N, C, H, W] with one scale per image (`scale` [N, 1, 1, 1]
    fp32), as a channels-last u8 tensor."""
    x = x.contiguous(memory_format=torch.channels_last)
    if x.numel() < _SMALL:
        codes = _u8_static(x, scale)
    else:
        codes = _run("static", x, scale)
    return codes.contiguous(memory_format=torch.channels_last)


def scaled(x: Tensor, factor: Tensor) -> Tensor:
    """x [..., C] times a per-channel fp32 factor [C] (SmoothQuant / AWQ input scales), in x's
    dtype: one pass instead of eager's fp32 product and cast."""
    rows = x.reshape(-1, x.shape[-1])
    return _run_rows("scaled", rows, factor).reshape(x.shape)


def u8_dynamic(rows: Tensor) -> tuple[Tensor, Tensor]:
    """(u8 codes, fp32 scales [M, 1]) of rows [M, K]."""
    return _run_rows("dynamic", rows)


def rescale(y: Tensor, row_scale: Tensor, bias: Tensor | None, dtype: torch.dtype,
            post: str = "") -> Tensor:
    """post(y [M, N] fp32 times row_scale [M, 1], plus bias), in `dtype`."""
    return _run_rows("rescale", y, row_scale, bias, dtype, post)

