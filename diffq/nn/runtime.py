"""What a quantized model needs at run time beyond its tensors, attached the same way after
quantizing, after `diffq.load` and after a diffusers / transformers `from_pretrained`: the
shared timestep clock, the int8 attention processors and the fused activations."""
from __future__ import annotations

from torch import nn

from diffq.core.recipe import AttentionSpec
from diffq.nn.attention import attach_attention
from diffq.nn.clock import attach_clock
from diffq.nn.fuse import fuse_activations
from diffq.nn.timestep import TimestepOf


def attach_runtime(model: nn.Module, attention: AttentionSpec | None,
                   timestep_of: TimestepOf | None = None) -> None:
    attach_clock(model, timestep_of)
    attach_attention(model, attention)
    fuse_activations(model)
