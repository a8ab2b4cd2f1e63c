"""diffq: time-step-aware quantization for diffusion models and the Transformers around them.

`import diffq` stays light: diffusers, transformers and triton are imported only when used.
"""
from __future__ import annotations

__version__ = "0.1.0"
# The PyPI name "diffq" is an unrelated project that installs the same import name; the CLI
# checks this marker to say so in one line when that package has replaced ours.
__distribution__ = "diffq-toolkit"

from diffq.api import quantize, weight_bytes  # noqa: E402
from diffq.checkpoint import load, save  # noqa: E402
from diffq.core.recipe import ActivationSpec, Recipe, WeightSpec, load_recipe  # noqa: E402
from diffq.errors import DiffqError  # noqa: E402
from diffq.integrations import hf as _hf  # noqa: E402

_hf.install()  # quant_method "diffq" for diffusers / transformers, registered when they load

_LAZY = {"DiffqConfig": "diffq.integrations.hf_diffusers",
         "DiffqTransformersConfig": "diffq.integrations.hf_transformers"}


def __getattr__(name: str):
    if name in _LAZY:  # importing these imports diffusers / transformers
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diffq' has no attribute {name!r}")


__all__ = ["quantize", "save", "load", "weight_bytes", "Recipe", "WeightSpec", "ActivationSpec",
           "load_recipe", "DiffqError", "DiffqConfig", "DiffqTransformersConfig", "__version__"]
