"""The diffq::w8a8_* custom ops: schema/fake checks, default vs CPU kernel, torch.compile."""
import pytest
import torch
from torch import nn

from diffq.core.recipe import ActivationSpec, WeightSpec
from diffq.nn import QConv2d, QLinear
from diffq.ops import library, onednn
from diffq.ops.kernels import Kernels


def _linear_args(gen, fast=False):
    x = torch.randn(3, 5, 32, generator=gen)
    qw = torch.randint(-127, 128, (16, 32), generator=gen, dtype=torch.int8)
    ws = torch.rand(16, generator=gen) * 0.01 + 1e-3
    b = torch.randn(16, generator=gen)
    return x, qw, ws, b, torch.tensor([0.02]), Kernels(), fast


def _conv_args(gen, fast=False):
    x = torch.randn(2, 24, 6, 6, generator=gen)
    qw = torch.randint(-127, 128, (8, 24, 3, 3), generator=gen, dtype=torch.int8)
    ws = torch.rand(8, generator=gen) * 0.01 + 1e-3
    return x, qw, ws, None, torch.tensor([0.02, 0.05]), [16, 8], [1, 1], [1, 1], [1, 1], 1, Kernels(), fast


def test_opcheck(gen):
    torch.library.opcheck(torch.ops.diffq.w8a8_linear.default, _linear_args(gen))
    torch.library.opcheck(torch.ops.diffq.w8a8_conv2d.default, _conv_args(gen))
    conv = _conv_args(gen)
    torch.library.opcheck(torch.ops.diffq.w8a8_dynamic_conv2d.default, (*conv[:4], *conv[6:]))
    u8 = torch.randint(0, 256, (3, 5, 32), generator=gen, dtype=torch.uint8)
    qw, ws = _linear_args(gen)[1:3]
    torch.library.opcheck(torch.ops.diffq.u8_linear.default, (u8, qw, ws, Kernels()))
    u8 = torch.randint(0, 256, (2, 8, 6, 6), generator=gen, dtype=torch.uint8).contiguous(
        memory_format=torch.channels_last)
    qw, ws = conv[1], conv[2]  # the second channel segment: input channels 16..23
    torch.library.opcheck(torch.ops.diffq.u8_conv2d.default, (u8, qw, ws, 16, [1, 1], [1, 1], [1, 1], 1,
                                                              Kernels()))


@pytest.mark.skipif(not onednn.available(), reason="no oneDNN int8 kernels")
@pytest.mark.parametrize("dynamic", [False, True])
def test_traced_w8a8_equals_the_fused_ops(gen, dynamic):
    """What torch.compile traces (quantize, bare int8 kernel on codes, rescale) equals the eager
    fused ops on the same inputs, on oneDNN and on the reference kernels."""
    from diffq.ops import traced

    x, qw, ws, b, xs, _, _ = _linear_args(gen)
    conv = _conv_args(gen)
    for fast in (True, False):
        lin_scale = None if dynamic else xs
        y = traced.linear(x, qw, ws, b, lin_scale, Kernels(), fast)
        ref = (library.w8a8_dynamic_linear(x, qw, ws, b, Kernels(), fast) if dynamic
               else library.w8a8_linear(x, qw, ws, b, xs, Kernels(), fast))
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        cx, cw, cws, _, cs, segs, st, pad, dil, groups = conv[:10]
        y = traced.conv2d(cx, cw, cws, b[:8], None if dynamic else cs, segs, st, pad, dil, groups,
                          Kernels(), fast)
        ref = (library.w8a8_dynamic_conv2d(cx, cw, cws, b[:8], st, pad, dil, groups, Kernels(), fast)
               if dynamic else library.w8a8_conv2d(cx, cw, cws, b[:8], cs, segs, st, pad, dil, groups,
                                                   Kernels(), fast))
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_eager_cpu_calls_skip_the_dispatcher_with_the_same_result(gen):
    """library.call runs an op's implementation directly for eager CPU tensors: the same
    output as through torch.ops, for every op it serves."""
    assert set(library._DIRECT) == {"w8a8_linear", "w8a8_dynamic_linear", "w8a8_conv2d",
                                    "w8a8_dynamic_conv2d"}
    lin, conv = _linear_args(gen, fast=True), _conv_args(gen, fast=True)
    dyn_conv = (*conv[:4], *conv[6:])  # no activation scales or segments
    for name, args in (("w8a8_linear", lin), ("w8a8_conv2d", conv), ("w8a8_dynamic_conv2d", dyn_conv),
                       ("w8a8_dynamic_linear", (*lin[:4], *lin[5:]))):
        torch.testing.assert_close(library.call(name, *args), getattr(torch.ops.diffq, name)(*args),
                                   rtol=0, atol=0)


@pytest.mark.skipif(not onednn.available(), reason="no oneDNN int8 kernels")
def test_cpu_kernels_match_default(gen):
    from torch.profiler import profile

    lin = _linear_args(gen)
    ref = library.w8a8_linear(*lin)
    with profile() as prof:  # the op must reach oneDNN, not its reference fallback
        fast = library.w8a8_linear(*lin[:-1], True)
    assert "onednn::qlinear_pointwise" in {e.key for e in prof.key_averages()}
    assert float((fast - ref).norm() / ref.norm()) < 1e-5
    # the pack, the per-call constants and whether the weight runs split, kept for the next call
    assert {k[0] for k in lin[-2]} == {"linear", "constants", "split"}
    conv = _conv_args(gen)
    ref = library.w8a8_conv2d(*conv)
    with profile() as prof:
        fast = library.w8a8_conv2d(*conv[:-1], True)
    assert "onednn::qconv2d_pointwise" in {e.key for e in prof.key_averages()}
    assert float((fast - ref).norm() / ref.norm()) < 1e-5


