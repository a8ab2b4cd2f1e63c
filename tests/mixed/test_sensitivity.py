import pytest
import torch
from torch import nn

from diffq.core.recipe import WeightSpec
from diffq.core.weights import quantize_weight
from diffq.mixed.sensitivity import (
    measure_allocation,
    measure_sensitivity,
    proxy_error,
    record_calls,
)

W4 = WeightSpec(format="int4", granularity="per_group", group_size=16)
W8 = WeightSpec(format="int8")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 16, 2, padding=1)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x, scale=1.0):
        h = self.conv(x).mean(dim=(2, 3))
        return self.fc2(torch.relu(self.fc1(h))) * scale


def _setup():
    torch.manual_seed(0)
    net = Net().eval()
    calls = [((torch.randn(2, 4, 6, 6),), {"scale": 1.0}) for _ in range(3)]
    layers = {n: m for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    return net, calls, layers


def test_table_orders_widths_and_restores_weights():
    net, calls, layers = _setup()
    before = {n: m.weight.clone() for n, m in layers.items()}
    table = measure_sensitivity(net, layers, calls, {n: {4: W4, 8: W8} for n in layers})
    assert table.bits == [4, 8, 16]
    assert (table.error[:, 2] == 0).all()
    assert (table.error[:, 0] > table.error[:, 1]).all() and (table.error[:, 1] > 0).all()
    assert (table.proxy[:, 0] > table.proxy[:, 1]).all()
    for n, m in layers.items():
        assert torch.equal(m.weight, before[n])


def test_single_layer_allocation_reproduces_its_table_entry():
    net, calls, layers = _setup()
    table = measure_sensitivity(net, layers, calls, {n: {4: W4, 8: W8} for n in layers})
    measured = measure_allocation(net, layers, calls, {"fc1": W4, "conv": None, "fc2": None})
    i = table.layers.index("fc1")
    assert abs(measured - table.error[i, 0].item()) <= 1e-9 * table.error[i, 0].item()
    both = measure_allocation(net, layers, calls, {"fc1": W4, "conv": W4, "fc2": W4})
    assert both > measured  # adding quantized layers adds error


def test_proxy_equals_exact_layer_error_for_decorrelated_inputs():
    # With independent zero-mean inputs E[(dW x)^2] = sum dW^2 E[x^2]: the proxy is exact.
    torch.manual_seed(1)
    lin = nn.Linear(64, 32, bias=False)
    x = torch.randn(200000, 64, dtype=torch.float64) * torch.linspace(0.1, 3, 64, dtype=torch.float64)
    deq = quantize_weight(lin.weight, W4).dequantize()
    w = lin.weight.double()
    exact = ((x @ (deq.double() - w).T).pow(2).sum() / (x @ w.T).pow(2).sum()).item()
    approx = proxy_error(lin.weight, deq, x.pow(2).mean(0), 1)
    assert abs(approx - exact) / exact < 0.02


def test_record_calls_keeps_selected_calls():
    net, _, _ = _setup()
    inputs = [torch.randn(1, 4, 6, 6) for _ in range(5)]

    def drive():
        for i, x in enumerate(inputs):
            net(x, scale=float(i))

    calls = record_calls(net, drive, keep=lambda i: i % 2 == 0)
    assert len(calls) == 3
    assert torch.equal(calls[1][0][0], inputs[2]) and calls[1][1]["scale"] == 2.0


def test_width_a_layer_does_not_offer_is_infinite_and_not_chosen():
    net, calls, layers = _setup()
    cands = {n: {4: W4, 8: W8} for n in layers}
    del cands["conv"][4]
    table = measure_sensitivity(net, layers, calls, cands)
    i = table.layers.index("conv")
    assert table.error[i, 0] == float("inf") and torch.isfinite(table.error[i, 1])


def test_group_size_falls_back_to_a_power_of_two_divisor():
    from diffq.core.recipe import MinBits, MixedSpec
    from diffq.mixed.plan import fit_group, layer_candidates

    g64 = WeightSpec(format="int4", granularity="per_group", group_size=64)
    assert fit_group(g64, 128) == g64
    assert fit_group(g64, 288).group_size == 32  # a 3x3 conv over 32 channels
    assert fit_group(g64, 8 * 9) is None  # no group >= 16 divides 72
    mixed = MixedSpec(candidates=[g64, W8], target_bits=5, min_bits=[MinBits(["*attn*"], 8)])
    c = layer_candidates(mixed, {"a.conv": (4, 32, 3, 3), "b.attn.to_q": (4, 64), "c": (4, 72)})
    assert c["a.conv"][4].group_size == 32 and set(c["b.attn.to_q"]) == {8} and set(c["c"]) == {8}


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_with_mixed_recipe_meets_budget_and_beats_uniform_low_width(method):
    from dataclasses import replace

    import diffq
    from diffq.api import plan_mixed, weight_bytes
    from diffq.core.recipe import MixedSpec, Recipe

    net, calls, layers = _setup()
    ref = [net(*a, **k) for a, k in calls]
    mixed = Recipe(name="m", weights=W8,
                   mixed=MixedSpec(candidates=[replace(W4, method=method), W8], target_bits=6.0,
                                   allow_float=False, prompts=3, timesteps=1))
    result = plan_mixed(net, mixed, calls)
    assert result.allocation.average_bits <= 6.0
    assert set(result.allocation.bits.values()) <= {4, 8}
    assert result.measured_error > 0

    def err(model):
        out = [model(*a, **k) for a, k in calls]
        return sum(((o - r) ** 2).sum() for o, r in zip(out, ref, strict=True)).item()

    import copy
    uniform = diffq.quantize(copy.deepcopy(net), Recipe(name="u", weights=W4))
    chosen = diffq.quantize(copy.deepcopy(net), mixed, calibration=calls)
    assert {type(m).__name__ for m in chosen.modules()} >= {"QLinear"}
    assert err(chosen) < err(uniform)
    assert weight_bytes(chosen) > weight_bytes(uniform)
    kept = chosen.diffq.report.mixed  # the evidence behind the widths stays with the model
    assert kept.allocation.average_bits <= 6.0 and kept.table.layers == list(layers)
    assert uniform.diffq.report.mixed is None


def test_mixed_bad_input_is_one_clear_error():
    import diffq
    from diffq.api import plan_mixed
    from diffq.core.recipe import MixedSpec, Recipe
    from diffq.errors import CalibrationError, RecipeError

    net, calls, _ = _setup()
    mixed = Recipe(name="m", weights=W8, mixed=MixedSpec(candidates=[W4, W8], target_bits=6.0))
    with pytest.raises(RecipeError, match="no 'mixed' section"):
        plan_mixed(net, Recipe(name="plain", weights=W8), calls)
    with pytest.raises(CalibrationError, match="needs calibration items"):
        plan_mixed(net, mixed, [])
    with pytest.raises(CalibrationError, match="pass a list, not a callable"):
        diffq.quantize(net, mixed, calibration=lambda: None)
