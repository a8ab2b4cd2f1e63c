"""Run-time parameters passed from quantized modules to the ops."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from diffq.core.formats import Format


@dataclass(frozen=True)
class ActQuant:
    """How to quantize an op's input for this call.

    static: `scale` (and `zero_point`) are a scalar or a per-feature vector [C] along
    `feature_axis` (per-segment scales expanded to channels); dynamic: per-token scales are
    computed from x itself.
    """

    fmt: Format
    feature_axis: int
    dynamic: bool = False
    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None
    segments: tuple[int, ...] | None = None  # channel segments with their own scale
