import typing

import pytest
import torch

from diffq.algos import methods
from diffq.algos.methods import WeightMethod, weight_method, weight_methods
from diffq.core.recipe import LayerPlan, WeightSpec
from diffq.core.weights import quantize_weight
from diffq.nn.prepare import input_needs, prepare_layer


def test_recipe_schema_names_exactly_the_registered_methods():
    schema = typing.get_args(typing.get_type_hints(WeightSpec)["method"])
    assert set(schema) == set(weight_methods())
    with pytest.raises(ValueError, match="known: rtn"):
        weight_method("squeeze")


def test_a_registered_method_is_what_prepare_layer_runs(monkeypatch, gen):
    """prepare_layer asks the registry: a method that rounds towards zero is used as is."""
    def trunc(w, h, spec):
        qw = quantize_weight(w, spec)
        codes = torch.trunc(w / qw.scale).to(torch.int8)
        return type(qw).from_codes(codes, qw.scale, None, qw.layout, qw.shape), "trunc"

    monkeypatch.setitem(methods.METHODS._items, "rtn", WeightMethod("rtn", trunc))
    lin = torch.nn.Linear(32, 8)
    plan = LayerPlan(WeightSpec(), None)
    assert input_needs(lin, plan) is None
    p = prepare_layer(lin, plan, None)
    assert p.note == "trunc"
    codes = torch.trunc(lin.weight / p.weight.scale).to(torch.int8)
    assert torch.equal(p.weight.data, codes)
    assert not torch.equal(codes, quantize_weight(lin.weight, plan.weights).data)  # truly another rounding
