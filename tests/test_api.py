import pytest
import torch

import diffq
from diffq.core import sqnr_db
from diffq.core.recipe import ActivationSpec, Recipe, WeightSpec
from diffq.errors import CalibrationError
from diffq.nn import QConv2d, QLinear
from tests.conftest import ToyUNet, toy_calibration


def test_w8_leaves_int8_and_halves_bf16_bytes(toy_unet):
    x, t = toy_calibration(1)[0]
    ref = toy_unet(x, t)
    fp_bytes = diffq.weight_bytes(toy_unet)
    diffq.quantize(toy_unet, "w8")
    assert isinstance(toy_unet.down, QConv2d) and isinstance(toy_unet.attn_q, QLinear)
    assert toy_unet.down.qweight.dtype == torch.int8 and toy_unet.attn_q.qweight.dtype == torch.int8
    assert 0.5 < diffq.weight_bytes(toy_unet) / fp_bytes < 0.6
    with torch.no_grad():
        assert sqnr_db(ref, toy_unet(x, t)) > 30
    report = toy_unet.diffq.report
    assert report.skipped["emb"].startswith("unsupported layer type Embedding")
    assert "down" in report.quantized


def test_recipe_skip_is_reported(toy_unet):
    diffq.quantize(toy_unet, Recipe(skip=["conv_in", "conv_out", "nothing_*"]))
    assert isinstance(toy_unet.conv_in, torch.nn.Conv2d) and not isinstance(toy_unet.conv_in, QConv2d)
    assert toy_unet.diffq.report.skipped["conv_in"] == "kept float by recipe"
    assert toy_unet.diffq.report.unmatched_patterns == ["nothing_*"]


def test_group_that_does_not_divide_is_skipped_not_crashed(toy_unet):
    diffq.quantize(toy_unet, "w4g64")  # conv_in has K = 4*3*3 = 36
    assert "not divisible by group size 64" in toy_unet.diffq.report.skipped["conv_in"]


def test_static_activations_need_calibration(toy_unet):
    with pytest.raises(CalibrationError, match="calibration data"):
        diffq.quantize(toy_unet, "w8a8")
    with pytest.raises(CalibrationError, match="empty"):
        diffq.quantize(ToyUNet(), "w8a8", calibration=[])


def test_calibration_item_forms_are_equivalent():
    x, t = toy_calibration(1)[0]
    forms = [(x, t), ((x,), {"timestep": t}), {"x": x, "timestep": t}]
    recipe = Recipe(activations=ActivationSpec(timestep_groups=1))
    scales = []
    for item in forms:
        torch.manual_seed(0)
        m = diffq.quantize(ToyUNet(), recipe, calibration=[item])
        scales.append(m.down.input_quant.scale.clone())
    assert all(torch.equal(scales[0], s) for s in scales[1:])
    # a bare tensor is one positional argument
    seq = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3))
    diffq.quantize(seq, recipe, calibration=[x])
    assert torch.allclose(seq[0].input_quant.scale, x.abs().max().reshape(1, 1) / 127)


def test_timestep_groups_follow_the_timestep_value():
    data = toy_calibration(12)
    torch.manual_seed(0)
    m = diffq.quantize(ToyUNet(), Recipe(activations=ActivationSpec(timestep_groups=3)), calibration=data)
    q = m.mid.input_quant  # its input grows with t (see ToyUNet.forward)
    assert q.scale.shape == (3, 1) and q.boundaries.shape == (2,)
    assert q.scale[0] < q.scale[1] < q.scale[2]
    x, _ = data[0]
    for t, g in [(0.0, 0), (float(q.boundaries[0]) + 1, 1), (999.0, 2), (float(q.boundaries[1]) - 0.5, 1)]:
        m(x, torch.full((2,), t))
        assert q.group_index() == g


def test_k1_equals_plain_static_minmax():
    data = toy_calibration(6)
    torch.manual_seed(0)
    m = diffq.quantize(ToyUNet(), Recipe(activations=ActivationSpec(timestep_groups=1)), calibration=data)
    torch.manual_seed(0)
    float_model = ToyUNet()
    seen = []
    h = float_model.mid.register_forward_pre_hook(lambda _m, a: seen.append(a[0].abs().max()))
    for x, t in data:
        float_model(x, t)
    h.remove()
    assert torch.allclose(m.mid.input_quant.scale, torch.stack(seen).max() / 127)


def test_nonfinite_calibration_names_layer_and_timestep():
    x, t = toy_calibration(1)[0]
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(CalibrationError, match=r"layer 'conv_in' at timestep 999"):
        diffq.quantize(ToyUNet(), Recipe(activations=ActivationSpec()), calibration=[(x, t)])


def test_w8a8_static_quality_and_save_load_exact(tmp_path):
    torch.manual_seed(0)
    m = ToyUNet()
    data = toy_calibration(10)
    x, t = toy_calibration(1, seed=5)[0]
    ref = m(x, t)
    diffq.quantize(m, Recipe(weights=WeightSpec(clip="mse"),
                             activations=ActivationSpec(timestep_groups=2)), calibration=data)
    with torch.no_grad():
        out = m(x, t)
    assert sqnr_db(ref, out) > 25
    diffq.save(m, tmp_path / "ck")
    torch.manual_seed(1)
    m2 = diffq.load(tmp_path / "ck", ToyUNet())
    with torch.no_grad():
        assert torch.equal(m2(x, t), out)


def test_deepcopy_keeps_timestep_lookup_working():
    import copy

    torch.manual_seed(0)
    m = diffq.quantize(ToyUNet(), "w8a8", calibration=toy_calibration(8))
    twin = copy.deepcopy(m)
    x, _ = toy_calibration(1)[0]
    with torch.no_grad():
        for t in (999.0, 10.0):
            ts = torch.full((2,), t)
            assert torch.equal(twin(x, ts), m(x, ts))
            assert twin.mid.input_quant.group_index() == m.mid.input_quant.group_index()
