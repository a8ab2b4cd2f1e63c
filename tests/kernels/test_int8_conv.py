"""int8 implicit-GEMM conv kernel vs the float64 convolution of the same quantized values;
the int32 sums are exact, so the error is fp32 rounding of the epilogue only."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
from diffq.kernels import int8_conv  # noqa: E402
from diffq.ops import library  # noqa: E402
from tests.kernels.conftest import rel_err  # noqa: E402

pytestmark = pytest.mark.triton

CASES = [  # kernel, stride, padding, channel segments, bias
    (3, 1, 1, [24], True),
    (3, 2, 1, [24], False),
    (1, 1, 0, [24], True),
    (3, 1, 1, [16, 8], True),  # cat(h, skip): one scale per segment
    (3, 2, 0, [8, 16], False),
    (1, 2, 0, [16, 8], False),
]


def _codes(gen, *shape):
    return torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8)


@pytest.mark.parametrize("k,stride,pad,segments,with_bias", CASES)
def test_conv_vs_float64(gen, device, k, stride, pad, segments, with_bias):
    x = torch.randn(2, 24, 9, 7, generator=gen) * 2
    qw = _codes(gen, 20, 24, k, k)
    ws = torch.rand(20, generator=gen) * 0.01 + 1e-3
    xs = torch.rand(len(segments), generator=gen) * 0.02 + 0.005
    bias = torch.randn(20, generator=gen) if with_bias else None
    y = int8_conv.w8a8_conv2d(
        x.to(device), qw.permute(0, 2, 3, 1).contiguous().to(device), ws.to(device),
        None if bias is None else bias.to(device), xs.to(device), segments, (stride, stride), (pad, pad))
    ref = library.conv2d_reference(x.double(), qw, ws.double(), None if bias is None else bias.double(),
                                   xs, segments, [stride] * 2, [pad] * 2, [1, 1], 1)
    assert y.shape == ref.shape
    assert rel_err(y, ref) < 1e-6


def test_int32_accumulation_is_exact_per_segment(gen, device):
    qx = _codes(gen, 2, 8, 8, 24)  # NHWC codes
    qw = _codes(gen, 16, 24, 3, 3)
    ones = torch.ones(16, device=device)
    y = int8_conv.int8_conv2d(qx.to(device), qw.permute(0, 2, 3, 1).contiguous().to(device),
                              ones[:2], [16, 8], ones, None, (1, 1), (1, 1), out_dtype=torch.float32)
    ref = F.conv2d(qx.permute(0, 3, 1, 2).double(), qw.double(), padding=1)  # |acc| < 2^24: exact
    assert torch.equal(y.cpu().double(), ref)


def test_channels_last_fp16_and_gelu(gen, device):
    x = (torch.randn(1, 16, 8, 8, generator=gen) * 2).half().to(memory_format=torch.channels_last)
    qw = _codes(gen, 32, 16, 3, 3)
    ws = torch.rand(32, generator=gen) * 0.01 + 1e-3
    b = torch.randn(32, generator=gen)
    y = int8_conv.w8a8_conv2d(x.to(device), qw.permute(0, 2, 3, 1).contiguous().to(device), ws.to(device),
                              b.to(device), torch.full((1,), 0.02, device=device), None, (1, 1), (1, 1),
                              activation="gelu")
    assert y.dtype == torch.float16 and y.is_contiguous(memory_format=torch.channels_last)
    ref = F.gelu(library.conv2d_reference(x.double(), qw, ws.double(), b.double(), torch.tensor([0.02]), [16],
                                          [1, 1], [1, 1], [1, 1], 1))
    assert rel_err(y, ref) < torch.finfo(torch.float16).eps / 2
