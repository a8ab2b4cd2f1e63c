"""The oneDNN int8 path against the reference path (same codes; int32 accumulation is exact,
so outputs agree to float rounding: relative error < 1e-5 in fp32, < 1e-2 in bf16)."""
import pytest
import torch
from torch import nn

from diffq.core.recipe import ActivationSpec, WeightSpec
from diffq.nn import QConv2d, QLinear, set_backend
from diffq.ops import onednn

pytestmark = pytest.mark.skipif(not onednn.available(), reason="no oneDNN int8 kernels")

W8 = WeightSpec("int8", "per_channel", clip="mse")


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _static(layer, x, segments=None):
    q = layer.input_quant
    if segments:
        parts = torch.split(x, segments, dim=1)
        scale = torch.stack([p.abs().max() / 127 for p in parts]).reshape(1, -1)
    else:
        scale = (x.abs().max() / 127).reshape(1, 1)
    q.set_table(scale, torch.zeros(0))
    return layer


def _onednn_ops(fn) -> set[str]:
    """The oneDNN int8 compute ops that `fn()` dispatched to (packing excluded)."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return {e.key for e in prof.key_averages() if e.key.startswith("onednn::") and "prepack" not in e.key}


def _both(layer, x, expect_kernel=True):
    """Reference and fast outputs; checks the fast call really ran oneDNN int8 (the kernel, not
    a fallback) and the reference call did not."""
    out = {}
    with torch.no_grad():
        set_backend(layer, "reference")
        assert not _onednn_ops(lambda: out.__setitem__("ref", layer(x)))
        set_backend(layer, "auto")
        ran = _onednn_ops(lambda: out.__setitem__("fast", layer(x)))
    assert bool(ran) == expect_kernel, ran
    return out["ref"], out["fast"]


@pytest.mark.parametrize("shape", [(2, 7, 64), (33, 128), (1, 1, 96)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_linear_matches_reference(shape, dtype, tol, gen):
    lin = nn.Linear(shape[-1], 48)
    x = torch.randn(*shape, generator=gen)
    layer = _static(QLinear(lin, W8, ActivationSpec()), x).to(dtype)
    ref, fast = _both(layer, x.to(dtype))
    assert fast.dtype == dtype and fast.shape == ref.shape
    assert ("linear", layer.qweight.data_ptr()) in layer.kernel_cache  # the fast path ran
    assert _rel(fast, ref) < tol


CONVS = [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1),
         dict(kernel_size=1), dict(kernel_size=3, padding=1, bias=False),
         dict(kernel_size=3, padding=2, dilation=2)]


@pytest.mark.parametrize("kw", CONVS, ids=str)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_conv_matches_reference(kw, dtype, tol, gen):
    conv = nn.Conv2d(32, 24, **kw)
    x = torch.randn(2, 32, 10, 10, generator=gen)
    layer = _static(QConv2d(conv, W8, ActivationSpec()), x).to(dtype)
    ref, fast = _both(layer, x.to(dtype))
    assert any(k[0] == "conv_u8" for k in layer.kernel_cache)
    assert _rel(fast, ref) < tol


def test_conv_with_skip_split_scales(gen):
    conv = nn.Conv2d(48, 16, 3, padding=1)
    x = torch.cat([torch.randn(2, 32, 8, 8, generator=gen),
                   20 * torch.randn(2, 16, 8, 8, generator=gen)], dim=1)  # skip half is larger
    layer = _static(QConv2d(conv, W8, ActivationSpec(split_skip=True), segments=[32, 16]), x, [32, 16])
    ref, fast = _both(layer, x)
    ptr = layer.qweight.data_ptr()  # one pack per channel segment
    assert {("conv_u8", ptr, 0, 32), ("conv_u8", ptr, 32, 16)} <= set(layer.kernel_cache)
    assert _rel(fast, ref) < 1e-5


DYNAMIC = ActivationSpec(mode="dynamic", granularity="per_token")


@pytest.mark.parametrize("kw", [*CONVS, dict(kernel_size=3, padding=1, groups=4)], ids=str)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_dynamic_conv_is_an_int8_conv_equal_to_the_reference(kw, dtype, tol, gen):
    """kxk convolutions quantize their input per image at run time (1x1 ones per pixel) and
    run oneDNN's int8 convolution: the same codes as the reference path."""
    conv = nn.Conv2d(32, 24, **kw)
    x = torch.randn(2, 32, 10, 10, generator=gen)
    x[1] *= 30  # images of different range: each keeps its own scale
    layer = QConv2d(conv, W8, DYNAMIC).to(dtype)
    ref, fast = _both(layer, x.to(dtype))
    assert fast.dtype == dtype and fast.shape == ref.shape
    assert _rel(fast[0], ref[0]) < tol and _rel(fast[1], ref[1]) < tol


