"""Numerics of every format x granularity against the float64 reference.

Integer formats must match the uniform-noise model: a step of d = scale gives noise power
d^2 / 12, so SQNR = 10 log10(E[x^2] / E[d^2 / 12]). For int8 per channel on Gaussian rows of 512
(absmax ~ 3.2 sigma) that predicts ~42.5 dB, the "near 40 dB" of the issue; we require the
measurement within 1.5 dB of the prediction (a real quantizer cannot beat it, a broken one
misses it). Float and code-book formats get floors a little below their measured levels
(e4m3 31.5, e5m2 25.6, nf4/g64 20.7 dB on this data), explained by their mantissa width.
"""
import math

import pytest
import torch

from diffq.core import (
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    choose_qparams,
    dequantize,
    fake_quantize,
    get_format,
    quantize,
    sqnr_db,
)
from diffq.core.granularity import blocked
from diffq.errors import RecipeError

GRANS = [PerTensor(), PerChannel(0), PerChannel(1), PerGroup(32), PerGroup(64), PerGroup(128)]



@pytest.mark.parametrize("fmt_name", ["int8", "int4"])
@pytest.mark.parametrize("gran", GRANS, ids=str)
def test_int_sqnr_matches_uniform_noise_model(fmt_name, gran, gen):
    x = torch.randn(128, 512, generator=gen)
    fmt = get_format(fmt_name)
    qp = choose_qparams(x, fmt, gran)
    xb = blocked(x, gran)
    step2 = (qp.scale.double() ** 2).expand_as(xb).mean()
    predicted = 10 * math.log10(float(x.double().pow(2).mean() / (step2 / 12)))
    measured = sqnr_db(x, fake_quantize(x, qp, fmt, gran))
    assert abs(measured - predicted) < 1.5, (measured, predicted)
    floor = {"int8": 38.0, "int4": 13.0}[fmt_name]
    assert measured > floor


@pytest.mark.parametrize("fmt_name,floor", [("fp8_e4m3", 30.0), ("fp8_e5m2", 24.0)])
@pytest.mark.parametrize("gran", GRANS, ids=str)
def test_fp8_sqnr(fmt_name, floor, gran, gen):
    x = torch.randn(128, 512, generator=gen)
    fmt = get_format(fmt_name)
    qp = choose_qparams(x, fmt, gran)
    q = quantize(x, qp, fmt, gran)
    assert q.dtype == fmt.storage
    assert sqnr_db(x, fake_quantize(x, qp, fmt, gran)) > floor


@pytest.mark.parametrize("gs", [32, 64, 128])
def test_nf4_sqnr_and_codes(gs, gen):
    x = torch.randn(64, 256, generator=gen)
    fmt = get_format("nf4")
    qp = choose_qparams(x, fmt, PerGroup(gs))
    q = quantize(x, qp, fmt, PerGroup(gs))
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    assert sqnr_db(x, fake_quantize(x, qp, fmt, PerGroup(gs))) > 19.5


def test_nf4_picks_nearest_code(gen):
    from diffq.core.formats import NF4_CODE

    x = torch.rand(1000, generator=gen) * 2 - 1
    qp = choose_qparams(torch.ones(1), get_format("nf4"), PerTensor())  # scale 1
    q = quantize(x, qp, get_format("nf4"), PerTensor())
    brute = (x[:, None] - torch.tensor(NF4_CODE)[None]).abs().argmin(1)
    assert torch.equal(q.long(), brute)


def test_codes_stay_in_range(gen):
    x = torch.randn(32, 64, generator=gen) * 10
    for name in ("int8", "int4"):
        fmt = get_format(name)
        q = quantize(x, choose_qparams(x, fmt, PerChannel(0)), fmt, PerChannel(0))
        assert q.dtype == torch.int8 and q.min() >= fmt.qmin and q.max() <= fmt.qmax


def test_asymmetric_beats_symmetric_on_one_sided_data(gen):
    x = torch.randn(64, 256, generator=gen).abs()  # like a post-ReLU activation
    fmt = get_format("int8")
    sym = sqnr_db(x, fake_quantize(x, choose_qparams(x, fmt, PerChannel(0)), fmt, PerChannel(0)))
    qp = choose_qparams(x, fmt, PerChannel(0), symmetric=False)
    assert qp.zero_point is not None and qp.zero_point.dtype == torch.int32
    asym = sqnr_db(x, fake_quantize(x, qp, fmt, PerChannel(0)))
    assert asym > sym + 4.0  # one extra bit of range used: ~6 dB in theory


def test_per_token_dynamic_handles_outlier_tokens(gen):
    x = torch.randn(2, 16, 64, generator=gen)
    x[0, 3] *= 100  # one outlier token
    fmt = get_format("int8")
    per_tensor = sqnr_db(x[1], fake_quantize(x, choose_qparams(x, fmt, PerTensor()), fmt, PerTensor())[1])
    qp = choose_qparams(x, fmt, PerToken(-1))
    assert qp.scale.shape == (2, 16, 1)
    per_token = sqnr_db(x[1], fake_quantize(x, qp, fmt, PerToken(-1))[1])
    assert per_token > 38 and per_token > per_tensor + 20


def test_zero_tensor_is_exact():
    x = torch.zeros(4, 64)
    for name in ("int8", "int4", "fp8_e4m3", "nf4"):
        fmt = get_format(name)
        qp = choose_qparams(x, fmt, PerGroup(32))
        assert torch.isfinite(qp.scale).all()
        assert torch.equal(fake_quantize(x, qp, fmt, PerGroup(32)), x)


def test_dequantize_matches_float64_formula(gen):
    x = torch.randn(16, 64, generator=gen)
    fmt = get_format("int8")
    qp = choose_qparams(x, fmt, PerGroup(32), symmetric=False)
    q = quantize(x, qp, fmt, PerGroup(32))
    ref = (q.double() - qp.zero_point.double()) * qp.scale.double()
    assert torch.allclose(dequantize(q, qp, fmt, torch.float64), ref, rtol=1e-6, atol=0)
    # and the reconstruction error is at most half a step per element
    err = (ref - blocked(x, PerGroup(32)).double()).abs()
    assert (err <= qp.scale.double() / 2 + 1e-6).all()


def test_fp8_has_no_zero_point():
    with pytest.raises(ValueError):
        choose_qparams(torch.randn(4, 4), get_format("fp8_e4m3"), PerTensor(), symmetric=False)
    with pytest.raises(RecipeError):
        get_format("int9")


def test_group_must_divide():
    with pytest.raises(ValueError, match="does not divide"):
        choose_qparams(torch.randn(4, 48), get_format("int4"), PerGroup(32))
