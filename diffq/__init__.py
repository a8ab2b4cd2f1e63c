"""diffq: time-step-aware quantization for diffusion models and the Transformers around them.

`import diffq` stays light: diffusers, transformers and triton are imported only when used.
"""
from __future__ import annotations

__version__ = "0.1.0"

from diffq.api import quantize, weight_bytes  # noqa: E402
from diffq.checkpoint import load, save  # noqa: E402
from diffq.core.recipe import ActivationSpec, Recipe, WeightSpec, load_recipe  # noqa: E402
from diffq.errors import DiffqError  # noqa: E402

__all__ = ["quantize", "save", "load", "weight_bytes", "Recipe", "WeightSpec", "ActivationSpec",
           "load_recipe", "DiffqError", "__version__"]
