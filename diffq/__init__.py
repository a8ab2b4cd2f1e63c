"""diffq: time-step-aware quantization for diffusion models and the Transformers around them.

`import diffq` stays light: diffusers, transformers and triton are imported only when used.
The core (`diffq.api`, `diffq.checkpoint` and below) knows nothing of them; `quantize` and
`load` here add the one adapter step, so a diffusers / transformers model they return saves
with `save_pretrained`. `diffq.register()` adds quant_method "diffq" to diffusers' and
transformers' registries (what `from_pretrained` of a diffq checkpoint needs); nothing global
changes on import.
"""
from __future__ import annotations

import functools

from diffq import api as _api
from diffq import checkpoint as _checkpoint
from diffq._version import __distribution__, __version__
from diffq.api import Plan, calibrate, plan, weight_bytes
from diffq.checkpoint import save
from diffq.core.recipe import ActivationSpec, Recipe, WeightSpec, load_recipe
from diffq.errors import DiffqError
from diffq.nn.state import diffq_state


def _adapters():
    # the adapter layer sits above the core: imported when a front-door call needs it
    from diffq.integrations import adapters

    return adapters


def register(*args, **kwargs):
    """Add quant_method "diffq" to diffusers' and transformers' quantizer registries (see
    `diffq.integrations.adapters.register`); `with diffq.register(): ...` undoes it on exit."""
    return _adapters().register(*args, **kwargs)


@functools.wraps(_api.quantize)
def quantize(model, recipe, *args, **kwargs):
    return _adapters().attach(_api.quantize(model, recipe, *args, **kwargs))


@functools.wraps(_api.convert)
def convert(model, plan, *args, **kwargs):
    return _adapters().attach(_api.convert(model, plan, *args, **kwargs))


@functools.wraps(_checkpoint.load)
def load(directory, model, *args, **kwargs):
    model = _checkpoint.load(directory, model, *args, **kwargs)
    return _adapters().attach(model) if diffq_state(model).recipe is not None else model


_LAZY = {"DiffqConfig": "diffq.integrations.hf_diffusers",
         "DiffqTransformersConfig": "diffq.integrations.hf_transformers"}


def __getattr__(name: str):
    if name in _LAZY:  # importing these imports diffusers / transformers
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diffq' has no attribute {name!r}")


__all__ = ["register", "quantize", "plan", "Plan", "calibrate", "convert", "save", "load", "weight_bytes",
           "Recipe", "WeightSpec", "ActivationSpec", "load_recipe", "DiffqError", "DiffqConfig",
           "DiffqTransformersConfig", "__version__", "__distribution__"]
