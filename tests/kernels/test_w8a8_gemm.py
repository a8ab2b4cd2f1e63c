"""W8A8 GEMM kernel: the int32 accumulation is exact, so the fused epilogue is compared with a
float64 reference at fp32 rounding (out fp32) or the output dtype's rounding (fp16 / bf16)."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
from diffq.kernels import w8a8_gemm  # noqa: E402
from diffq.ops import library  # noqa: E402
from tests.kernels.conftest import rel_err  # noqa: E402

pytestmark = pytest.mark.triton

ACT = {"none": lambda y: y, "silu": F.silu, "gelu": F.gelu}


def _codes(gen, *shape):
    return torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8)


def test_int32_accumulation_is_exact(gen, device):
    qx, qw = _codes(gen, 50, 96), _codes(gen, 40, 96)  # M = 50: not a block multiple
    ones = torch.ones(40, device=device)
    y = w8a8_gemm.w8a8_matmul(qx.to(device), qw.to(device), ones[:1], ones, out_dtype=torch.float32)
    # |acc| <= 96 * 128^2 < 2^24, so fp32 holds the int32 sum exactly
    assert torch.equal(y.cpu(), (qx.long() @ qw.long().T).float())


@pytest.mark.parametrize("activation", ["none", "silu", "gelu"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("per_token", [False, True])
def test_epilogue_vs_float64(gen, device, activation, with_bias, per_token):
    m, n, k = 37, 48, 64
    qx, qw = _codes(gen, m, k), _codes(gen, n, k)
    xs = torch.rand(m if per_token else 1, generator=gen) * 0.02 + 1e-3
    ws = torch.rand(n, generator=gen) * 0.01 + 1e-3
    bias = torch.randn(n, generator=gen) if with_bias else None
    y = w8a8_gemm.w8a8_matmul(qx.to(device), qw.to(device), xs.to(device), ws.to(device),
                              None if bias is None else bias.to(device), activation, torch.float32)
    ref = (qx.double() @ qw.double().T) * xs.double().reshape(-1, 1) * ws.double()
    ref = ACT[activation](ref if bias is None else ref + bias.double())
    assert rel_err(y, ref) < 1e-6


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_half_outputs_round_once(gen, device, out_dtype):
    qx, qw = _codes(gen, 33, 64), _codes(gen, 40, 64)
    ws = torch.rand(40, generator=gen) * 0.01 + 1e-3
    bias = torch.randn(40, generator=gen)
    y = w8a8_gemm.w8a8_matmul(qx.to(device), qw.to(device), torch.full((1,), 0.01, device=device),
                              ws.to(device), bias.to(device), "silu", out_dtype)
    assert y.dtype == out_dtype
    ref = F.silu((qx.double() @ qw.double().T) * 0.01 * ws.double() + bias.double())
    assert rel_err(y, ref) < torch.finfo(out_dtype).eps / 2  # one rounding of each element


@pytest.mark.parametrize("rows", [1, 45])
def test_linear_static_matches_the_op_reference(gen, device, rows):
    x = torch.randn(rows, 80, generator=gen)  # M = 1 is the decode (GEMV-like) call
    qw = _codes(gen, 24, 80)
    ws = torch.rand(24, generator=gen) * 0.01 + 1e-3
    y = w8a8_gemm.w8a8_linear(x.to(device), qw.to(device), ws.to(device), None, 0.02)
    ref = library.linear_reference(x.double(), qw, ws.double(), None, torch.tensor([0.02]))
    assert y.shape == (rows, 24) and y.dtype == torch.float32
    assert rel_err(y, ref) < 1e-6


def test_linear_dynamic_per_token(gen, device):
    x = torch.randn(2, 19, 64, generator=gen) * torch.rand(2, 19, 1, generator=gen) * 4
    qw = _codes(gen, 32, 64)
    ws = torch.rand(32, generator=gen) * 0.01 + 1e-3
    b = torch.randn(32, generator=gen)
    y = w8a8_gemm.w8a8_linear(x.to(device), qw.to(device), ws.to(device), b.to(device), None)
    s = x.abs().amax(-1, keepdim=True) / 127
    xq = torch.round(x / s).clamp(-128, 127).double() * s.double()
    ref = xq @ (qw.double() * ws.double()[:, None]).T + b.double()
    assert rel_err(y, ref) < 1e-6
