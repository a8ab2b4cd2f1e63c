"""diffq as a diffusers / transformers quantization backend, shared by both libraries.

`DiffqConfig` (diffusers) and `DiffqTransformersConfig` (transformers) take the same arguments,
so `PipelineQuantizationConfig(quant_backend="diffq", ...)` can build either. The quantizer
classes live in `hf_diffusers` / `hf_transformers`; this module imports neither library, and
`adapters` registers them and marks models quantized outside from_pretrained.
"""
from __future__ import annotations

import copy
from dataclasses import replace
from enum import Enum
from typing import Any

from torch import nn

from diffq.api import quantize
from diffq.checkpoint import FORMAT_VERSION, check_format_version, convert_empty, metadata, verify
from diffq.core.recipe import Recipe, builtin_recipes, load_recipe
from diffq.errors import RecipeError
from diffq.nn.base import QuantizedLayer
from diffq.nn.runtime import attach_runtime
from diffq.nn.state import diffq_state

QUANT_METHOD = "diffq"
# DiffqConfig(weights=...) -> built-in weight-only recipe; int4 / nf4 take group_size
WEIGHT_SCHEMES = {"int8": "w8", "int4": "w4g64", "nf4": "nf4", "fp8": "fp8-weights", "q8_0": "q8_0"}


class DiffqMethod(str, Enum):
    """diffusers reads `quant_method.value` (its methods are an Enum); this is diffq's."""

    DIFFQ = QUANT_METHOD


class DiffqConfigError(RecipeError, ValueError):
    """A DiffqConfig names an unknown scheme or conflicting options (a ValueError, as HF expects)."""


def _recipe_from(recipe: str | dict | None, weights: str | None, group_size: int | None) -> Recipe:
    if recipe is not None and weights is not None:
        raise DiffqConfigError("DiffqConfig takes recipe= or weights=, not both")
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    if weights is not None:
        if weights not in WEIGHT_SCHEMES:
            valid = ", ".join(WEIGHT_SCHEMES)
            raise DiffqConfigError(f"unknown DiffqConfig weights {weights!r}; valid: {valid} "
                                   f"(or recipe=: {', '.join(builtin_recipes())})")
        recipe = WEIGHT_SCHEMES[weights]
    try:
        r = load_recipe(recipe or "w8")
    except RecipeError as e:
        raise DiffqConfigError(f"DiffqConfig: {e}") from None
    if group_size is not None:
        if r.weights.granularity != "per_group":
            raise DiffqConfigError(f"group_size applies to per-group schemes, not {r.name!r}")
        r = replace(r, weights=replace(r.weights, group_size=group_size))
        r.weights.validate()
    return r


