"""`diffq.quantize`: the in-place quantize -> (calibrate) -> convert lifecycle for any nn.Module."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffq.calib.collector import ActivationCollector, LayerStats, run_calibration
from diffq.calib.hessian import InputCollector
from diffq.calib.scales import choose_boundaries, scale_table
from diffq.core.recipe import LayerPlan, Recipe, load_recipe
from diffq.errors import CalibrationError, RecipeError
from diffq.mixed.plan import Allocation, choose, layer_candidates
from diffq.mixed.sensitivity import SensitivityTable, measure_allocation, measure_sensitivity
from diffq.nn.base import QuantizedLayer
from diffq.nn.clock import attach_clock
from diffq.nn.convert import QuantizationReport, linearize_conv1d, plan_layers
from diffq.nn.prepare import input_needs, prepare_and_convert
from diffq.nn.state import diffq_state
from diffq.nn.timestep import TimestepClock, TimestepOf, install_clock


def _feature_axis(m: nn.Module) -> int:
    return -1 if isinstance(m, nn.Linear) else 1


def _in_channels(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


def static_layers(model: nn.Module, plans: dict[str, LayerPlan],
                  segments: dict[str, list[int]]) -> dict[str, tuple[nn.Module, int, list[int], int]]:
    """Layers with static activation quantization:
    name -> (module, feature axis, segments, leading tokens kept float)."""
    out = {}
    for n, p in plans.items():
        a = p.activations
        if a is not None and a.mode == "static":
            m = model.get_submodule(n)
            prefix = a.float_prefix if isinstance(m, nn.Linear) else 0
            out[n] = (m, _feature_axis(m), segments.get(n, [_in_channels(m)]), prefix)
    return out


def collect_stats(model: nn.Module, layers, data, timestep_of=None, progress: bool = False,
                  inputs: InputCollector | None = None):
    """Run calibration `data` (iterable of call items, or a callable that drives the model,
    e.g. a pipeline loop) and return name -> LayerStats. `inputs` (Hessians etc.) is filled
    in the same pass."""
    clock = TimestepClock()
    handle = install_clock(model, clock, timestep_of)
    try:
        collector = ActivationCollector(layers, clock)
        with inputs if inputs is not None else nullcontext():
            if callable(data):
                with torch.inference_mode(), collector:
                    data()
            else:
                run_calibration(model, data, collector, progress)
    finally:
        handle.remove()
    return collector.stats()


@dataclass
class MixedResult:
    """A resolved mixed-precision recipe and the evidence behind it."""

    recipe: Recipe
    allocation: Allocation
    table: SensitivityTable
    measured_error: float  # FAKE-QUANT relative output MSE with every layer at its chosen width


def plan_mixed(model: nn.Module, recipe: str | Path | Recipe, calls: list,
               table: SensitivityTable | None = None, progress: bool = False) -> MixedResult:
    """Measure per-layer sensitivity on `calls` (model call items, e.g. recorded UNet calls),
    choose widths under the recipe's budget and return the recipe with per-layer overrides."""
    recipe = load_recipe(recipe)
    if recipe.mixed is None:
        raise RecipeError(f"recipe {recipe.name!r} has no 'mixed' section")
    if not calls:
        raise CalibrationError("mixed precision needs calibration items to measure sensitivity")
    plans, _ = plan_layers(model, recipe)
    layers = {n: model.get_submodule(n) for n in plans}
    shapes = {n: tuple(m.weight.shape) for n, m in layers.items()}
    if table is None or table.layers != list(layers):
        table = measure_sensitivity(model, layers, calls, layer_candidates(recipe.mixed, shapes), progress)
    alloc = choose(table, recipe.mixed, shapes, model_bytes=weight_bytes(model))
    measured = measure_allocation(model, layers, calls, alloc.specs)
    return MixedResult(recipe.resolve_mixed(alloc.specs), alloc, table, measured)


