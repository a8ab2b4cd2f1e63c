"""int4_i8: int4 groups with integer multipliers of one scale per row (QServe's progressive
group quantization), stored as nibbles + multiplier bytes, multiplied as int8 codes."""
import pytest
import torch

from diffq.algos.gptq import gptq
from diffq.core.progressive import U_MAX
from diffq.core.recipe import WeightSpec
from diffq.core.weights import QuantizedWeight, quantize_weight
from diffq.errors import RecipeError
from tests.algos.naive_obq import naive_obq

G = 32


def _spec(**kw) -> WeightSpec:
    return WeightSpec(**{"format": "int4_i8", "granularity": "per_group", "group_size": G,
                         "scale_dtype": "float16", **kw})


def _weight(gen, rows=48, k=128):
    w = torch.randn(rows, k, generator=gen)
    w[:, 7] *= 25  # an outlier column: its groups need large multipliers, the others small
    return w


def _rel_mse(a, b):
    return float((a - b).pow(2).mean() / b.pow(2).mean())


@pytest.mark.parametrize("clip", ["none", "mse"])
def test_codes_are_int4_times_an_integer_multiplier_per_group(clip, gen):
    qw = quantize_weight(_weight(gen), _spec(clip=clip))
    codes = qw.codes()
    assert codes.dtype == torch.int8 and codes.shape == (48, 128) and qw.scale.shape == (48, 1)
    cb = codes.to(torch.int32).reshape(48, -1, G)
    found = torch.zeros(cb.shape[:2], dtype=torch.bool)
    for u in range(1, U_MAX + 1):  # some u in 1..16 divides the group with quotients in [-8, 7]
        q = cb // u
        found |= ((cb % u == 0) & (q >= -8) & (q <= 7)).all(-1)
    assert found.all()
    assert int(codes.min()) >= -128 and int(codes.max()) <= 112
    # dequantizing is codes times the row scale, in the weight's shape
    assert torch.equal(qw.dequantize(), codes.float() * qw.scale.float())


def test_storage_is_nibbles_plus_one_byte_per_group(gen):
    qw = quantize_weight(_weight(gen), _spec())
    assert qw.data.dtype == torch.uint8 and qw.data.shape == (48, 128 // 2 + 128 // G)
    assert qw.nbytes == 48 * (64 + 4) + 48 * 2  # 4.25 bits a weight + an fp16 scale per row
    assert _spec().bits == 4


def test_error_is_close_to_float_group_scales_and_far_below_per_channel_int4(gen):
    w = _weight(gen)
    err = {name: _rel_mse(quantize_weight(w, spec).dequantize(), w) for name, spec in {
        "int4_i8": _spec(clip="mse"),
        "int4 g32": WeightSpec("int4", "per_group", G, clip="mse", scale_dtype="float16"),
        "int4 per channel": WeightSpec("int4", "per_channel", clip="mse")}.items()}
    assert err["int4_i8"] < 1.1 * err["int4 g32"], err
    assert err["int4_i8"] < 0.5 * err["int4 per channel"], err


def test_mse_search_is_never_worse_than_the_range_on_any_row(gen):
    """clip "mse" searches the row scale and each group's multiplier; the plain range (ratio
    1, the smallest multiplier that holds each group) is among its candidates."""
    w = _weight(gen)
    rtn, mse = (quantize_weight(w, _spec(clip=c)).dequantize() for c in ("none", "mse"))
    per_row = lambda d: (d - w).pow(2).sum(-1)  # noqa: E731
    assert (per_row(mse) <= per_row(rtn) * (1 + 1e-6)).all()
    assert per_row(mse).sum() < 0.95 * per_row(rtn).sum()


def test_store_factors_any_codes_on_the_grid_and_refuses_others(gen):
    spec = _spec()
    layout, shape = spec.layout(), (2, 2 * G)
    codes = torch.zeros(2, 2 * G, dtype=torch.int8)
    codes[0, :G] = torch.arange(-8, 8).repeat(2) * 16  # u = 16, includes -128
    codes[0, G:] = 0  # an all-zero group
    codes[1, :G] = torch.arange(-8, 8).repeat(2) * 2 * 3  # u = 6 after the gcd (2 * 3)
    codes[1, G:] = 4  # every code a multiple of 4: stored as q = 1, u = 4
    scale = torch.ones(2, 1)
    qw = QuantizedWeight.from_codes(codes, scale, None, layout, shape)
    assert torch.equal(qw.codes(), codes)
    bad = codes.clone()
    bad[1, G] = 17  # 17 and 4 share no multiplier with quotients in [-8, 7]
    with pytest.raises(ValueError, match="not int4 x integer multiples"):
        QuantizedWeight.from_codes(bad, scale, None, layout, shape)


def test_gptq_matches_the_naive_reference_and_beats_round_to_nearest(gen):
    w = _weight(gen, rows=16, k=96)
    x = torch.randn(512, 96, generator=gen)
    x[:, 3] *= 8
    h = x.t() @ x / 512
    spec = _spec(clip="mse", method="gptq")
    q = gptq(w, h, spec)
    assert q.layout == spec.layout() and q.data.shape == (16, 48 + 3)
    ref = naive_obq(w.double(), h.double(), spec)
    assert torch.allclose(q.dequantize().double(), ref, atol=1e-6)
    out_err = lambda wq: float((x @ (wq - w).t()).pow(2).mean())  # noqa: E731
    assert out_err(q.dequantize()) < out_err(quantize_weight(w, spec).dequantize())


def test_recipe_refuses_what_int4_i8_cannot_store():
    with pytest.raises(RecipeError, match="per_group and symmetric"):
        _spec(granularity="per_channel").validate()
    with pytest.raises(RecipeError, match="per_group and symmetric"):
        _spec(symmetric=False).validate()
