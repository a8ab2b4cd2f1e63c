"""`diffq.quantize`: the in-place quantize -> (calibrate) -> convert lifecycle for any nn.Module."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffq.calib.collector import ActivationCollector, LayerStats, run_calibration
from diffq.calib.scales import choose_boundaries, scale_table
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


def static_layers(model: nn.Module, plans: dict[str, LayerPlan],
                  segments: dict[str, list[int]]) -> dict[str, tuple[nn.Module, int, list[int]]]:
    """Layers with static activation quantization: name -> (module, feature axis, segments)."""
    out = {}
    for n, p in plans.items():
        if p.activations is not None and p.activations.mode == "static":
            m = model.get_submodule(n)
            out[n] = (m, _feature_axis(m), segments.get(n, [_in_channels(m)]))
    return out


def collect_stats(model: nn.Module, layers, data, timestep_of=None, progress: bool = False):
    """Run calibration `data` (iterable of call items, or a callable that drives the model,
    e.g. a pipeline loop) and return name -> LayerStats."""
    clock = TimestepClock()
    handle = install_clock(model, clock, timestep_of)
    try:
        collector = ActivationCollector(layers, clock)
        if callable(data):
            with torch.inference_mode(), collector:
                data()
        else:
            run_calibration(model, data, collector, progress)
    finally:
        handle.remove()
    return collector.stats()


def quantize(
    model: nn.Module,
    recipe: str | Path | Recipe = "w8",
    calibration: Iterable[Any] | None = None,
    timestep_of: TimestepOf | None = None,
    segments: dict[str, list[int]] | None = None,
    progress: bool = False,
    stats: dict[str, LayerStats] | None = None,
) -> nn.Module:
    """Quantize `model` in place and return it; `model.diffq_report` says what was done.

    recipe: built-in name ("w8a8", "w8", "w4g64", ...), YAML path or Recipe.
    calibration: items are a tensor, a tuple of args, a dict of kwargs or an (args, kwargs) pair;
    needed only for static activation scales. timestep_of(args, kwargs) returns the timestep of a
    call (default: the `timestep` keyword or the second positional argument).
    segments: layer name -> input channel segment sizes that get separate activation scales
    (used where the layer's activation spec sets split_skip).
    stats: precollected statistics (see `collect_stats`), instead of running `calibration`.
    """
    recipe = load_recipe(recipe)
    plans, report = plan_layers(model, recipe)
    segments = {n: seg for n, seg in (segments or {}).items() if n in plans
                and plans[n].activations is not None and plans[n].activations.split_skip}
    layers = static_layers(model, plans, segments)
    if layers and stats is None:
        if calibration is None:
            raise CalibrationError(
                "the recipe quantizes activations statically and needs calibration data "
                "(pass calibration=...), or use a weight-only / dynamic recipe"
            )
        stats = collect_stats(model, layers, calibration, timestep_of, progress)
    missing = [n for n in layers if n not in (stats or {})]
    if missing:
        raise CalibrationError(f"no calibration statistics for layer {missing[0]!r} "
                               f"({len(missing)} layers); were they collected for another model?")
    stats = {n: stats[n] for n in layers}
    converted = convert(model, plans, segments)
    bounds = {}  # one set of boundaries per (K, method), shared by all layers of the model
    for name, st in stats.items():
        spec = plans[name].activations
        key = (spec.timestep_groups, spec.timestep_grouping)
        if key not in bounds:
            bounds[key] = choose_boundaries(stats, *key)
        scale, zp = scale_table(st, bounds[key], spec)
        converted[name].input_quant.set_table(scale, bounds[key], zp)
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
            total += p.numel() * (p.element_size() if float_dtype is None else float_dtype.itemsize)
    return total


__all__ = ["quantize", "weight_bytes", "attach_clock", "QuantizationReport"]
