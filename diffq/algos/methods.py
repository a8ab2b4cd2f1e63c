"""Weight methods by name (`weights.method` in a recipe): how a layer's codes are chosen.

A method may first search per-column input scales s (the weight becomes W · diag(s), its inputs
x / s at run time), then rounds the weight, given the input Hessian when it needs one. Adding a
method is one function pair and one `register_method`; the recipe schema's method names are
kept in step with this registry by a test.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from diffq.algos.awq import awq_clip, awq_search
from diffq.algos.gptq import gptq
from diffq.core.recipe import WeightSpec
from diffq.core.registry import Registry
from diffq.core.weights import QuantizedWeight, quantize_weight

# (weight [O, ...] float, Hessian [K, K] or None, spec) -> (storage, note for the report)
Rounder = Callable[[torch.Tensor, torch.Tensor | None, WeightSpec], tuple[QuantizedWeight, str]]
# (weight, Hessian, mean |x| per weight column [K], spec) -> (s [K], note)
ScaleSearch = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, WeightSpec], tuple[torch.Tensor, str]]


@dataclass(frozen=True)
class WeightMethod:
    name: str
    round: Rounder
    needs_hessian: bool = False
    search_scales: ScaleSearch | None = None  # AWQ-like: scales the layer input


def _rtn(w, h, spec):
    return quantize_weight(w, spec), ""


def _gptq(w, h, spec):
    if h is None:
        return quantize_weight(w, spec), ""
    o = spec.gptq_options()
    return gptq(w, h, spec, o.block_size, o.act_order, o.static_groups, o.damp), "gptq"


def _awq_round(w, h, spec):
    if h is None or spec.clip != "mse":
        return quantize_weight(w, spec), ""
    clipped = awq_clip(w, h, spec).reshape(w.shape).float()
    return quantize_weight(clipped, spec, clip="none"), ""


def _awq_scales(w, h, col_mean, spec):
    s, alpha = awq_search(w, h, col_mean, spec)
    return s, f"awq α={alpha:.2f}"


METHODS: Registry[WeightMethod] = Registry("weights.method")


def register_method(method: WeightMethod) -> WeightMethod:
    return METHODS.register(method.name, method)


def weight_method(name: str) -> WeightMethod:
    return METHODS.get(name)


def weight_methods() -> tuple[str, ...]:
    return METHODS.names()


for _m in (WeightMethod("rtn", _rtn), WeightMethod("gptq", _gptq, needs_hessian=True),
           WeightMethod("awq", _awq_round, needs_hessian=True, search_scales=_awq_scales)):
    register_method(_m)
