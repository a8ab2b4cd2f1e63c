"""W4A16 kernel on diffq's own int4 storage vs the fp32 matmul with the dequantized weight;
the output is fp16, so the bound is about one fp16 rounding."""
import pytest
import torch

pytest.importorskip("triton")
from diffq.core.recipe import WeightSpec  # noqa: E402
from diffq.core.weights import quantize_weight  # noqa: E402
from diffq.kernels import w4a16_gemm  # noqa: E402
from tests.kernels.conftest import rel_err  # noqa: E402

pytestmark = pytest.mark.triton


def _weight(gen, group, symmetric, scale_dtype="float16"):
    w = torch.randn(40, 256, generator=gen)  # N = 40: not a column-block multiple
    return quantize_weight(w, WeightSpec("int4", "per_group", group, symmetric, scale_dtype=scale_dtype))


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("rows", [1, 37])  # GEMV path, GEMM path (rows not a block multiple)
def test_vs_dequantized_fp32_matmul(gen, device, group, symmetric, rows):
    qw = _weight(gen, group, symmetric)
    assert (qw.zero_point is None) == symmetric
    x = torch.randn(rows, 256, generator=gen).half()
    b = torch.randn(40, generator=gen)
    z = None if qw.zero_point is None else qw.zero_point.to(device)
    y = w4a16_gemm.w4a16_matmul(x.to(device), qw.data.to(device), qw.scale.to(device), z, b.to(device), group)
    ref = x.float() @ qw.dequantize(torch.float32).T + b
    assert y.shape == (rows, 40) and y.dtype == torch.float16
    assert rel_err(y, ref) < 1e-3


@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16"])
def test_bf16_decode_without_bias(gen, device, scale_dtype):
    qw = _weight(gen, 64, False, scale_dtype)
    x = torch.randn(2, 1, 256, generator=gen).bfloat16()  # two rows: the GEMV path, [..., K] input
    y = w4a16_gemm.w4a16_matmul(x.to(device), qw.data.to(device), qw.scale.to(device),
                                qw.zero_point.to(device), None, 64)
    ref = x.float() @ qw.dequantize(torch.float32).T
    assert y.shape == (2, 1, 40) and y.dtype == torch.bfloat16
    assert rel_err(y, ref) < 8e-3  # bf16 output rounding (eps 2^-7)
