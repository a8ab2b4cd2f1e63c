"""Structure of diffusers UNets that diffq's time-step-aware features need."""
from __future__ import annotations

from torch import nn

from diffq.core.recipe import Recipe
from diffq.errors import InputError


def check_groups(recipe: Recipe, steps: int) -> None:
    """Refuse before any work when a sampling run cannot show K distinct timesteps."""
    specs = [recipe.activations, *(o.activations for o in recipe.overrides)]
    k = max((a.timestep_groups for a in specs if a is not None and a.mode == "static"), default=1)
    if k > steps:
        raise InputError(f"recipe {recipe.name!r} has {k} timestep groups but calibration runs only "
                         f"{steps} steps; use --steps >= {k}")


def skip_concat_segments(unet: nn.Module) -> dict[str, list[int]]:
    """Layers that consume cat(h, skip) in the up path -> [h channels, skip channels].

    In diffusers' up blocks each ResNet takes torch.cat([hidden_states, res_hidden_states], 1);
    its conv1 (after norm and SiLU) and its 1x1 conv_shortcut see that layout. h has the
    channels of the previous ResNet's output (the mid block's for the first up block).
    """
    mid = getattr(unet, "mid_block", None)
    ups = getattr(unet, "up_blocks", None)
    if ups is None or mid is None or not getattr(mid, "resnets", None):
        return {}
    prev = mid.resnets[-1].out_channels
    out: dict[str, list[int]] = {}
    for i, block in enumerate(ups):
        for j, res in enumerate(getattr(block, "resnets", [])):
            skip = res.in_channels - prev
            if skip > 0:
                for layer in ("conv1", "conv_shortcut"):
                    if isinstance(getattr(res, layer, None), nn.Conv2d):
                        out[f"up_blocks.{i}.resnets.{j}.{layer}"] = [prev, skip]
            prev = res.out_channels
    return out