class DiffqConfigMixin:
    """What both libraries' configs share. Quantize on load: `recipe` (a built-in name,
    "w8", "w4g64", ...) or `weights` ("int8", "int4", "nf4", "fp8", "q8_0"); a checkpoint's
    config also carries `layers` (diffq.json's per-layer table) and `format_version`.
    Subclasses define `register_quantizer` (their library's entries): a config registers on
    construction, so `from_pretrained(quantization_config=DiffqConfig(...))` needs no
    `diffq.register()`."""

    def __init__(self, recipe: str | dict | None = None, weights: str | None = None,
                 group_size: int | None = None, modules_to_not_convert: list[str] | None = None,
                 layers: dict | None = None, format_version: int | None = None,
                 diffq_version: str | None = None, tensors: dict | None = None, **kwargs: Any):
        self.register_quantizer()  # a diffq config is only usable with diffq's quantizer registered
        kwargs.pop("quant_method", None)
        kwargs.pop("note", None)
        if kwargs:
            raise DiffqConfigError(f"unknown DiffqConfig argument(s): {', '.join(sorted(kwargs))}")
        if layers is not None:
            check_format_version(format_version, "this model's diffq quantization_config")
        self.quant_method = DiffqMethod.DIFFQ
        self.recipe = recipe
        self.weights = weights
        self.group_size = group_size
        self.modules_to_not_convert = list(modules_to_not_convert or [])
        self.layers = layers
        self.tensors = tensors  # digests recorded at save time, checked after loading
        self.format_version = FORMAT_VERSION if format_version is None else format_version
        self.diffq_version = diffq_version
        self.resolved = _recipe_from(recipe, weights, group_size)  # fails early on a bad scheme

    def quantize_recipe(self) -> Recipe:
        """The recipe applied on load, with `modules_to_not_convert` kept in float. Loading runs
        no call to trace, so role rules (keep_float: [input, ...]) do not apply here."""
        r = self.resolved
        if r.needs_calibration():
            raise DiffqConfigError(
                f"recipe {r.name!r} needs calibration data, which from_pretrained does not have: run "
                "diffq.quantize(model, recipe, calibration=...) or `diffq calibrate`, then save_pretrained; "
                "or load with a weight-only scheme (DiffqConfig(weights='int8'))")
        skip = [*r.skip, *self.modules_to_not_convert, *(f"{m}.*" for m in self.modules_to_not_convert)]
        return replace(r, skip=skip, keep_float=[], overrides=r.without_roles())

    def to_dict(self) -> dict[str, Any]:
        d = {"quant_method": QUANT_METHOD, "format_version": self.format_version,
             "diffq_version": self.diffq_version, "recipe": self.recipe, "weights": self.weights,
             "group_size": self.group_size, "modules_to_not_convert": self.modules_to_not_convert}
        if self.layers is not None:
            d["layers"] = self.layers
            if self.tensors is not None:
                d["tensors"] = self.tensors
            d["note"] = ("quantized with diffq: pip install diffq-toolkit, then call diffq.register() before "
                         "from_pretrained")
        return copy.deepcopy(d)

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


def describe(model: nn.Module, known_digests: dict[str, str] | None = None) -> dict[str, Any]:
    """Constructor arguments of the config that reloads this diffq-quantized model."""
    meta = metadata(model, known_digests=known_digests)
    return {"recipe": meta["recipe"], "layers": meta["layers"], "tensors": meta["tensors"],
            "format_version": meta["format_version"], "diffq_version": meta["diffq_version"]}


def prepare(model: nn.Module, config: DiffqConfigMixin, pre_quantized: bool,
            keep_in_fp32: list[str] | tuple[str, ...] = ()) -> None:
    """Before the weights load: a checkpoint's layers become empty quantized layers (on meta).
    `keep_in_fp32`: modules the framework keeps in fp32, added to modules_to_not_convert."""
    config.modules_to_not_convert += [m for m in keep_in_fp32 if m not in config.modules_to_not_convert]
    if not pre_quantized:
        config.quantize_recipe()  # refuse a calibrated recipe before reading any weight
        return
    if config.layers is None:
        raise DiffqConfigError("this checkpoint's diffq quantization_config has no 'layers' table; "
                               "it was not written by diffq save_pretrained")
    convert_empty(model, config.layers)


def finish(model: nn.Module, config: DiffqConfigMixin, pre_quantized: bool) -> DiffqConfigMixin:
    """After the weights load: quantize (weight-only on load) or hook the timestep clock;
    returns a private config that describes the model as it now is (for save_pretrained)."""
    known = None
    if pre_quantized:
        known = verify(model, config.tensors, f"this model's diffq checkpoint ({type(model).__name__})")
        for m in model.modules():  # the loaders assigned the stored tensors
            if isinstance(m, QuantizedLayer):
                m.storage_changed()
        diffq_state(model).recipe = config.resolved
        attach_runtime(model, config.resolved.attention)
    else:
        quantize(model, config.quantize_recipe())
    out = copy.copy(config)
    for k, v in describe(model, known).items():  # digests just verified are not hashed again
        setattr(out, k, v)
    out.recipe = diffq_state(model).recipe.to_dict()  # the whole recipe: weights / group_size are in it
    out.weights = out.group_size = None
    out.resolved = diffq_state(model).recipe
    return out
