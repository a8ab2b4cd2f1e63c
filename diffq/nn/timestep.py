"""Carry the current denoising timestep from a model's call to its quantized layers.

A forward pre-hook on the root module (e.g. the UNet) reads the timestep argument and stores it
on a `TimestepClock` that the layers' activation quantizers share; model code stays unchanged.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

TimestepOf = Callable[[tuple, dict], Any]


class TimestepClock:
    """The timestep of the call in progress (None outside a call or for non-diffusion models)."""

    def __init__(self) -> None:
        self.value: float | None = None
        # under torch.compile: the timestep as a 1-element fp32 tensor (reading it as a float
        # would break the graph and specialize it on every timestep)
        self.tensor: torch.Tensor | None = None
        self.held_back = False  # the call in progress is kept out of calibration statistics


def default_timestep_of(args: tuple, kwargs: dict) -> Any:
    """diffusers convention: `timestep` keyword, else the second positional argument."""
    for key in ("timestep", "timesteps", "t"):
        if key in kwargs:
            return kwargs[key]
    return args[1] if len(args) > 1 else None


def timestep_value(t: Any) -> float | None:
    """One float for the call; a batch shares one timestep in diffusion sampling, so the first
    element stands for all (classifier-free guidance duplicates it)."""
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return float(t.detach().reshape(-1)[0]) if t.numel() else None
    return float(t)


class _ClockHook:
    """A pre-hook object rather than a closure: copy.deepcopy(model) then copies the clock
    together with the quantizers that share it."""

    def __init__(self, clock: TimestepClock, timestep_of: TimestepOf) -> None:
        self.clock, self.timestep_of = clock, timestep_of

    def __call__(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        t = self.timestep_of(args, kwargs)
        if torch.compiler.is_compiling() and isinstance(t, torch.Tensor) and t.numel():
            self.clock.value, self.clock.tensor = None, t.detach().reshape(-1)[:1].float()
        else:
            self.clock.value, self.clock.tensor = timestep_value(t), None


def install_clock(model: nn.Module, clock: TimestepClock, timestep_of: TimestepOf | None = None):
    """Register the pre-hook that updates `clock` on every call of `model`; returns its handle."""
    hook = _ClockHook(clock, timestep_of or default_timestep_of)
    return model.register_forward_pre_hook(hook, with_kwargs=True)
