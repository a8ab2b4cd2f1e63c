"""The public lifecycle: plan -> calibrate -> convert equals quantize; plans round-trip;
statistics merge exactly and save / load."""
import dataclasses
import json

import pytest
import torch

import diffq
from diffq.api import Plan, calibrate, convert, load_stats, merge_stats, plan, save_stats
from diffq.errors import CalibrationError
from tests.conftest import ToyUNet, assert_same_state, toy_calibration

SEGMENTS = {"up": [64, 128]}  # ToyUNet's up conv reads cat(skip, upsampled)
EXAMPLE = toy_calibration(1, seed=3)[0]  # the call traced for the layers' roles


def _fresh():
    torch.manual_seed(0)
    return ToyUNet()


@pytest.mark.parametrize("recipe", ["w8a8", "w4a8", "w8a8-static"])
def test_the_three_steps_equal_quantize(recipe):
    calls = toy_calibration(6)
    whole = diffq.quantize(_fresh(), recipe, calibration=calls, segments=SEGMENTS)
    model = _fresh()
    p = plan(model, recipe, SEGMENTS, EXAMPLE)
    with calibrate(model, p) as cal:
        cal.run(calls)
    convert(model, p, cal.activation_stats, cal.input_stats)
    assert_same_state(whole, model)
    assert model.diffq.report.quantized == whole.diffq.report.quantized
    x, t = toy_calibration(1, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(model(x, t), whole(x, t))


def test_plan_says_what_each_layer_needs_and_round_trips():
    model = _fresh()
    p = plan(model, "w4a8", SEGMENTS, EXAMPLE)
    assert "conv_in" in p.skipped and "up" in p.segments and p.static
    assert p.needs and all(len(v) == 2 for v in p.needs.values())  # GPTQ: Hessians
    again = Plan.from_dict(json.loads(json.dumps(p.to_dict())))
    assert again == p
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.recipe = None


def test_statistics_merge_exactly_and_save_load(tmp_path):
    model = _fresh()
    p = plan(model, "w8a8", SEGMENTS, EXAMPLE)
    calls = toy_calibration(6)
    parts = []
    for chunk in (calls[:3], calls[3:], calls):
        with calibrate(model, p, inputs=False) as cal:
            cal.run(chunk)
        parts.append(cal.activation_stats)
    merged = merge_stats(parts[0], parts[1])
    for name, st in parts[2].items():
        for k, v in st.tensors().items():
            assert torch.equal(merged[name].tensors()[k], v), (name, k)
    save_stats(merged, tmp_path / "s.safetensors", {"prompts": 6})
    loaded = load_stats(tmp_path / "s.safetensors")
    assert loaded.keys() == merged.keys()
    assert all(torch.equal(loaded[n].hist, merged[n].hist) for n in merged)
    assert not list(tmp_path.glob(".*"))


def test_one_collection_serves_several_plans():
    """Split statistics (for the recipe that splits the skip concat) also serve a recipe that
    does not: convert folds them, and the result equals a direct unsplit collection."""
    calls = toy_calibration(4)
    a = _fresh()
    split, whole = plan(a, "w8a8", SEGMENTS, EXAMPLE), plan(a, "naive-w8a8", SEGMENTS, EXAMPLE)
    with calibrate(a, [split, whole], inputs=False) as cal:
        cal.run(calls)
    shared = cal.activation_stats
    assert shared["up"].minmax.shape[-1] == 2
    direct = diffq.quantize(_fresh(), "naive-w8a8", calibration=calls, segments=SEGMENTS)
    convert(a, whole, shared)
    x, t = toy_calibration(1, seed=5)[0]
    with torch.no_grad():
        assert torch.allclose(a(x, t), direct(x, t), rtol=0, atol=1e-6)


def test_roles_need_one_example_call():
    with pytest.raises(CalibrationError, match="keeps layers float by role .input, output, embedding."):
        plan(_fresh(), "w8a8")
    p = plan(_fresh(), "w8a8", example=EXAMPLE)
    assert p.roles["conv_in"] == ["input"] and p.segments == SEGMENTS  # traced, not given
    assert "role input" in p.skipped["conv_in"]


def test_convert_without_the_statistics_it_needs_is_one_clear_error():
    model = _fresh()
    p = plan(model, "w8a8", SEGMENTS, EXAMPLE)
    with pytest.raises(CalibrationError, match="no calibration statistics for layer"):
        convert(model, p, {})
    p4 = plan(_fresh(), "w4a8", SEGMENTS, EXAMPLE)
    with pytest.raises(CalibrationError, match="chooses its weights from its inputs"):
        convert(_fresh(), p4, {n: None for n in p4.static})


def test_the_front_door_lifecycle_takes_cal_stats():
    calls = toy_calibration(4)
    whole = diffq.quantize(_fresh(), "w4a8", calibration=calls, segments=SEGMENTS)
    model = _fresh()
    p = diffq.plan(model, "w4a8", SEGMENTS, EXAMPLE)
    with diffq.calibrate(model, p) as cal:
        cal.run(calls)
    diffq.convert(model, p, cal.stats)
    assert_same_state(whole, model)
