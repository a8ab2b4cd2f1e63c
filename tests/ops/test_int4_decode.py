"""Weight-only int4 per-group decode on CPU: torch's packed int4 kernel vs the reference."""
import pytest
import torch
from torch import nn

from diffq.core.recipe import WeightSpec
from diffq.nn import QLinear


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # fp32 rows: the kernel in bf16
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("rows,group", [(1, 128), (8, 32), (128, 64)])
def test_int4_decode_kernel_matches_reference(rows, group, symmetric, dtype, gen, monkeypatch):
    calls = []
    real = torch._weight_int4pack_mm_for_cpu
    monkeypatch.setattr(torch, "_weight_int4pack_mm_for_cpu", lambda *a: calls.append(1) or real(*a))
    spec = WeightSpec(format="int4", granularity="per_group", group_size=group, symmetric=symmetric)
    lin = nn.Linear(256, 96)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(96, 256, generator=gen) * 0.05)
    layer = QLinear(lin, spec, None).to(dtype)
    x = torch.randn(1, rows, 256, generator=gen).to(dtype)
    fast = layer(x)
    assert calls == [1]
    # float64 reference on the same codes; bf16 scales / output rounding: ~1e-2 relative
    w = layer.quantized_weight.dequantize(torch.float64)
    ref = x.double() @ w.t() + lin.bias.double()
    assert fast.shape == (1, rows, 96) and fast.dtype == dtype
    assert _rel(fast, ref) < 1.5e-2
    layer.backend = "reference"
    assert _rel(layer(x), ref) < 1.5e-2


def test_int4_decode_skips_batched_and_unsupported_shapes(gen, monkeypatch):
    monkeypatch.setattr(torch, "_weight_int4pack_mm_for_cpu", lambda *a: pytest.fail("kernel ran"))
    spec = WeightSpec(format="int4", granularity="per_group", group_size=64)
    big = QLinear(nn.Linear(128, 32), spec, None).to(torch.bfloat16)
    big(torch.randn(129, 128, generator=gen).to(torch.bfloat16))  # > 128 rows: dequantize path
    odd = QLinear(nn.Linear(128, 24), spec, None).to(torch.bfloat16)  # 24 % 16 != 0
    assert odd(torch.randn(1, 128, generator=gen).to(torch.bfloat16)).shape == (1, 24)
