"""A W8A8 layer drops its plain int8 codes once oneDNN holds them packed, and gets them back
(exactly) for anything else that reads them: another path, state_dict, copies, moves, loading."""
import copy

import pytest
import torch
from torch import nn

from diffq.core.recipe import ActivationSpec, WeightSpec
from diffq.core.weights import QuantizedWeight, is_released, released_codes
from diffq.errors import QuantizedWeightError
from diffq.nn import QConv2d, QLinear, restore_codes
from diffq.ops import library, onednn
from diffq.ops.kernels import Kernels

pytestmark = pytest.mark.skipif(not onednn.available(), reason="no oneDNN int8 kernels")

W8 = WeightSpec("int8", "per_channel", clip="mse")
W4I8 = WeightSpec("int4_i8", "per_group", 32, clip="mse", scale_dtype="float16")
STATIC, DYNAMIC = ActivationSpec(), ActivationSpec(mode="dynamic", granularity="per_token")


def _static(layer, x, segments=None):
    parts = torch.split(x, segments, dim=1) if segments else [x]
    layer.input_quant.set_table(torch.stack([p.abs().max() / 127 for p in parts]).reshape(1, -1),
                                torch.zeros(0))
    return layer


def _layers(gen):
    """(name, layer, input): every packed path: static / dynamic Linear, static kxk conv with
    two channel segments, grouped conv, dynamic kxk conv (per image), dynamic 1x1 conv (a
    Linear over pixels), int4_i8 weights on the int8 kernels."""
    x = torch.randn(3, 5, 64, generator=gen)
    xc = torch.randn(2, 48, 8, 8, generator=gen)
    conv = nn.Conv2d(48, 16, 3, padding=1)
    return [
        ("linear static", _static(QLinear(nn.Linear(64, 40), W8, STATIC), x), x),
        ("linear dynamic", QLinear(nn.Linear(64, 40), W8, DYNAMIC), x),
        ("conv two segments", _static(QConv2d(conv, W8, ActivationSpec(split_skip=True), segments=[32, 16]),
                                      xc, [32, 16]), xc),
        ("conv grouped", _static(QConv2d(nn.Conv2d(48, 24, 3, padding=1, groups=4), W8, STATIC), xc), xc),
        ("conv dynamic", QConv2d(nn.Conv2d(48, 16, 3, stride=2, padding=1), W8, DYNAMIC), xc),
        ("conv 1x1 dynamic", QConv2d(nn.Conv2d(48, 16, 1), W8, DYNAMIC), xc),
        ("int4_i8 linear", QLinear(nn.Linear(64, 40), W4I8, DYNAMIC), x),
    ]


def _codes(layer):
    return layer._buffers[layer._codes_name()]


@pytest.fixture
def layers(gen):
    return _layers(gen)


def test_codes_released_after_first_call_and_outputs_unchanged(layers):
    for name, layer, x in layers:
        codes = layer.compute_weight.data.clone()
        nbytes = layer.weight_nbytes
        with torch.no_grad():
            first = layer(x)
            assert is_released(_codes(layer)), name
            assert torch.equal(layer(x), first), name  # on the packs alone
        assert layer.weight_nbytes == nbytes, name  # what the storage is, not what is resident
        assert torch.equal(layer.compute_weight.data, codes), name  # rebuilt exactly
        assert not is_released(_codes(layer)), name


def test_state_dict_of_released_layer_holds_the_codes(layers):
    for name, layer, x in layers:
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        with torch.no_grad():
            y = layer(x)
        assert is_released(_codes(layer)), name
        after = layer.state_dict()
        assert after.keys() == before.keys(), name
        assert all(torch.equal(after[k], before[k]) for k in before), name
        assert is_released(_codes(layer)), name  # saving did not bring them back
        blank = copy.deepcopy(layer)
        blank.load_state_dict(after)
        with torch.no_grad():
            assert torch.equal(blank(x), y), name


def test_other_paths_copies_and_moves_get_the_codes_back(layers):
    for name, layer, x in layers:
        codes = layer.compute_weight.data.clone()
        with torch.no_grad():
            y = layer(x)
            twin = copy.deepcopy(layer)  # packs are not copied: the twin holds the codes
            assert not is_released(_codes(twin)) and torch.equal(twin(x), y), name
            layer(x)  # released again (the copy put them back for once)
            assert is_released(_codes(layer)), name
            layer.backend = "reference"  # another kind of call reads the codes
            ref = layer(x)
            assert not is_released(_codes(layer)) and torch.equal(_codes(layer), codes), name
            assert float((ref - y).norm() / y.norm()) < 1e-5, name
            layer.backend = "auto"
            assert torch.equal(layer(x), y), name
            assert not is_released(_codes(layer)), name  # two kinds of call: the codes stay
            assert is_released(_codes(twin)), name
            moved = twin.to(torch.bfloat16)  # moving rebuilds: codes back, packs remade
            assert not is_released(_codes(moved)) and torch.equal(_codes(moved), codes), name
            yb = moved(x.bfloat16())
        assert float((yb.float() - y).norm() / y.norm()) < 2e-2, name


def test_restore_codes_of_a_model():
    model = nn.Sequential(QLinear(nn.Linear(32, 32), W8, DYNAMIC), nn.ReLU(),
                          QLinear(nn.Linear(32, 8), W8, DYNAMIC))
    with torch.no_grad():
        model(torch.randn(4, 32))
    assert all(is_released(m.qweight) for m in (model[0], model[2]))
    restore_codes(model)
    assert not any(is_released(m.qweight) for m in (model[0], model[2]))


def test_released_codes_are_refused_where_read(gen):
    qweight = torch.randint(-127, 128, (16, 32), dtype=torch.int8, generator=gen)
    stand_in = released_codes(tuple(qweight.shape))
    assert is_released(stand_in) and is_released(stand_in.reshape(16, 32, 1, 1))
    assert not is_released(qweight) and not is_released(torch.zeros(16, 1, dtype=torch.int8))
    x, scale = torch.randn(4, 32, generator=gen), torch.rand(16, generator=gen) + 0.01
    with pytest.raises(QuantizedWeightError, match="released"):  # no pack: it would read zeros
        library.w8a8_dynamic_linear(x, stand_in, scale, None, Kernels(), True)
    with pytest.raises(QuantizedWeightError, match="released"):
        QuantizedWeight(stand_in, scale, None, W8.layout(), (16, 32)).dequantize()


def test_kernel_store_copies_are_empty_and_rekey_moves_one_address(gen):
    layer = QLinear(nn.Linear(32, 8), W8, DYNAMIC)
    with torch.no_grad():
        layer(torch.randn(2, 32, generator=gen))
    assert len(layer.kernel_cache) > 0
    assert len(copy.deepcopy(layer.kernel_cache)) == 0  # oneDNN packs cannot be copied
    store = Kernels()
    store.get(("conv_u8", 5, 0, 16), lambda: "pack")
    store.get(("conv", (5, 16), 5), lambda: "packs")
    store.rekey(5, 9)
    assert set(store) == {("conv_u8", 9, 0, 16), ("conv", (5, 16), 9)}
    assert store.peek(("conv_u8", 9, 0, 16)) == "pack" and store.peek(("conv_u8", 5, 0, 16)) is None
