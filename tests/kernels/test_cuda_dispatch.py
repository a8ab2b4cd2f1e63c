"""The CUDA kernels of the diffq ops: their glue code on whatever device the kernels run (the
interpreter's CPU tensors too), and on a CUDA machine the dispatch itself: ops and quantized
modules reach the Triton launchers and give the reference's numbers. No timing is asserted."""
import pytest
import torch
from torch import nn

pytest.importorskip("triton")
from diffq.core.recipe import ActivationSpec, WeightSpec  # noqa: E402
from diffq.kernels import act_quant, int8_attention, int8_conv, w4a16_gemm, w8a8_gemm  # noqa: E402
from diffq.nn import QConv2d, QLinear, set_backend  # noqa: E402
from diffq.ops import cuda, library, reference  # noqa: E402
from diffq.ops.kernels import Kernels
from tests.kernels.conftest import rel_err  # noqa: E402

pytestmark = pytest.mark.triton
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _spy(fn, name: str, seen: list[str]):
    def spy(*args, **kwargs):
        seen.append(name)
        return fn(*args, **kwargs)
    return spy


@pytest.fixture
def calls(monkeypatch) -> list[str]:
    """Names of the Triton launchers called during the test."""
    seen: list[str] = []
    for module, name in ((w8a8_gemm, "w8a8_linear"), (int8_conv, "w8a8_conv2d"),
                         (w4a16_gemm, "w4a16_matmul"), (int8_attention, "int8_attention"),
                         (act_quant, "quantize_static"), (act_quant, "quantize_dynamic")):
        monkeypatch.setattr(module, name, _spy(getattr(module, name), name, seen))
    return seen


def test_cuda_kernel_glue(gen, device, calls):
    """The functions registered for the CUDA key, called directly (their tensors may be CPU)."""
    x = torch.randn(2, 24, 6, 6, generator=gen).to(device)
    qw = torch.randint(-128, 128, (8, 24, 3, 3), generator=gen, dtype=torch.int8).to(device)
    ws = torch.rand(8, generator=gen).to(device) * 0.01 + 1e-3
    args = (torch.tensor([0.02, 0.05], device=device), [16, 8], [2, 2], [1, 1], [1, 1], 1)
    for fast in (False, True):  # the NHWC weight made per call, or kept in the layer's store
        y = cuda._w8a8_conv2d_cuda(x, qw, ws, None, *args, Kernels(), fast)
        assert rel_err(y, library.conv2d_reference(x.double(), qw, ws.double(), None, *args)) < 1e-6
    grouped = cuda._w8a8_conv2d_cuda(x, qw[:, :12], ws, None, args[0][:1], [24], [1, 1], [1, 1], [1, 1],
                                     2, Kernels())
    assert grouped.shape == (2, 8, 6, 6)  # groups > 1: the reference
    nhwc, seg_scales = x.permute(0, 2, 3, 1), torch.tensor([0.02, 0.05], device=device)
    codes, scales = cuda._quantize_act_cuda(nhwc, seg_scales, [16, 8])
    ref_codes, ref_scales = reference.quantize_act(nhwc, seg_scales, [16, 8])
    assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)
    h = torch.randn(3, 64, generator=gen).half().to(device)
    packed = torch.randint(0, 256, (16, 32), generator=gen, dtype=torch.uint8).to(device)
    scale = torch.rand(16, 2, 1, generator=gen).to(device) * 0.1
    y = cuda._w4a16_linear_cuda(h, packed, scale, None, None, 32)
    assert rel_err(y, reference.w4a16_linear(h.float(), packed, scale, None, None, 32)) < 1e-3
    assert calls.count("w8a8_conv2d") == 2 and "w4a16_matmul" in calls


@needs_cuda
def test_ops_dispatch_to_triton(gen, calls):
    x = torch.randn(7, 64, generator=gen)
    qw = torch.randint(-128, 128, (32, 64), generator=gen, dtype=torch.int8)
    ws = torch.rand(32, generator=gen) * 0.01 + 1e-3
    xs = torch.tensor([0.02])
    y = torch.ops.diffq.w8a8_linear(x.cuda(), qw.cuda(), ws.cuda(), None, xs.cuda(), None)
    assert rel_err(y, library.linear_reference(x.double(), qw, ws.double(), None, xs)) < 1e-6

    xc = torch.randn(2, 24, 8, 8, generator=gen)
    qc = torch.randint(-128, 128, (16, 24, 3, 3), generator=gen, dtype=torch.int8)
    wc = torch.rand(16, generator=gen) * 0.01 + 1e-3
    args = (torch.tensor([0.02, 0.04]), [16, 8], [1, 1], [1, 1], [1, 1], 1)
    y = torch.ops.diffq.w8a8_conv2d(xc.cuda(), qc.cuda(), wc.cuda(), None, args[0].cuda(), *args[1:], [])
    assert rel_err(y, library.conv2d_reference(xc.double(), qc, wc.double(), None, *args)) < 1e-6

    q, k, v = (torch.randn(1, 2, 64, 64, generator=gen).half() for _ in range(3))
    y = torch.ops.diffq.int8_attention(q.cuda(), k.cuda(), v.cuda())
    assert rel_err(y, reference.int8_attention(q, k, v).float()) < 1e-2

    codes, scales = torch.ops.diffq.quantize_act(x.cuda(), None, [64])
    ref_codes, ref_scales = reference.quantize_act(x, None, [64])
    assert torch.equal(codes.cpu(), ref_codes) and torch.equal(scales.cpu(), ref_scales)
    assert {"w8a8_linear", "w8a8_conv2d", "int8_attention", "quantize_dynamic"} <= set(calls)


@needs_cuda
def test_quantized_modules_on_cuda_match_the_reference_backend(gen, calls):
    conv = nn.Conv2d(16, 32, 3, padding=1)
    lin = nn.Linear(64, 48)
    qconv = QConv2d(conv, WeightSpec(), ActivationSpec()).cuda()
    qlin = QLinear(lin, WeightSpec(), ActivationSpec()).cuda()
    qconv.input_quant.set_table(torch.full((1, 1), 0.03), torch.zeros(0))
    qlin.input_quant.set_table(torch.full((1, 1), 0.05), torch.zeros(0))
    w4 = QLinear(nn.Linear(128, 40), WeightSpec("int4", "per_group", 64, False), None).cuda().half()
    x = torch.randn(2, 16, 8, 8, generator=gen).cuda()
    t = torch.randn(3, 64, generator=gen).cuda()
    h = torch.randn(1, 128, generator=gen).cuda().half()
    with torch.no_grad():
        fast = qconv(x), qlin(t), w4(h)
        for m in (qconv, qlin, w4):
            set_backend(m, "reference")
        ref = qconv(x), qlin(t), w4(h)
    for a, b in zip(fast, ref, strict=True):
        assert rel_err(a, b) < 2e-3
    assert {"w8a8_conv2d", "w8a8_linear", "w4a16_matmul"} <= set(calls)