def quantize(
    model: nn.Module,
    recipe: str | Path | Recipe = "w8",
    calibration: Iterable[Any] | None = None,
    timestep_of: TimestepOf | None = None,
    segments: dict[str, list[int]] | None = None,
    progress: bool = False,
    stats: dict[str, LayerStats] | None = None,
    load_block: Callable[[str], None] | None = None,
) -> nn.Module:
    """Quantize `model` in place and return it; `model.diffq.report` says what was done.

    recipe: built-in name ("w8a8", "w8", "w4g64", ...), YAML path or Recipe.
    calibration: items are a tensor, a tuple of args, a dict of kwargs or an (args, kwargs) pair
    (or a callable that drives the model); needed for static activation scales and for weights
    chosen from the layer inputs (weights.method gptq / awq, activations.smoothing), which share
    one pass over it. timestep_of(args, kwargs) returns the timestep of a
    call (default: the `timestep` keyword or the second positional argument).
    segments: layer name -> input channel segment sizes that get separate activation scales
    (used where the layer's activation spec sets split_skip).
    stats: precollected statistics (see `collect_stats`), instead of running `calibration`.
    load_block: for a model whose repeated blocks are still on the meta device, loads the
    float weights of the block it is given the name of; calibration then runs block by block
    (see `diffq.sequential` and `diffq.integrations.lowmem`).
    A recipe with a `mixed` section first measures per-layer sensitivity on the first
    prompts * timesteps calibration items and picks widths (see `plan_mixed`); the evidence
    is kept as `model.diffq.report.mixed`.
    """
    recipe = load_recipe(recipe)
    mixed = None
    if recipe.mixed is not None:
        if callable(calibration):
            raise CalibrationError("mixed precision replays calibration items; pass a list, not a callable")
        calibration = list(calibration or [])  # used twice: sensitivity, then statistics
        items = calibration[: recipe.mixed.prompts * recipe.mixed.timesteps]
        mixed = plan_mixed(model, recipe, items, progress=progress)
        recipe = mixed.recipe
    linearize_conv1d(model)  # GPT-2's transposed Conv1D layers become plannable nn.Linear
    plans, report = plan_layers(model, recipe)
    report.mixed = mixed
    keep_fp32(model, plans, report)
    needs = {n: nd for n, p in plans.items() if (nd := input_needs(model.get_submodule(n), p))}
    if load_block is not None or (needs and uses_sequential(model, recipe, needs)):
        if calibration is None or callable(calibration):
            raise CalibrationError("sequential calibration needs a list of calibration items "
                                   "(pass calibration=[...])")
        if recipe.sequential is False:
            raise RecipeError("load_block (out-of-core) needs block-by-block calibration, but the "
                              "recipe sets sequential: false")
        from diffq.sequential import quantize_sequential

        prepared = quantize_sequential(model, plans, calibration, progress=progress,
                                       load_block=load_block, materialize=offload_context(model))
        report.sequential = True
        return _finish(model, recipe, plans, report, prepared, timestep_of)
    segments = {n: seg for n, seg in (segments or {}).items() if n in plans
                and plans[n].activations is not None and plans[n].activations.split_skip}
    layers = static_layers(model, plans, segments)
    inputs = None
    if needs:
        if calibration is None:
            raise CalibrationError("the recipe chooses weights from the layer inputs (weights.method "
                                   "gptq / awq or activations.smoothing) and needs calibration data "
                                   "(pass calibration=...)")
        inputs = InputCollector({n: model.get_submodule(n) for n in needs},
                                hessian=[n for n, (h, _) in needs.items() if h],
                                samples={n: k for n, (_, k) in needs.items() if k})
    if (layers and stats is None) or inputs is not None:
        if calibration is None:
            raise CalibrationError(
                "the recipe quantizes activations statically and needs calibration data "
                "(pass calibration=...), or use a weight-only / dynamic recipe"
            )
        found = collect_stats(model, layers if stats is None else {}, calibration, timestep_of,
                              progress, inputs)
        stats = found if stats is None else stats
    missing = [n for n in layers if n not in (stats or {})]
    if missing:
        raise CalibrationError(f"no calibration statistics for layer {missing[0]!r} "
                               f"({len(missing)} layers); were they collected for another model?")
    stats = {n: stats[n] for n in layers}
    input_stats = {} if inputs is None else inputs.stats()
    prepared, converted = prepare_and_convert(model, plans, {n: input_stats[n] for n in needs},
                                              segments, offload_context(model))
    bounds = {}  # one set of boundaries per (K, method), shared by all layers of the model
    for name, st in stats.items():
        spec = plans[name].activations
        key = (spec.timestep_groups, spec.timestep_grouping)
        if key not in bounds:
            bounds[key] = choose_boundaries(stats, *key)
        scale, zp = scale_table(st, bounds[key], spec)
        converted[name].input_quant.set_table(scale, bounds[key], zp)
    return _finish(model, recipe, plans, report, prepared, timestep_of)


def offload_context(model: nn.Module) -> Callable[[nn.Module], AbstractContextManager]:
    """module -> a context in which its weights are real: accelerate's align_module_device for
    models dispatched with offloaded weights (device_map with "cpu" / "disk", cpu_offload),
    else a no-op. Quantized twins are built inside it and stay in memory."""
    try:
        from accelerate.utils import align_module_device, has_offloaded_params
    except ImportError:
        return lambda _m: nullcontext()
    if any(has_offloaded_params(m) for m in model.modules()):
        return align_module_device
    return lambda _m: nullcontext()


def keep_fp32(model: nn.Module, plans: dict[str, LayerPlan], report: QuantizationReport) -> None:
    """Leave float the layers a transformers model keeps in fp32 (`_keep_in_fp32_modules`, e.g.
    T5's `wo`, whose caller reads `.weight.dtype`), in place of `plans` / `report`."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name in [n for n in plans if keep & set(n.split("."))]:
        del plans[name]
        report.skipped[name] = "kept in fp32 by the model (_keep_in_fp32_modules)"


def uses_sequential(model: nn.Module, recipe: Recipe, needs: dict[str, tuple[bool, int]]) -> bool:
    """Block-by-block calibration: when the recipe says so, or by default for causal LMs
    (class name *ForCausalLM / *LMHeadModel) whose layers need Hessians (GPTQ, AWQ)."""
    if recipe.sequential is not None:
        return recipe.sequential
    causal = type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    return causal and any(h for h, _ in needs.values())


def _finish(model: nn.Module, recipe: Recipe, plans: dict[str, LayerPlan], report: QuantizationReport,
            prepared: dict, timestep_of: TimestepOf | None) -> nn.Module:
    attach_clock(model, timestep_of)
    report.quantized = {n: describe_plan(p) + (f" [{prepared[n].note}]" if n in prepared else "")
                        for n, p in plans.items()}
    state = diffq_state(model)
    state.report, state.recipe = report, recipe
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


__all__ = ["quantize", "plan_mixed", "MixedResult", "weight_bytes", "attach_clock", "QuantizationReport"]