def test_dynamic_conv_scales_are_per_image_for_kxk(gen):
    """The reference grid of a kxk conv's dynamic input: one scale per image (max |x| / 127),
    so an image's output does not depend on the other images of the batch."""
    layer = QConv2d(nn.Conv2d(8, 8, 3, padding=1), W8, DYNAMIC)
    x = torch.randn(2, 8, 6, 6, generator=gen)
    with torch.no_grad():
        alone = layer(x[:1])
        x[1] *= 1000
        assert torch.equal(layer(x)[:1], alone)
        set_backend(layer, "reference")
        xq = (x[0] / (x[0].abs().max() / 127)).round() * (x[0].abs().max() / 127)
        ref = nn.functional.conv2d(xq[None], layer.quantized_weight.dequantize(), layer.bias, 1, 1)
        torch.testing.assert_close(layer(x)[:1], ref, rtol=1e-5, atol=1e-5)


def test_unsupported_calls_fall_back(gen):
    lin = nn.Linear(64, 32)
    x = torch.randn(4, 64, generator=gen)
    dyn = QLinear(lin, W8, ActivationSpec(mode="dynamic", granularity="per_token"))
    w4 = QLinear(lin, WeightSpec("int4", "per_group", group_size=32), None)
    with torch.no_grad():
        dyn(x), w4(torch.randn(129, 64, generator=gen))
        assert not w4.kernel_cache  # int4 weights with float inputs of many rows: the reference path
        w4(x)  # a few rows, even in fp32: torch's int4 decode kernel
        assert [k[0] for k in w4.kernel_cache] == ["int4pack"]
    # dynamic int8 runs the packed oneDNN GEMM (tests/ops/test_dynamic_linear.py), no extra
    # transposed copy of the weight for torch._int_mm
    assert ("linear", dyn.qweight.data_ptr()) in dyn.kernel_cache
    assert not any(k[0] == "w_t" for k in dyn.kernel_cache)


def test_cache_follows_reloaded_weights(gen):
    lin = nn.Linear(64, 32)
    x = torch.randn(4, 64, generator=gen)
    a = _static(QLinear(lin, W8, ActivationSpec()), x)
    b = _static(QLinear(nn.Linear(64, 32), W8, ActivationSpec()), x)
    with torch.no_grad():
        b(x)
        b.load_state_dict(a.state_dict())
        assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 4])
def test_weight_only_int8_decode_kernel(rows, dtype, gen, monkeypatch):
    tol = 2e-2  # bf16 output rounding (fp32 rows run the kernel as bf16)
    calls = []
    real = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(1) or real(*a))
    lin = nn.Linear(256, 96)
    layer = QLinear(lin, W8, None).to(dtype)
    x = torch.randn(1, rows, 256, generator=gen).to(dtype)
    ref, fast = _both(layer, x, expect_kernel=False)
    assert fast.shape == (1, rows, 96) and fast.dtype == dtype
    assert calls == [1]  # the kernel ran for the small-M call
    assert _rel(fast, ref) < tol
    big = torch.randn(129, 256, generator=gen).to(dtype)  # > 128 rows (long prefill): the reference path
    ref_big, fast_big = _both(layer, big, expect_kernel=False)
    assert torch.equal(ref_big, fast_big)


@pytest.mark.parametrize("k", [4, 24])
def test_int8_decode_kernel_skips_widths_it_cannot_step(k, gen, monkeypatch):
    """The kernel steps K by 16 with no tail: K = 4 read past each row (wrong sums on AVX2, a
    segfault on AVX-512); such layers take the reference path."""
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: pytest.fail("kernel ran"))
    layer = QLinear(nn.Linear(k, 32), W8, None)
    x = torch.randn(3, k, generator=gen)
    ref, fast = _both(layer, x, expect_kernel=False)
    assert torch.equal(ref, fast)


def test_int8_decode_kernel_takes_misaligned_rows_and_codes(gen):
    """Aligned vector loads in the kernel: a bf16 input view at an odd offset and codes at an
    odd offset (as a safetensors buffer holds them) are copied once, not read misaligned
    (which segfaults)."""
    layer = QLinear(nn.Linear(256, 96), W8, None).bfloat16()
    with torch.no_grad():
        codes = layer.qweight
        buf = torch.empty(codes.numel() + 1, dtype=torch.int8)
        buf[1:].copy_(codes.reshape(-1))
        layer.qweight = buf[1:].view(codes.shape)
    x = torch.randn(2 * 256 + 1, generator=gen).bfloat16()[1:].view(1, 2, 256)
    assert layer.qweight.data_ptr() % 16 and x.data_ptr() % 16
    ref, fast = _both(layer, x, expect_kernel=False)
    assert _rel(fast, ref) < 2e-2  # bf16 output rounding
    assert ("int8rows", layer.qweight.data_ptr()) in layer.kernel_cache  # the aligned copy, kept


W4I8 = WeightSpec("int4_i8", "per_group", 32, clip="mse", scale_dtype="float16")


@pytest.mark.parametrize("act", [ActivationSpec(), ActivationSpec(mode="dynamic", granularity="per_token")],
                         ids=["static", "dynamic"])