def test_torch_compile_traces_quantized_modules(gen):
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.Flatten(), nn.Linear(16 * 36, 10))
    x = torch.randn(2, 8, 6, 6, generator=gen)
    q = nn.Sequential(
        QConv2d(model[0], WeightSpec(), ActivationSpec()), model[1],
        QLinear(model[2], WeightSpec(), ActivationSpec()))
    q[0].input_quant.set_table(torch.full((1, 1), 0.03), torch.zeros(0))
    q[2].input_quant.set_table(torch.full((1, 1), 0.05), torch.zeros(0))
    with torch.no_grad():
        eager = q(x)
        compiled = torch.compile(q, backend="aot_eager")(x)
    assert torch.allclose(eager, compiled, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not onednn.available(), reason="no oneDNN int8 kernels")
@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-dynamic", "w4a8"])
def test_a_calibrated_w8a8_model_compiles_in_one_graph_on_its_int8_kernels(recipe):
    """Timestep groups chosen on-device, packs handed to the ops as an opaque store: no graph
    break anywhere in the model, the same outputs as eager, oneDNN inside the compiled call
    (w4a8: on its int4_i8 weights' int8 products)."""
    from torch.profiler import profile

    import diffq
    from tests.conftest import ToyUNet, toy_calibration

    torch.manual_seed(0)
    calls = toy_calibration(8)
    q = diffq.quantize(ToyUNet(), recipe, calibration=calls)
    x, t = toy_calibration(3, seed=1)[1]
    with torch.no_grad():
        # (explain traces the timestep pre-hook as a graph of its own; it reports no break reason)
        assert not torch._dynamo.explain(q)(x, t).break_reasons
        torch._dynamo.reset()
        compiled = torch.compile(q, backend="aot_eager", fullgraph=True)  # raises on any break
        with profile() as prof:
            y = compiled(x, t)
        ref = q(x, t)
    ran = {e.key for e in prof.key_averages()}
    # the compiled graph holds the bare int8 kernels, quantization and rescale traced around them
    assert {"onednn::qlinear_pointwise", "diffq::u8_linear", "diffq::u8_conv2d"} <= ran
    assert not {"diffq::w8a8_linear", "diffq::w8a8_conv2d", "diffq::w8a8_dynamic_linear"} & ran
    assert float((y - ref).norm() / ref.norm()) < 1e-5
    _, t_late = toy_calibration(3, seed=1)[2]  # another timestep group, no recompile needed
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t_late), q(x, t_late), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not onednn.available(), reason="no oneDNN int8 kernels")
def test_inductor_compiles_a_w8a8_model_as_accurate_as_eager():
    """Inductor's code (quantization fused into the producing ops, rescale into the consumers)
    against the float model: as close as the eager W8A8 model is (fused loops round
    differently, so a few codes at rounding ties differ, not the error)."""
    import copy

    import diffq
    from tests.conftest import ToyUNet, toy_calibration

    torch.manual_seed(0)
    fp = ToyUNet()
    q = diffq.quantize(copy.deepcopy(fp), "w8a8", calibration=toy_calibration(8))
    x, t = toy_calibration(3, seed=1)[1]
    with torch.no_grad():
        ref = fp(x, t)
        eager = q(x, t)
        compiled = torch.compile(q)(x, t)
    err = lambda y: float((y - ref).norm() / ref.norm())  # noqa: E731
    assert 0 < err(compiled) < 1.2 * err(eager) + 1e-4, (err(compiled), err(eager))
    assert float((compiled - eager).norm() / eager.norm()) < 0.01


@pytest.mark.skipif(not onednn.available(), reason="no oneDNN int8 kernels")
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_onednn_exact_on_full_range_codes(gen, monkeypatch, split, groups):
    """Codes at the ends of the int8 range (pairs of 255 x 127 products overflow int16): the
    kernel equals the reference with and without the hi/lo weight split, on any CPU. split=False
    is only meaningful where the CPU does not saturate (VNNI); the split runs everywhere."""
    if not split and onednn.saturates():
        pytest.skip("this CPU saturates u8 x s8 pairs without the split (no VNNI)")
    monkeypatch.setattr(onednn, "saturates", lambda: split)
    qw = torch.randint(-128, 128, (8, 16 // groups, 3, 3), generator=gen, dtype=torch.int8)
    qw[:, :, 0, 0] = 127  # the worst case pairs
    ws = torch.rand(8, generator=gen) * 0.01 + 1e-3
    x = torch.randn(2, 16, 6, 6, generator=gen) * 4  # beyond the range: codes clamp at the ends
    b = torch.randn(8, generator=gen)
    conv = (x, qw, ws, b, torch.tensor([0.02]), [16], [1, 1], [1, 1], [1, 1], groups, Kernels())
    ref = library.w8a8_conv2d(*conv, False)
    assert float((library.w8a8_conv2d(*conv, True) - ref).norm() / ref.norm()) < 1e-5
    lw = qw.reshape(8, -1)[:, :32].contiguous()
    xl = x.reshape(2, -1)[:, :32] * 2
    xs = torch.tensor([0.02])
    ref = library.w8a8_linear(xl, lw, ws, b, xs, Kernels(), False)
    fast = library.w8a8_linear(xl, lw, ws, b, xs, Kernels(), True)
    assert float((fast - ref).norm() / ref.norm()) < 1e-5
