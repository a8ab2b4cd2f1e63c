"""Dynamic per-token int8 Linear runs an int8 GEMM (diffq::w8a8_dynamic_linear: oneDNN's packed
GEMM on x86, torch._int_mm elsewhere), not dequantize + float: same codes as the reference path,
int32 accumulation exact, so the outputs agree to float rounding (relative error < 1e-5 in
fp32, < 1e-2 in bf16)."""
import pytest
import torch
from torch import nn
from torch.profiler import profile

from diffq.core.recipe import ActivationSpec, WeightSpec
from diffq.nn import QLinear, set_backend
from diffq.ops import library, onednn
from diffq.ops.kernels import Kernels

DYNAMIC = ActivationSpec(mode="dynamic", granularity="per_token")


def _ran(fn) -> set[str]:
    with profile() as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("shape", [(2, 7, 64), (33, 128), (1, 1, 96), (2, 1)])  # K = 1: a timestep MLP
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("kernel", ["onednn::qlinear_pointwise", "aten::_int_mm"])
def test_dynamic_linear_is_an_int8_gemm_equal_to_the_reference(shape, dtype, tol, kernel, gen, monkeypatch):
    if kernel.startswith("onednn") and not onednn.available():
        pytest.skip("no oneDNN int8 kernels")
    if kernel == "aten::_int_mm":
        monkeypatch.setattr(onednn, "available", lambda: False)
    lin = nn.Linear(shape[-1], 48)
    x = torch.randn(*shape, generator=gen)
    x[..., min(3, shape[-1] - 1)] *= 40  # an outlier channel: per-token scales still hold the rest
    layer = QLinear(lin, WeightSpec("int8", "per_channel", clip="mse"), DYNAMIC).to(dtype)
    out = {}
    with torch.no_grad():
        set_backend(layer, "reference")
        assert kernel not in _ran(lambda: out.__setitem__("ref", layer(x.to(dtype))))
        set_backend(layer, "auto")
        ops = _ran(lambda: out.__setitem__("fast", layer(x.to(dtype))))
    assert kernel in ops  # (eager CPU calls run the op implementation without the dispatcher)
    ref, fast = out["ref"], out["fast"]
    assert fast.dtype == dtype and fast.shape == ref.shape
    assert float((fast.float() - ref.float()).norm() / ref.float().norm()) < tol


def test_dynamic_linear_op_schema(gen):
    x = torch.randn(3, 5, 32, generator=gen)
    w = torch.randint(-127, 128, (16, 32), generator=gen, dtype=torch.int8)
    args = (x, w, torch.rand(16, generator=gen) * 0.01 + 1e-3, torch.randn(16, generator=gen), Kernels())
    torch.library.opcheck(torch.ops.diffq.w8a8_dynamic_linear.default, args)
    assert library.w8a8_dynamic_linear(*args).shape == (3, 5, 16)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_pointwise_conv_with_dynamic_pixels_runs_the_int8_gemm(dtype, tol, gen):
    from diffq.nn import QConv2d
    from diffq.nn.base import layer_kernels

    if not onednn.available():
        pytest.skip("no oneDNN int8 kernels")
    x = torch.randn(2, 16, 6, 5, generator=gen)
    x[:, 3] *= 40  # an outlier channel: per-pixel scales
    layer = QConv2d(nn.Conv2d(16, 8, 1), WeightSpec("int8", "per_channel", clip="mse"), DYNAMIC).to(dtype)
    kxk = QConv2d(nn.Conv2d(16, 8, 3, padding=1), WeightSpec("int8", "per_channel"), DYNAMIC)
    out = {}
    with torch.no_grad():
        set_backend(layer, "reference")
        out["ref"] = layer(x.to(dtype))
        set_backend(layer, "auto")
        ops = _ran(lambda: out.__setitem__("fast", layer(x.to(dtype))))
    assert "onednn::qlinear_pointwise" in ops
    ref, fast = out["ref"], out["fast"]
    assert fast.shape == ref.shape == (2, 8, 6, 5) and fast.dtype == dtype
    assert float((fast.float() - ref.float()).norm() / ref.float().norm()) < tol
    kinds = layer_kernels(nn.ModuleDict({"pw": layer, "kxk": kxk}))
    assert kinds == {"pw": "oneDNN int8 (dynamic)", "kxk": "oneDNN int8 (dynamic, per image)"}
