import pytest
import torch

from diffq.core.recipe import MinBits, MixedSpec, Recipe, WeightSpec
from diffq.core.weights import quantize_weight
from diffq.errors import RecipeError
from diffq.mixed.plan import choose, storage_bytes
from diffq.mixed.sensitivity import SensitivityTable

W4 = WeightSpec(format="int4", granularity="per_group", group_size=32, clip="mse", scale_dtype="float16")
W8 = WeightSpec(format="int8", granularity="per_channel", clip="mse")


@pytest.mark.parametrize("spec", [W4, W8, WeightSpec(format="int4", granularity="per_group", group_size=64,
                                                      symmetric=False),
                                  WeightSpec(format="q8_0", granularity="per_group", group_size=32)])
def test_storage_bytes_match_real_quantized_storage(spec):
    w = torch.randn(48, 16, 4, 4)
    assert storage_bytes(tuple(w.shape), spec) == quantize_weight(w, spec).nbytes


SHAPES = {"down.conv": (10, 128), "attn.to_q": (4, 128), "up.conv1": (20, 128), "mid.ff": (6, 128)}


def _table():
    layers = list(SHAPES)
    params = [SHAPES[n][0] * SHAPES[n][1] for n in layers]
    # error when only this layer is at 4 / 8 / 16 bits; up.conv1 is the sensitive one
    error = torch.tensor([[1e-3, 1e-5, 0], [2e-3, 1e-5, 0], [5e-2, 2e-4, 0], [5e-4, 1e-6, 0]],
                         dtype=torch.float64)
    return SensitivityTable(layers, [4, 8, 16], error, error * 2, params)


def test_choose_spends_bits_on_the_sensitive_layer_and_honours_policy():
    mixed = MixedSpec(candidates=[W4, W8], target_bits=7.0, min_bits=[MinBits(["*attn*"], 8)])
    alloc = choose(_table(), mixed, SHAPES)
    assert alloc.bits["attn.to_q"] >= 8
    assert alloc.bits["up.conv1"] >= 8
    assert alloc.average_bits <= 7.0
    assert alloc.bits["down.conv"] == 4  # cheapest error reduction per bit is elsewhere


def test_budget_in_bytes():
    shapes = SHAPES
    all4 = sum(storage_bytes(s, W4) for s in shapes.values())
    mixed = MixedSpec(candidates=[W4, W8], max_bytes=all4 + 1500)
    alloc = choose(_table(), mixed, shapes)
    assert alloc.bytes <= all4 + 1500
    assert alloc.bits["up.conv1"] == 8


def test_budget_as_a_ratio_of_the_whole_model():
    shapes = SHAPES
    bf16 = sum(storage_bytes(s, None) for s in shapes.values())
    rest = bf16 // 50  # biases, norms, layers kept float: counted at bf16, unchanged
    model_bytes = bf16 + rest
    for ratio in (0.35, 0.45):
        alloc = choose(_table(), MixedSpec(candidates=[W4, W8], max_ratio=ratio), shapes, model_bytes)
        assert (alloc.bytes + rest) / model_bytes <= ratio
    with pytest.raises(RecipeError, match="max_ratio 0.2 .* cannot be met"):
        choose(_table(), MixedSpec(candidates=[W4, W8], max_ratio=0.2), shapes, model_bytes)
    with pytest.raises(RecipeError, match=r"max_ratio must be in \(0, 1\]"):
        MixedSpec(candidates=[W4, W8], max_ratio=1.5).validate()
    with pytest.raises(RecipeError, match="exactly one"):
        MixedSpec(candidates=[W4, W8], target_bits=5, max_ratio=0.3).validate()


def test_unreachable_budget_and_bad_specs():
    with pytest.raises(RecipeError, match="cannot be met"):
        choose(_table(), MixedSpec(candidates=[W4, W8], target_bits=4.5,
                                   min_bits=[MinBits(["*"], 8)]), SHAPES)
    with pytest.raises(RecipeError, match="outside"):
        MixedSpec(candidates=[W4, W8], target_bits=3.0).validate()
    with pytest.raises(RecipeError, match="exactly one"):
        MixedSpec(candidates=[W4, W8]).validate()
    with pytest.raises(RecipeError, match="distinct width"):
        MixedSpec(candidates=[W4, W4], target_bits=5).validate()


def test_recipe_yaml_mixed_section_and_resolution():
    r = Recipe.from_dict({"name": "m", "weights": {"format": "int8"},
                          "mixed": {"candidates": [{"format": "int4", "granularity": "per_group",
                                                    "group_size": 32}, {"format": "int8"}],
                                    "target_bits": 4.5, "min_bits": [{"match": ["*attn*"], "bits": 8}]}})
    assert r.mixed.min_bits_for("x.attn1.to_q") == 8 and r.mixed.min_bits_for("x.conv") == 0
    with pytest.raises(RecipeError, match="unknown recipe key"):
        Recipe.from_dict({"mixed": {"candidates": [{"format": "int8"}], "target_bits": 8, "budget": 3}})
    resolved = r.resolve_mixed({"a.conv": W4, "b.conv": None})
    assert resolved.mixed is None
    assert resolved.plan_for("a.conv").weights == W4
    assert resolved.plan_for("b.conv") is None
    assert resolved.plan_for("c.conv").weights == r.weights
