"""ActivationSpec.float_prefix: leading tokens (a text encoder's BOS row) kept out of the
static activation range and multiplied with float activations."""
import pytest
import torch
from torch import nn

import diffq
from diffq import ops
from diffq.core import sqnr_db
from diffq.core.recipe import ActivationSpec, Override, Recipe, WeightSpec
from diffq.errors import RecipeError
from diffq.nn import QLinear


class CrossKV(nn.Module):
    """A cross-attention K projection fed text states whose token 0 is a fixed outlier row,
    as CLIP's BOS state is in SD-class models (tens of times the other tokens)."""

    def __init__(self) -> None:
        super().__init__()
        self.to_k = nn.Linear(64, 32)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.to_k(states)


def _states(n: int, seed: int, bos: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, 64, generator=g)
    x[:, 0] = bos
    return x


def _recipe(prefix: int) -> Recipe:
    act = ActivationSpec(timestep_groups=1, float_prefix=prefix)
    # verify=False: the prefix mechanism alone (verification would rescue prefix 0 by itself)
    return Recipe(name=f"prefix{prefix}", weights=WeightSpec(clip="mse"), activations=act, verify=False)


@pytest.fixture
def bos() -> torch.Tensor:
    return torch.randn(64, generator=torch.Generator().manual_seed(7)) * 40


def test_prefix_rows_use_float_activations_and_the_rest_is_unchanged(bos):
    torch.manual_seed(0)
    model, calib = CrossKV(), _states(4, 0, bos)
    diffq.quantize(model, _recipe(1), calibration=[calib])
    q: QLinear = model.to_k
    x = _states(2, 1, bos)
    with torch.no_grad():
        out = q(x)
        head = ops.linear(x[:, :1], q.quantized_weight, q.bias, None, q.kernel_cache)
        tail = ops.linear(x[:, 1:], q.quantized_weight, q.bias, q.act_params(), q.kernel_cache)
    assert torch.equal(out[:, :1], head)
    assert torch.equal(out[:, 1:], tail)
    # minmax range of tokens 1.. only, far below the BOS row's max
    amax = float(q.input_quant.scale) * 127
    assert amax == pytest.approx(float(calib[:, 1:].abs().max()), rel=1e-6)
    assert amax < 0.5 * float(bos.abs().max())


def test_float_prefix_removes_the_bos_outlier_error(bos):
    """Without the prefix the BOS row sets the int8 step for every token; with it, the other
    tokens get their own range. Floors: tokens 1.. >= 35 dB (int8 weights and activations)."""
    calib, held_out = [_states(4, s, bos) for s in range(3)], _states(4, 9, bos)
    outs = {}
    for prefix in (0, 1):
        torch.manual_seed(0)
        model = CrossKV()
        with torch.no_grad():
            ref = model(held_out)
        diffq.quantize(model, _recipe(prefix), calibration=calib)
        with torch.no_grad():
            outs[prefix] = model(held_out)
    rest = {p: sqnr_db(ref[:, 1:], o[:, 1:]) for p, o in outs.items()}
    assert rest[1] >= 35.0
    assert rest[1] > rest[0] + 10.0
    # the BOS row itself only carries weight error (int8 per channel, MSE clipped)
    assert sqnr_db(ref[:, :1], outs[1][:, :1]) >= 35.0


def test_float_prefix_survives_save_and_load(bos, tmp_path):
    torch.manual_seed(0)
    model = diffq.quantize(CrossKV(), _recipe(1), calibration=[_states(4, 0, bos)])
    x = _states(2, 3, bos)
    diffq.save(model, tmp_path / "ck")
    again = diffq.load(tmp_path / "ck", CrossKV())
    assert again.to_k.input_quant.spec.float_prefix == 1
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_float_prefix_in_an_override_and_bad_values():
    act = ActivationSpec(timestep_groups=1, float_prefix=1)
    r = Recipe(activations=ActivationSpec(timestep_groups=1),
               overrides=[Override(match=["*to_k"], weights=WeightSpec(), activations=act)])
    assert r.plan_for("attn2.to_k").activations.float_prefix == 1
    assert r.plan_for("attn2.to_q").activations.float_prefix == 0
    with pytest.raises(RecipeError, match="float_prefix must be >= 0"):
        ActivationSpec(float_prefix=-1).validate()
