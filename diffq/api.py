"""`diffq.quantize`: the in-place quantize -> (calibrate) -> convert lifecycle for any nn.Module."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from diffq.calib.collector import ActivationCollector, run_calibration
from diffq.calib.scales import minmax_table, timestep_boundaries
from diffq.core.formats import get_format
from diffq.core.recipe import LayerPlan, Recipe, load_recipe
from diffq.errors import CalibrationError
from diffq.nn.base import QuantizedLayer
from diffq.nn.convert import QuantizationReport, convert, plan_layers
from diffq.nn.timestep import TimestepClock, TimestepOf, install_clock



def _feature_axis(m: nn.Module) -> int:
    return -1 if isinstance(m, nn.Linear) else 1


def _in_channels(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


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
    old = getattr(model, "_diffq_clock_handle", None)
    if old is not None:
        old.remove()
    model._diffq_clock_handle = install_clock(model, clock, timestep_of)
    return clock


def _calibrate(model, plans: dict[str, LayerPlan], segments, data, timestep_of, progress):
    static = {n: p for n, p in plans.items()
              if p.activations is not None and p.activations.mode == "static"}
    if not static:
        return {}
    if data is None:
        raise CalibrationError(
            "the recipe quantizes activations statically and needs calibration data "
            "(pass calibration=...), or use a weight-only / dynamic recipe"
        )
    layers = {}
    for n in static:
        m = model.get_submodule(n)
        layers[n] = (m, _feature_axis(m), segments.get(n, [_in_channels(m)]))
    clock = TimestepClock()
    handle = install_clock(model, clock, timestep_of)
    try:
        collector = ActivationCollector(layers, clock)
        run_calibration(model, data, collector, progress)
    finally:
        handle.remove()
    return {n: collector.stats[n].tensors() for n in static}


def quantize(
    model: nn.Module,
    recipe: "str | Path | Recipe" = "w8",
    calibration: Iterable[Any] | None = None,
    timestep_of: TimestepOf | None = None,
    segments: dict[str, list[int]] | None = None,
    progress: bool = False,
) -> nn.Module:
    """Quantize `model` in place and return it; `model.diffq_report` says what was done.

    recipe: built-in name ("w8a8", "w8", "w4g64", ...), YAML path or Recipe.
    calibration: items are a tensor, a tuple of args, a dict of kwargs or an (args, kwargs) pair;
    needed only for static activation scales. timestep_of(args, kwargs) returns the timestep of a
    call (default: the `timestep` keyword or the second positional argument).
    segments: layer name -> input channel segment sizes that get separate activation scales.
    """
    recipe = load_recipe(recipe)
    segments = segments or {}
    plans, report = plan_layers(model, recipe)
    stats = _calibrate(model, plans, segments, calibration, timestep_of, progress)
    layers = convert(model, plans, segments)
    for name, (ts, minmax) in stats.items():
        spec = plans[name].activations
        bounds = timestep_boundaries(ts, spec.timestep_groups)
        scale, zp = minmax_table(ts, minmax, bounds, get_format(spec.format), spec.symmetric)
        layers[name].input_quant.set_table(scale, bounds, zp)
    attach_clock(model, timestep_of)
    report.quantized = {n: describe_plan(p) for n, p in plans.items()}
    model.diffq_report = report
    model.diffq_recipe = recipe
    return model


def describe_plan(plan: LayerPlan) -> str:
    w = plan.weights
    s = f"W:{w.format}/{w.granularity}" + (f"{w.group_size}" if w.granularity == "per_group" else "")
    a = plan.activations
    if a is not None:
        s += f" A:{a.format}/{a.mode}" + (f"/K={a.timestep_groups}" if a.mode == "static" else "")
    return s


def weight_bytes(model: nn.Module, float_dtype: torch.dtype | None = torch.bfloat16) -> int:
    """Bytes of the model's parameters and quantized storage. Float tensors count at
    `float_dtype` (bf16 by default: the baseline a user would otherwise deploy), quantized
    storage (codes, scales, zero points) at its real size. Activation scale tables excluded."""
    total = 0
    for m in model.modules():
        if isinstance(m, QuantizedLayer):
            total += m.weight_nbytes
        for p in m.parameters(recurse=False):
            size = p.element_size() if float_dtype is None else torch.empty(0, dtype=float_dtype).element_size()
            total += p.numel() * size
    return total


__all__ = ["quantize", "weight_bytes", "attach_clock", "QuantizationReport"]
