"""One timestep clock per model, shared by its timestep-grouped activation quantizers."""
from __future__ import annotations

from torch import nn

from diffq.nn.base import QuantizedLayer
from diffq.nn.state import diffq_state
from diffq.nn.timestep import TimestepClock, TimestepOf, install_clock


def attach_clock(model: nn.Module, timestep_of: TimestepOf | None = None) -> TimestepClock | None:
    """Share one clock among the model's timestep-grouped quantizers and hook it to the model."""
    quantizers = [m.input_quant for m in model.modules()
                  if isinstance(m, QuantizedLayer) and m.input_quant is not None
                  and m.input_quant.spec.mode == "static" and m.input_quant.scale.shape[0] > 1]
    if not quantizers:
        return None
    clock = TimestepClock()
    for q in quantizers:
        q.clock = clock
    state = diffq_state(model)
    if state.clock_handle is not None:
        state.clock_handle.remove()
    state.clock_handle = install_clock(model, clock, timestep_of)
    return clock
