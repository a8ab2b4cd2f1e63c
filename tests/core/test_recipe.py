import pytest

from diffq.core.recipe import Recipe, builtin_recipes, load_recipe
from diffq.errors import RecipeError

BAD = {
    "unknown_top_key": ("weights: {format: int8}\nweigths: {}\n", "unknown recipe key weigths"),
    "unknown_nested_key": ("weights: {format: int8, bitz: 4}\n", "weights.bitz"),
    "string_for_int": ("weights: {group_size: '64'}\n", "weights.group_size"),
    "bool_for_int": ("weights: {group_size: true}\n", "weights.group_size"),
    "int_for_bool": ("weights: {symmetric: 1}\n", "weights.symmetric"),
    "unknown_format": ("weights: {format: int9}\n", "weights.format"),
    "unknown_granularity": ("weights: {granularity: per_row}\n", "weights.granularity"),
    "nf4_per_channel": ("weights: {format: nf4, granularity: per_channel}\n", "nf4"),
    "q8_0_wrong_group": ("weights: {format: q8_0, granularity: per_group, group_size: 64}\n", "q8_0"),
    "odd_group": ("weights: {granularity: per_group, group_size: 33}\n", "group_size"),
    "static_per_token": ("activations: {mode: static, granularity: per_token}\n", "static"),
    "zero_groups": ("activations: {timestep_groups: 0}\n", "timestep_groups"),
    "bad_percentile": ("activations: {percentile: 20}\n", "percentile"),
    "fp8_asymmetric": ("weights: {format: fp8_e4m3, symmetric: false}\n", "asymmetric"),
    "list_not_mapping": ("- weights\n- activations\n", "mapping"),
    "skip_not_list": ("skip: conv_in\n", "skip"),
    "override_without_match": ("overrides: [{keep_float: true}]\n", "match"),
    "override_bad_key": ("overrides: [{match: ['a'], bits: 4}]\n", "overrides[0].bits"),
    "empty": ("", "empty"),
    "unknown_component": ("components: [unet, vae]\n", "components[1]"),
    "no_component": ("components: []\n", "components"),
    "invalid_yaml": ("weights: {format: int8\n", "not valid YAML"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_recipes_name_the_problem(case, tmp_path):
    text, needle = BAD[case]
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_non_utf8_and_missing_files(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(RecipeError, match="not UTF-8"):
        load_recipe(p)
    with pytest.raises(RecipeError, match="unknown recipe 'w3a3'"):
        load_recipe("w3a3")
    with pytest.raises(RecipeError, match="unknown recipe"):
        load_recipe(tmp_path / "nope.yaml")


def test_builtins_load_and_round_trip():
    names = builtin_recipes()
    assert {"w8", "w8a8", "w4g64", "q8_0"} <= set(names)
    for name in names:
        r = load_recipe(name)
        assert r.name == name
        assert Recipe.from_dict(r.to_dict()) == r


def test_plan_resolution_order():
    r = Recipe.from_dict({
        "weights": {"format": "int8"},
        "skip": ["conv_in"],
        "overrides": [{"match": ["*.attn*"],
                       "weights": {"format": "int4", "granularity": "per_group", "group_size": 32}},
                      {"match": ["*.attn_k"], "keep_float": True}],
    })
    assert r.plan_for("conv_in") is None
    assert r.plan_for("down.conv").weights.format == "int8"
    assert r.plan_for("down.attn_q").weights.format == "int4"
    assert r.plan_for("down.attn_k") is None


def test_text_encoder_variant_has_one_group():
    r = load_recipe("w8a8")
    te = r.for_text_encoder()
    assert r.activations.timestep_groups == 4 and te.activations.timestep_groups == 1
    assert not te.activations.split_skip and te.weights == r.weights
