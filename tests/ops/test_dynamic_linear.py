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
    assert "diffq::w8a8_dynamic_linear" in ops and kernel in ops
    ref, fast = out["ref"], out["fast"]
    assert fast.dtype == dtype and fast.shape == ref.shape
    assert float((fast.float() - ref.float()).norm() / ref.float().norm()) < tol


def test_dynamic_linear_op_schema(gen):
    x = torch.randn(3, 5, 32, generator=gen)
    w_t = torch.randint(-127, 128, (32, 16), generator=gen, dtype=torch.int8)
    args = (x, w_t, torch.rand(16, generator=gen) * 0.01 + 1e-3, torch.randn(16, generator=gen))
    torch.library.opcheck(torch.ops.diffq.w8a8_dynamic_linear.default, args)
    assert library.w8a8_dynamic_linear(*args).shape == (3, 5, 16)
