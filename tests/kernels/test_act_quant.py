"""Activation quantization kernels vs the reference op: the codes (and dynamic scales) must be
bit-identical, since both divide in fp32 and round half to even."""
import pytest
import torch

pytest.importorskip("triton")
from diffq.kernels import act_quant  # noqa: E402
from diffq.ops import reference  # noqa: E402

pytestmark = pytest.mark.triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_static_per_tensor_is_bit_exact(gen, device, dtype):
    x = (torch.randn(3, 37, 50, generator=gen) * 4).to(dtype)  # 37 x 50: no block multiple
    scale = torch.rand(1, generator=gen) * 0.02 + 0.01
    q = act_quant.quantize_static(x.to(device), scale.to(device))
    ref, _ = reference.quantize_act(x, scale, [50])
    assert torch.equal(q.cpu(), ref)
    assert (ref == 127).any() and (ref == -128).any()  # saturation exercised


def test_static_segments_from_a_timestep_table_on_an_nchw_view(gen, device):
    x = torch.randn(2, 40, 6, 5, generator=gen) * 2
    table = torch.rand(4, 3, generator=gen) * 0.03 + 0.005  # 4 timestep groups x 3 segments
    segments = [16, 8, 16]
    for group in (0, 3):
        # NCHW read through its NHWC view (strided), as the conv path does
        q = act_quant.quantize_static(x.to(device).permute(0, 2, 3, 1), table.to(device), segments, group)
        ref, _ = reference.quantize_act(x.permute(0, 2, 3, 1), table[group], segments)
        assert q.shape == (2, 6, 5, 40) and q.is_contiguous()
        assert torch.equal(q.cpu(), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dynamic_per_token_is_bit_exact(gen, device, dtype):
    x = (torch.randn(5, 7, 96, generator=gen) * 3).to(dtype)
    x[0, 0] = 0  # an all-zero token gets scale 1, as choose_qparams gives it
    q, s = act_quant.quantize_dynamic(x.to(device))
    ref_q, ref_s = reference.quantize_act(x, None, [96])
    assert s.shape == (5, 7, 1)
    assert torch.equal(s.cpu(), ref_s) and torch.equal(q.cpu(), ref_q)


def test_segments_must_cover_the_channels(device):
    with pytest.raises(ValueError, match="segments"):
        act_quant.quantize_static(torch.ones(4, 8, device=device), torch.ones(2, device=device), [4, 3])
