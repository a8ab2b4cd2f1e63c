"""The fused activation quantization of the CPU int8 kernels gives the reference grid's codes
exactly (oneDNN's u8 = int8 code + 128), compiled or eager, and falls back to eager when the
compiler cannot run."""
import pytest
import torch

from diffq.ops import fused, reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [3, 300])  # eager below fused._SMALL elements, compiled above
def test_codes_equal_the_reference_grid(dtype, rows, gen):
    x = (torch.randn(rows, 96, generator=gen) * torch.logspace(-2, 2, 96)).to(dtype)
    x[0, :4] = torch.tensor([0.5, -0.5, 1.5, 1e6]).to(dtype)  # ties round to even; a clamp
    scale = torch.rand(96, generator=gen) * 0.05 + 1e-3
    u8 = fused.u8_static(x, scale)
    assert u8.dtype == torch.uint8 and u8.shape == x.shape
    ref = reference.int8_codes(x, scale)
    assert torch.equal(u8.to(torch.int16) - 128, ref.to(torch.int16))
    u8, s = fused.u8_dynamic(x)
    codes, s_ref = reference.quantize_act(x, None, [96])
    assert torch.equal(u8.to(torch.int16) - 128, codes.to(torch.int16)) and torch.equal(s, s_ref)


@pytest.mark.parametrize("rows", [3, 300])
def test_smoothing_factor_in_one_pass(rows, gen):
    """x times a SmoothQuant factor, one pass: the fp32 product rounded to x's dtype, bit for bit."""
    x = torch.randn(rows, 96, generator=gen).bfloat16()
    pre = torch.logspace(-1, 1, 96)
    scaled = fused.scaled(x, pre)
    assert scaled.dtype == torch.bfloat16 and torch.equal(scaled, (x * pre).bfloat16())


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_nhwc_codes_are_channels_last_whatever_the_input_layout(gen, layout):
    x = torch.randn(2, 16, 24, 24, generator=gen).to(memory_format=layout)
    u8 = fused.u8_static_nhwc(x, torch.tensor([0.02]))
    assert u8.shape == x.shape and u8.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(u8.to(torch.int16) - 128, reference.int8_codes(x, torch.tensor(0.02)).to(torch.int16))


def test_rescale_is_rows_times_scale_plus_bias(gen):
    y, s = torch.randn(200, 100, generator=gen), torch.rand(200, 1, generator=gen)
    b = torch.randn(100, generator=gen)
    out = fused.rescale(y, s, b, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), (y * s + b).bfloat16().float(), rtol=0, atol=0)


def test_a_compiler_failure_falls_back_to_eager(gen, monkeypatch):
    from torch._inductor.exc import InductorError

    def broken(*_a):
        raise InductorError(RuntimeError("no C++ compiler"), None)

    monkeypatch.setattr(fused, "_COMPILED", {"static": broken})
    x = torch.randn(400, 64, generator=gen)
    u8 = fused.u8_static(x, torch.tensor([0.01]))
    assert fused._COMPILED["static"] is fused._EAGER["static"]
    assert torch.equal(u8.to(torch.int16) - 128, reference.int8_codes(x, torch.tensor(0.01)).to(torch.int16))
