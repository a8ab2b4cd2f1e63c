"""diffq.quantize with weights chosen from calibration data: GPTQ, AWQ, SmoothQuant."""
import pytest
import torch
from torch import nn

import diffq
from diffq.core.recipe import ActivationSpec, GPTQOptions, Recipe, WeightSpec
from diffq.errors import CalibrationError, RecipeError
from diffq.nn import QConv2d, QLinear
from tests.conftest import ToyUNet, assert_same_state, toy_calibration


class MLP(nn.Module):
    """Takes keyword arguments like a transformers model, so calibration items are dicts."""

    def __init__(self, d: int = 64):
        super().__init__()
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.gelu(self.up(hidden_states)))


def mlp_inputs(g: torch.Generator, n: int, mix: torch.Tensor) -> torch.Tensor:
    """Correlated features [n, 16, d] (latent factors through `mix` [8, d], plus noise) with 4
    outlier channels, like LLM hidden states."""
    x = torch.randn(n, 16, 8, generator=g) @ mix + 0.2 * torch.randn(n, 16, mix.shape[1], generator=g)
    x[..., :4] *= 8
    return x


def _rel_error(model: nn.Module, ref_model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        ref = ref_model(hidden_states=x)
        return float((model(hidden_states=x) - ref).pow(2).sum() / ref.pow(2).sum())


def _quantized_mlp(recipe: Recipe, seed: int) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    ref = MLP()
    model = MLP()
    model.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(8, 64, generator=g)
    calib = [{"hidden_states": mlp_inputs(g, 8, mix)} for _ in range(8)]
    diffq.quantize(model, recipe, calibration=calib)
    return model, ref, mlp_inputs(g, 16, mix)  # held out, same distribution


W4 = WeightSpec("int4", "per_group", group_size=32)


# Measured over seeds 0..9 (held-out inputs): model output error relative to RTN's
# 0.028-0.045 for GPTQ, 0.66-0.92 for AWQ; SmoothQuant / plain W8A8 0.39-0.49.
@pytest.mark.parametrize("method, bound", [("gptq", 0.2), ("awq", 0.95)])
def test_gptq_and_awq_mlp_beat_rtn_end_to_end(method, bound):
    for seed in range(3):
        rtn, ref, x = _quantized_mlp(Recipe(weights=W4), seed)
        spec = WeightSpec("int4", "per_group", group_size=32, method=method)
        q, _, _ = _quantized_mlp(Recipe(weights=spec), seed)
        assert isinstance(q.up, QLinear) and q.up.qweight.dtype == torch.uint8
        assert _rel_error(q, ref, x) < bound * _rel_error(rtn, ref, x)
        assert hasattr(q.up, "input_scale") == (method == "awq")
        assert f"[{method}" in q.diffq.report.quantized["up"]


def test_smoothquant_recipe_reduces_w8a8_error():
    plain = Recipe(weights=WeightSpec("int8"),
                   activations=ActivationSpec(mode="dynamic", granularity="per_token"))
    smooth = Recipe(weights=WeightSpec("int8"),
                    activations=ActivationSpec(mode="dynamic", granularity="per_token",
                                               smoothing="smoothquant"))
    p, ref, x = _quantized_mlp(plain, 0)
    s, _, _ = _quantized_mlp(smooth, 0)
    assert _rel_error(s, ref, x) < 0.6 * _rel_error(p, ref, x)
    assert "smoothquant α=" in s.diffq.report.quantized["up"]
    # a fixed α needs no samples and gives the paper's formula
    fixed = Recipe(weights=WeightSpec("int8"),
                   activations=ActivationSpec(mode="dynamic", granularity="per_token",
                                              smoothing="smoothquant", smooth_alpha=0.5))
    f, _, _ = _quantized_mlp(fixed, 0)
    assert "α=0.50" in f.diffq.report.quantized["up"]


@pytest.mark.parametrize("recipe", ["w4a16", "w4a8", "llm-w4a16-awq", "llm-w8a8-smoothquant", "fp8"])
def test_new_recipes_on_toy_unet_round_trip(recipe, tmp_path):
    torch.manual_seed(0)
    m = ToyUNet()
    data = toy_calibration(8)
    x, t = data[0]
    with torch.no_grad():
        ref = m(x, t)
    diffq.quantize(m, recipe, calibration=data)
    with torch.no_grad():
        y = m(x, t)
    assert diffq.core.sqnr_db(ref, y) > 15
    diffq.save(m, tmp_path / "ck")
    m2 = diffq.load(tmp_path / "ck", ToyUNet())
    assert_same_state(m, m2)
    with torch.no_grad():
        assert torch.equal(m2(x, t), y)


def test_awq_conv_input_scale_round_trips_and_survives_dtype_casts(tmp_path):
    torch.manual_seed(0)
    m = ToyUNet()
    data = toy_calibration(4)
    spec = WeightSpec("int4", "per_group", group_size=64, method="awq", clip="mse")
    diffq.quantize(m, Recipe(weights=spec, skip=["conv_in", "conv_out"]), calibration=data)
    assert isinstance(m.down, QConv2d) and m.down.input_scale.shape == (64,)
    assert "awq α=" in m.diffq.report.quantized["down"]
    assert "grouped conv" in m.diffq.report.quantized["mid"]  # no Hessian there: plain RTN
    assert not hasattr(m.mid, "input_scale")
    h = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        y32 = m.down(h)
        m.to(torch.bfloat16)
        assert m.down.input_scale.dtype == torch.float32
        y16 = m.down(h.bfloat16())
    assert y16.dtype == torch.bfloat16
    assert diffq.core.sqnr_db(y32, y16.float()) > 30  # bf16 rounding only


def test_gptq_options_reach_the_algorithm():
    torch.manual_seed(0)
    spec = WeightSpec("int4", "per_group", group_size=32, method="gptq",
                      gptq=GPTQOptions(block_size=16, act_order=True, damp=0.1))
    q, ref, x = _quantized_mlp(Recipe(weights=spec), 0)
    default, _, _ = _quantized_mlp(Recipe(weights=WeightSpec("int4", "per_group", group_size=32,
                                                             method="gptq")), 0)
    assert not torch.equal(q.up.qweight, default.up.qweight)


def test_errors_name_the_problem():
    gptq = Recipe(weights=WeightSpec("int4", "per_group", group_size=32, method="gptq"))
    with pytest.raises(CalibrationError, match="weights.method"):
        diffq.quantize(MLP(), gptq)
    awq_static = Recipe(weights=WeightSpec(method="awq"), activations=ActivationSpec())
    with pytest.raises(RecipeError, match="awq"):
        diffq.quantize(MLP(), awq_static, calibration=[{"hidden_states": torch.randn(2, 64)}])
