"""Granularity: which elements of a tensor share one scale (and zero point)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""


@dataclass(frozen=True)
class PerChannel:
    """One scale per index along `axis` (weights: axis 0 = output channel)."""

    axis: int = 0


@dataclass(frozen=True)
class PerGroup:
    """One scale per `group_size` consecutive elements along the last (reduction) dimension."""

    group_size: int


@dataclass(frozen=True)
class PerToken:
    """One scale per token, reducing over the feature `axis` only (dynamic activations)."""

    axis: int = -1


Granularity = PerTensor | PerChannel | PerGroup | PerToken


def blocked(x: torch.Tensor, g: Granularity) -> torch.Tensor:
    """View `x` so that each scale covers a reduction over `reduce_dims(...)`.

    PerGroup reshapes [..., K] to [..., K // group_size, group_size]; other granularities are no-ops.
    """
    if isinstance(g, PerGroup):
        k = x.shape[-1]
        if k % g.group_size:
            raise ValueError(f"group size {g.group_size} does not divide the last dim {k}")
        return x.reshape(*x.shape[:-1], k // g.group_size, g.group_size)
    return x


def reduce_dims(xb: torch.Tensor, g: Granularity) -> tuple[int, ...]:
    """Dimensions of the blocked view that one scale reduces over."""
    nd = xb.dim()
    if isinstance(g, PerTensor):
        return tuple(range(nd))
    if isinstance(g, PerChannel):
        axis = g.axis % nd
        return tuple(d for d in range(nd) if d != axis)
    if isinstance(g, PerGroup):
        return (nd - 1,)
    if isinstance(g, PerToken):
        return (g.axis % nd,)
    raise TypeError(f"not a granularity: {g!r}")


def to_dict(g: Granularity) -> dict:
    """JSON-able description, inverse of `from_dict`."""
    kind = {PerTensor: "per_tensor", PerChannel: "per_channel", PerGroup: "per_group",
            PerToken: "per_token"}[type(g)]
    return {"kind": kind, **g.__dict__}


def from_dict(d: dict) -> Granularity:
    d = dict(d)
    cls = {"per_tensor": PerTensor, "per_channel": PerChannel, "per_group": PerGroup,
           "per_token": PerToken}[d.pop("kind")]
    return cls(**d)
