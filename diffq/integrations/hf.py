"""diffq as a diffusers / transformers quantization backend, shared by both libraries.

`DiffqConfig` (diffusers) and `DiffqTransformersConfig` (transformers) take the same arguments,
so `PipelineQuantizationConfig(quant_backend="diffq", ...)` can build either. The quantizer
classes live in `hf_diffusers` / `hf_transformers`; this module imports neither library and
`install()` registers them as soon as the library's quantizer registry is imported.
"""
from __future__ import annotations

import copy
import importlib.abc
import importlib.util
import sys
import warnings
from enum import Enum
from typing import Any

from torch import nn

from diffq.core.recipe import Recipe, builtin_recipes, load_recipe
from diffq.errors import RecipeError

QUANT_METHOD = "diffq"
# DiffqConfig(weights=...) -> built-in weight-only recipe; int4 / nf4 take group_size
WEIGHT_SCHEMES = {"int8": "w8", "int4": "w4g64", "nf4": "nf4", "fp8": "fp8-weights", "q8_0": "q8_0"}
_LIBRARIES = ("diffusers", "transformers")


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
        from dataclasses import replace

        if r.weights.granularity != "per_group":
            raise DiffqConfigError(f"group_size applies to per-group schemes, not {r.name!r}")
        r = replace(r, weights=replace(r.weights, group_size=group_size))
        r.weights.validate()
    return r


class DiffqConfigMixin:
    """What both libraries' configs share. Quantize on load: `recipe` (a built-in name,
    "w8", "w4g64", ...) or `weights` ("int8", "int4", "nf4", "fp8", "q8_0"); a checkpoint's
    config also carries `layers` (diffq.json's per-layer table) and `format_version`."""

    def __init__(self, recipe: str | dict | None = None, weights: str | None = None,
                 group_size: int | None = None, modules_to_not_convert: list[str] | None = None,
                 layers: dict | None = None, format_version: int | None = None,
                 diffq_version: str | None = None, tensors: dict | None = None, **kwargs: Any):
        from diffq.checkpoint import FORMAT_VERSION, check_format_version

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
        """The recipe applied on load, with `modules_to_not_convert` kept in float."""
        r = self.resolved
        if r.needs_calibration():
            raise DiffqConfigError(
                f"recipe {r.name!r} needs calibration data, which from_pretrained does not have: run "
                "diffq.quantize(model, recipe, calibration=...) or `diffq calibrate`, then save_pretrained; "
                "or load with a weight-only scheme (DiffqConfig(weights='int8'))")
        skip = [*r.skip, *self.modules_to_not_convert, *(f"{m}.*" for m in self.modules_to_not_convert)]
        return Recipe.from_dict({**r.to_dict(), "skip": skip})

    def to_dict(self) -> dict[str, Any]:
        d = {"quant_method": QUANT_METHOD, "format_version": self.format_version,
             "diffq_version": self.diffq_version, "recipe": self.recipe, "weights": self.weights,
             "group_size": self.group_size, "modules_to_not_convert": self.modules_to_not_convert}
        if self.layers is not None:
            d["layers"] = self.layers
            if self.tensors is not None:
                d["tensors"] = self.tensors
            d["note"] = ("quantized with diffq: pip install diffq-toolkit, then import diffq before "
                         "from_pretrained")
        return copy.deepcopy(d)

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


def describe(model: nn.Module) -> dict[str, Any]:
    """Constructor arguments of the config that reloads this diffq-quantized model."""
    from diffq import __version__
    from diffq.checkpoint import metadata

    meta = metadata(model)
    return {"recipe": meta["recipe"], "layers": meta["layers"], "tensors": meta["tensors"],
            "format_version": meta["format_version"], "diffq_version": __version__}


