"""Checks of a denoiser's sampling settings against a recipe's time-step-aware features."""
from __future__ import annotations

from diffq.core.recipe import Recipe
from diffq.errors import InputError


def check_groups(recipe: Recipe, steps: int) -> None:
    """Refuse before any work when a sampling run cannot show K distinct timesteps."""
    specs = [recipe.activations, *(o.activations for o in recipe.overrides)]
    k = max((a.timestep_groups for a in specs if a is not None and a.mode == "static"), default=1)
    if k > steps:
        raise InputError(f"recipe {recipe.name!r} has {k} timestep groups but calibration runs only "
                         f"{steps} steps; use --steps >= {k}")
