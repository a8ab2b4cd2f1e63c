"""What diffq keeps on a model it quantized, in one place: `model.diffq`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass
class DiffqState:
    """`recipe`: the Recipe applied; `report`: the QuantizationReport (per-layer scheme, layers
    kept float and why); `clock_handle`: the forward pre-hook that feeds the timestep clock."""

    recipe: Any = None
    report: Any = None
    clock_handle: Any = None


def diffq_state(model: nn.Module) -> DiffqState:
    """`model.diffq`, created empty the first time it is asked for."""
    state = model.__dict__.get("diffq")
    if not isinstance(state, DiffqState):
        state = DiffqState()
        model.__dict__["diffq"] = state
    return state