def test_int4_i8_layers_run_the_int8_kernels_on_their_products(act, gen):
    """W4A8 with int4_i8 weights: the layer keeps nibbles + multipliers (state dict) and runs
    oneDNN int8 on the int8 products, equal to the reference path."""
    from diffq.nn.base import layer_kernels

    lin, conv = nn.Linear(64, 48), nn.Conv2d(32, 24, 3, padding=1)
    x, xc = torch.randn(5, 64, generator=gen), torch.randn(2, 32, 8, 8, generator=gen)
    layers = [(QLinear(lin, W4I8, act), x), (QConv2d(conv, W4I8, act), xc)]
    for layer, inp in layers:
        layer = (layer if act.mode == "dynamic" else _static(layer, inp)).bfloat16()
        ref, fast = _both(layer, inp.bfloat16())
        assert _rel(fast, ref) < 1e-2
        assert {k: v.dtype for k, v in layer.state_dict().items() if "weight" in k} == {
            "qweight": torch.uint8, "weight_scale": torch.float16}
        assert layer.weight_nbytes == layer.quantized_weight.nbytes < layer.qweight_compute.nbytes
    kernels = layer_kernels(nn.ModuleList([m for m, _ in layers]))
    assert all(k.startswith("oneDNN int8") and k.endswith("on int4_i8 codes")
               for k in kernels.values()), kernels


def test_int4_i8_layer_reloads_from_its_storage(gen):
    lin = nn.Linear(64, 48)
    act = ActivationSpec(mode="dynamic", granularity="per_token")
    layer, blank = QLinear(lin, W4I8, act), QLinear(lin, W4I8, act, empty=True)
    x = torch.randn(3, 64, generator=gen)
    with torch.no_grad():
        y = layer(x)
        blank(x)  # packs its zero weight first: the reload must drop that pack
        blank.load_state_dict(layer.state_dict())
        assert torch.equal(blank.compute_weight.data, layer.compute_weight.data)
        assert torch.equal(blank(x), y)


W7 = WeightSpec("int7", "per_channel", clip="mse")


@pytest.mark.parametrize("saturating", [False, True])
@pytest.mark.parametrize("post", ["", "gelu_tanh"])
def test_only_weights_beyond_half_the_grid_run_split(saturating, post, gen, monkeypatch):
    """Where u8 x s8 pairs saturate (no VNNI) an int8 weight runs split into hi / lo halves
    (twice the output channels, bias and GELU after the join) and an int7 weight runs as it is
    (bias and GELU inside the kernel); both equal the reference. Elsewhere neither splits."""
    if not saturating and onednn.saturates():
        pytest.skip("this CPU saturates u8 x s8 pairs (no VNNI): unsplit int8 weights are wrong here")
    monkeypatch.setattr(onednn, "saturates", lambda: saturating)
    lin, conv = nn.Linear(64, 48), nn.Conv2d(32, 24, 3, padding=1)
    x, xc = torch.randn(5, 64, generator=gen) * 3, torch.randn(2, 32, 8, 8, generator=gen) * 3
    for spec, split in ((W8, saturating), (W7, False)):
        layer = _static(QLinear(lin, spec, ActivationSpec()), x)
        layer.post = post
        ref, fast = _both(layer, x)
        assert _rel(fast, ref) < 1e-5
        cache = layer.kernel_cache
        c = next(cache.get(k, None) for k in cache if k[0] == "constants")
        assert c.split == split and len(c.scales) == 48 * (2 if split else 1)
        assert (c.bias is None) == split
        cl = _static(QConv2d(conv, spec, ActivationSpec()), xc)
        ref, fast = _both(cl, xc)
        assert _rel(fast, ref) < 1e-5


def test_int7_weights_are_int8_codes_on_half_the_grid(gen):
    from diffq.nn.base import layer_kernels

    lin = nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=gen))
    layer, layer8 = QLinear(lin, W7, ActivationSpec()), QLinear(lin, W8, ActivationSpec())
    q = layer.qweight
    assert q.dtype == torch.int8 and int(q.min()) >= -64 and int(q.max()) <= 63
    assert int(layer8.qweight.abs().max()) > 64
    assert layer.weight_nbytes == layer8.weight_nbytes
    k = layer_kernels(nn.ModuleList([layer]))
    assert all(v == "oneDNN int8 on int7 codes" for v in k.values()), k


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("groups", [1, 4])
def test_packs_give_their_codes_back(split, groups, gen):
    q = torch.randint(-128, 128, (32, 48), dtype=torch.int8, generator=gen)
    assert torch.equal(onednn.unpack_linear(onednn.pack_linear(q, split), split), q)
    qc = torch.randint(-128, 128, (32, 16 // groups, 3, 3), dtype=torch.int8, generator=gen)
    pack = onednn.pack_conv_u8(qc, torch.rand(32, generator=gen), (2, 2), (1, 1), (1, 1), groups, split)
    assert torch.equal(onednn.unpack_conv(pack, groups, split), qc)
