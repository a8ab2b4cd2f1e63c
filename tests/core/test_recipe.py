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
    "unknown_method": ("weights: {method: squeeze}\n", "weights.method"),
    "gptq_unknown_key": ("weights: {method: gptq, gptq: {blocksize: 64}}\n", "weights.gptq.blocksize"),
    "gptq_bad_block": ("weights: {method: gptq, gptq: {block_size: 0}}\n", "block_size"),
    "gptq_bad_damp": ("weights: {method: gptq, gptq: {damp: 1.5}}\n", "damp"),
    "gptq_options_without_gptq": ("weights: {method: awq, gptq: {act_order: true}}\n", "weights.gptq"),
    "act_order_not_bool": ("weights: {method: gptq, gptq: {act_order: 1}}\n", "act_order"),
    "smoothing_static": ("activations: {smoothing: smoothquant}\n", "smoothing"),
    "unknown_smoothing": ("activations: {mode: dynamic, granularity: per_token, smoothing: awq}\n",
                          "activations.smoothing"),
    "alpha_without_smoothing": ("activations: {mode: dynamic, granularity: per_token, smooth_alpha: 0.5}\n",
                                "smooth_alpha"),
    "extends_unknown": ("extends: w9a9\n", "unknown recipe 'w9a9'"),
    "extends_not_a_name": ("extends: [w8a8, w8]\n", "'extends' names one recipe"),
    "extends_then_bad_key": ("extends: w8a8\nweights: {bitz: 4}\n", "weights.bitz"),
    "alpha_out_of_range": ("activations: {mode: dynamic, granularity: per_token, smoothing: smoothquant, "
                           "smooth_alpha: 1.5}\n", "smooth_alpha"),
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


def test_algorithm_fields_load_and_round_trip(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "weights: {format: int4, granularity: per_group, group_size: 64, method: gptq,\n"
        "          gptq: {block_size: 32, act_order: true, static_groups: true, damp: 0.05}}\n"
        "activations: {mode: dynamic, granularity: per_token, smoothing: smoothquant, smooth_alpha: 0.8}\n"
    )
    r = load_recipe(path)
    o = r.weights.gptq_options()
    assert r.weights.method == "gptq"
    assert (o.block_size, o.act_order, o.static_groups, o.damp) == (32, True, True, 0.05)
    assert r.activations.smoothing == "smoothquant" and r.activations.smooth_alpha == 0.8
    assert Recipe.from_dict(r.to_dict()) == r
    assert r.needs_calibration()
    defaults = load_recipe("w4g64")
    assert defaults.weights.method == "rtn" and defaults.weights.gptq_options().block_size == 128
    assert not defaults.needs_calibration()


def test_algorithm_builtins():
    assert load_recipe("w4a16").weights.method == "gptq"
    w4a8, w8a8 = load_recipe("w4a8"), load_recipe("w8a8")
    assert w4a8.activations == w8a8.activations and w4a8.skip == w8a8.skip
    assert (w4a8.weights.format, w4a8.weights.group_size) == ("int4_i8", 32)
    assert load_recipe("llm-w4a16-gptq").weights.gptq_options().act_order
    assert load_recipe("llm-w4a16-awq").weights.method == "awq"
    sq = load_recipe("llm-w8a8-smoothquant").activations
    assert sq.smoothing == "smoothquant" and sq.smooth_alpha is None and sq.mode == "dynamic"


@pytest.mark.parametrize("data, message", [
    ({"keep_float": ["inputs"]}, "recipe key 'keep_float[0]': expected one of 'input', 'output'"),
    ({"overrides": [{"weights": {"format": "int8"}}]}, "an override needs 'match' (name globs) or 'roles'"),
    ({"overrides": [{"roles": ["body"], "keep_float": True}]}, "overrides[0].roles[0]"),
    ({"verify": "yes"}, "recipe key 'verify': expected true/false, got 'yes'"),
])
def test_role_and_verify_keys_refuse_bad_values_in_one_line(data, message):
    with pytest.raises(RecipeError) as e:
        Recipe.from_dict(data)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_extends_patches_the_base(tmp_path):
    """Mappings merge key by key, overrides append (later ones win), other values replace;
    the base's name and description are not inherited; relative paths resolve beside the file."""
    (tmp_path / "base.yaml").write_text(
        "name: base\ndescription: the base\nextends: w8a8\nskip: [conv_in]\n")
    (tmp_path / "child.yaml").write_text(
        "extends: base.yaml\nactivations: {timestep_groups: 8}\nskip: [conv_out]\n"
        "overrides: [{match: ['*.to_k'], keep_float: true}]\n")
    r, w8a8 = load_recipe(tmp_path / "child.yaml"), load_recipe("w8a8")
    assert (r.name, r.description) == ("custom", "")
    assert r.activations == Recipe.from_dict({"activations": {
        **w8a8.to_dict()["activations"], "timestep_groups": 8}}).activations
    assert r.weights == w8a8.weights and r.keep_float == w8a8.keep_float
    assert r.skip == ["conv_out"]
    assert r.overrides[:-1] == w8a8.overrides and r.overrides[-1].keep_float
    assert r.plan_for("down.attn.to_k") is None


def test_extends_refuses_a_circle(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(RecipeError, match="goes round in a circle") as e:
        load_recipe(tmp_path / "a.yaml")
    assert "\n" not in str(e.value)


def test_modulation_rows_get_dynamic_scales_in_every_w8a8_family_recipe():
    """adaLN / time projections (one row per sample) are dynamic per row; the rest static."""
    for name in ("w8a8", "w8a8-int8attn", "w4a8", "w4a8-mixed", "w4a8-mixed-generic"):
        r = load_recipe(name)
        assert r.plan_for("blocks.0.norm1.linear", frozenset({"modulation"})).activations.mode == "dynamic"
        assert r.plan_for("blocks.0.attn.to_q").activations.mode == "static"