def prepare(model: nn.Module, config: DiffqConfigMixin, pre_quantized: bool,
            keep_in_fp32: list[str] | tuple[str, ...] = ()) -> None:
    """Before the weights load: a checkpoint's layers become empty quantized layers (on meta).
    `keep_in_fp32`: modules the framework keeps in fp32, added to modules_to_not_convert."""
    config.modules_to_not_convert += [m for m in keep_in_fp32 if m not in config.modules_to_not_convert]
    if not pre_quantized:
        config.quantize_recipe()  # refuse a calibrated recipe before reading any weight
        return
    from diffq.checkpoint import convert_empty

    if config.layers is None:
        raise DiffqConfigError("this checkpoint's diffq quantization_config has no 'layers' table; "
                               "it was not written by diffq save_pretrained")
    convert_empty(model, config.layers)


def finish(model: nn.Module, config: DiffqConfigMixin, pre_quantized: bool) -> DiffqConfigMixin:
    """After the weights load: quantize (weight-only on load) or hook the timestep clock;
    returns a private config that describes the model as it now is (for save_pretrained)."""
    from diffq.api import attach_clock, quantize

    if pre_quantized:
        from diffq.checkpoint import verify

        verify(model, config.tensors, f"this model's diffq checkpoint ({type(model).__name__})")
        model.diffq_recipe = config.resolved
        attach_clock(model)
    else:
        quantize(model, config.quantize_recipe())
    out = copy.copy(config)
    for k, v in describe(model).items():
        setattr(out, k, v)
    out.recipe = model.diffq_recipe.to_dict()  # the whole recipe: weights / group_size are in it
    out.weights = out.group_size = None
    out.resolved = model.diffq_recipe
    return out


def is_hf_model(model: nn.Module) -> str | None:
    """'diffusers' / 'transformers' when the model class comes from that library."""
    for cls in type(model).__mro__:
        root = cls.__module__.partition(".")[0]
        if root in _LIBRARIES and cls.__name__ in ("ModelMixin", "PreTrainedModel"):
            return root
    return None


def attach(model: nn.Module) -> nn.Module:
    """Mark a model quantized by `diffq.quantize` / `diffq.load` as a diffq-quantized HF model,
    so that `save_pretrained` writes its quantization_config and tensors (no-op for others)."""
    lib = is_hf_model(model)
    if lib == "diffusers":
        from diffq.integrations.hf_diffusers import attach_to
    elif lib == "transformers":
        from diffq.integrations.hf_transformers import attach_to
    else:
        return model
    attach_to(model, describe(model))
    return model


class _RegisterAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Runs `register` right after the module `name` has been executed (a post-import hook),
    so `import diffq` does not import diffusers / transformers itself."""

    def __init__(self, name: str, register_module: str) -> None:
        self.name, self.register_module, self._spec = name, register_module, None

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name or self._spec is not None:
            return None
        others = [f for f in sys.meta_path if f is not self]
        for finder in others:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                self._spec = spec
                return importlib.util.spec_from_loader(fullname, self, origin=spec.origin)
        return None

    def create_module(self, spec):
        return self._spec.loader.create_module(self._spec)

    def exec_module(self, module) -> None:
        module.__spec__ = self._spec
        module.__loader__ = self._spec.loader
        module.__file__ = self._spec.origin
        self._spec.loader.exec_module(module)
        sys.meta_path.remove(self)
        try:
            importlib.import_module(self.register_module).register()
        except Exception as e:  # a registration bug must not break `import diffusers`
            warnings.warn(f"diffq could not register its quantizer ({self.register_module}): {e}",
                          stacklevel=2)


def install() -> None:
    """Register diffq with diffusers and transformers now if imported, else right after."""
    for lib, registry in (("diffusers", "diffusers.quantizers.auto"),
                          ("transformers", "transformers.quantizers.auto")):
        module = f"diffq.integrations.hf_{lib}"
        if registry in sys.modules:
            importlib.import_module(module).register()
        elif not any(isinstance(f, _RegisterAfterImport) and f.name == registry for f in sys.meta_path):
            sys.meta_path.insert(0, _RegisterAfterImport(registry, module))
