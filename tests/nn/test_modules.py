import pytest
import torch
from torch import nn

from diffq.core import sqnr_db
from diffq.core.recipe import ActivationSpec, WeightSpec
from diffq.nn import QConv2d, QLinear

W8 = WeightSpec("int8", "per_channel")
W4 = WeightSpec("int4", "per_group", group_size=32, clip="mse")
FP8 = WeightSpec("fp8_e4m3", "per_channel")
NF4 = WeightSpec("nf4", "per_group", group_size=32)
Q80 = WeightSpec("q8_0", "per_group", group_size=32, scale_dtype="float16")
W4I8 = WeightSpec("int4_i8", "per_group", group_size=32, clip="mse", scale_dtype="float16")
# Floors on output SQNR vs the float layer, a few dB under the weight SQNR of each format.
FLOORS = {"int8": 36.0, "int4": 15.0, "fp8_e4m3": 26.0, "nf4": 15.0, "q8_0": 38.0, "int4_i8": 15.0}
STORAGE = {"int8": torch.int8, "int4": torch.uint8, "fp8_e4m3": torch.float8_e4m3fn,
           "nf4": torch.uint8, "q8_0": torch.int8, "int4_i8": torch.uint8}


@pytest.mark.parametrize("spec", [W8, W4, FP8, NF4, Q80, W4I8], ids=lambda s: s.format)
@pytest.mark.parametrize("shape", [(64, 96), (128, 256), (32, 64)])
def test_qlinear_matches_float(spec, shape, gen):
    lin = nn.Linear(*shape)
    x = torch.randn(3, 5, shape[0], generator=gen)
    q = QLinear(lin, spec, None)
    assert q.qweight.dtype == STORAGE[spec.format]
    with torch.no_grad():
        assert sqnr_db(lin(x), q(x)) > FLOORS[spec.format]


CONVS = [
    dict(in_channels=8, out_channels=16, kernel_size=3, padding=1),
    dict(in_channels=16, out_channels=32, kernel_size=3, stride=2, padding=1),
    dict(in_channels=16, out_channels=16, kernel_size=3, padding=2, dilation=2, groups=4),
    dict(in_channels=32, out_channels=32, kernel_size=1),
    dict(in_channels=8, out_channels=8, kernel_size=(3, 1), stride=(2, 1), padding=(1, 0), groups=8,
         bias=False),
    dict(in_channels=16, out_channels=8, kernel_size=4, padding="same"),
]


@pytest.mark.parametrize("kw", CONVS, ids=lambda k: "-".join(f"{a}{b}" for a, b in k.items()))
@pytest.mark.parametrize("spec", [W8, FP8], ids=lambda s: s.format)
def test_qconv2d_matches_float(kw, spec, gen):
    conv = nn.Conv2d(**kw)
    x = torch.randn(2, kw["in_channels"], 12, 12, generator=gen)
    q = QConv2d(conv, spec, None)
    with torch.no_grad():
        ref = conv(x)
        out = q(x)
    assert out.shape == ref.shape
    assert sqnr_db(ref, out) > FLOORS[spec.format]


def test_qconv2d_int4_groups(gen):
    conv = nn.Conv2d(32, 64, 3, padding=1)  # K = 288 = 9 groups of 32
    q = QConv2d(conv, W4, None)
    assert q.qweight.shape == (64, 144) and q.weight_scale.shape == (64, 9, 1)
    x = torch.randn(1, 32, 8, 8, generator=gen)
    with torch.no_grad():
        assert sqnr_db(conv(x), q(x)) > FLOORS["int4"]


def test_activation_quant_static_and_dynamic(gen):
    lin = nn.Linear(64, 32)
    x = torch.randn(4, 64, generator=gen)
    static = QLinear(lin, W8, ActivationSpec())
    static.input_quant.set_table(x.abs().max().reshape(1, 1) / 127, torch.zeros(0))
    dynamic = QLinear(lin, W8, ActivationSpec(mode="dynamic", granularity="per_token"))
    with torch.no_grad():
        ref = lin(x)
        assert sqnr_db(ref, static(x)) > 32
        assert sqnr_db(ref, dynamic(x)) > 32
        # a static scale far too small clips hard: the activation really is quantized
        static.input_quant.set_table(torch.full((1, 1), 1e-4), torch.zeros(0))
        assert sqnr_db(ref, static(x)) < 10


def test_storage_survives_dtype_casts(gen):
    q = QLinear(nn.Linear(64, 32), FP8, None)
    data, scale = q.qweight.clone(), q.weight_scale.clone()
    q.to(torch.bfloat16)
    assert q.qweight.dtype == torch.float8_e4m3fn
    assert torch.equal(q.qweight.view(torch.uint8), data.view(torch.uint8))
    assert q.weight_scale.dtype == torch.float32 and torch.equal(q.weight_scale, scale)
    assert q.bias.dtype == torch.bfloat16
    x = torch.randn(2, 64, generator=gen, dtype=torch.bfloat16)
    assert q(x).dtype == torch.bfloat16


def test_weight_bytes_halve_bf16():
    lin = nn.Linear(512, 512, bias=False)
    q = QLinear(lin, W8, None)
    bf16 = 512 * 512 * 2
    assert q.weight_nbytes == 512 * 512 + 512 * 4
    assert 0.5 <= q.weight_nbytes / bf16 < 0.51
    q4 = QLinear(lin, W4, None)
    assert q4.weight_nbytes / bf16 < 0.32  # 4 bits + an fp32 scale per 32 weights = 5 bits


def test_a_new_scale_table_reaches_the_next_call(gen):
    """Eager calls reuse one activation-quantization object per timestep group: writing the
    table (calibration, loading) must show in the very next call."""
    lin = nn.Linear(64, 32)
    x = torch.randn(4, 64, generator=gen)
    q = QLinear(lin, W8, ActivationSpec())
    with torch.no_grad():
        for scale in (0.05, 0.01, 0.2):
            q.input_quant.set_table(torch.full((1, 1), scale), torch.zeros(0))
            fresh = QLinear(lin, W8, ActivationSpec())  # never called before
            fresh.input_quant.set_table(torch.full((1, 1), scale), torch.zeros(0))
            assert torch.equal(q(x), fresh(x))
        first = q(x)
        q.input_quant.scale.mul_(2)  # in place, as load_state_dict writes it
        assert not torch.equal(q(x), first)
