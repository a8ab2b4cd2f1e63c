"""Int8 attention inside a model's own attention processors, whatever the architecture.

diffusers' processors (UNet cross/self attention, SD3 / Flux joint attention, PixArt, Wan, ...)
all end in `F.scaled_dot_product_attention`. Each processor of the model is swapped for a
subclass whose call runs the original under a `TorchFunctionMode` that sends those unmasked SDPA
calls to `diffq::int8_attention` (SageAttention numerics; the Triton kernel on CUDA). The
subclass keeps the original's signature, so the module passes it the same keyword arguments.
"""
from __future__ import annotations

import copy
import functools

import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from diffq.core.recipe import AttentionSpec
from diffq.ops import library

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")


class Int8SDPA(TorchFunctionMode):
    """While active, unmasked, non-causal 4-d SDPA calls run `diffq::int8_attention`;
    `calls` / `float_calls` count what went where."""

    def __init__(self, spec: AttentionSpec) -> None:
        super().__init__()
        self.spec, self.calls, self.float_calls = spec, 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            a = dict(zip(_SDPA_ARGS, args, strict=False)) | kwargs
            q, k, v = a["query"], a["key"], a["value"]
            plain = (a.get("attn_mask") is None and not a.get("is_causal") and not a.get("dropout_p")
                     and q.dim() == 4 and q.shape[:2] == k.shape[:2] == v.shape[:2])
            if plain:
                self.calls += 1
                return library.int8_attention(q, k, v, a.get("scale"), self.spec.block_q, self.spec.block_k)
            self.float_calls += 1
        return func(*args, **kwargs)


def _int8_processor(inner, spec: AttentionSpec, counter: Int8SDPA):
    cls = type(inner)

    @functools.wraps(cls.__call__)  # the module reads the processor's parameters from it
    def __call__(self, *args, **kwargs):
        with counter:
            return cls.__call__(self, *args, **kwargs)

    wrapped = copy.copy(inner)
    wrapped.__class__ = type(f"Int8{cls.__name__}", (cls,), {"__call__": __call__, "diffq_attention": spec})
    return wrapped


def attach_attention(model: nn.Module, spec: AttentionSpec | None) -> Int8SDPA | None:
    """Swap every attention processor of `model` (modules with `processor` and `set_processor`)
    for its int8 twin; returns the shared mode (its counters say how many SDPA calls ran int8),
    None when `spec` is None or the model has no such module."""
    if spec is None:
        return None
    mode = Int8SDPA(spec)
    found = False
    for m in model.modules():
        proc = getattr(m, "processor", None)
        if proc is None or not hasattr(m, "set_processor"):
            continue
        if getattr(proc, "diffq_attention", None) is not None:  # attached before: unwrap first
            proc = copy.copy(proc)
            proc.__class__ = type(proc).__mro__[1]
        m.set_processor(_int8_processor(proc, spec, mode))
        found = True
    return mode if found else None
