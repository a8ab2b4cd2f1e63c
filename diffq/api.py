"""The lifecycle for any nn.Module: `plan` (what each layer becomes and needs) -> `calibrate`
(run any data; activation statistics per timestep and the layer inputs the weight methods
need) -> `convert` (choose weights, swap the modules). `quantize` is the three in a row.

    p = diffq.plan(unet, "w8a8", example=call)   # roles and skip concats: one traced call
    with diffq.calibrate(unet, p) as cal:
        cal.run(calls)            # call items, or a callable that drives a pipeline
    diffq.convert(unet, p, cal.stats)
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffq.calib.collector import (
    ActivationCollector,
    LayerStats,
    as_call,
    feed,
    first_call,
    unsplit,
)
from diffq.calib.hessian import InputCollector, InputStats
from diffq.calib.scales import choose_boundaries, scale_table, smoothed_table
from diffq.calib.store import load_stats, merge_stats, save_stats
from diffq.calib.structure import Structure, trace_structure
from diffq.core.config import from_dict, to_dict
from diffq.core.recipe import ActivationSpec, LayerPlan, Recipe, WeightSpec, load_recipe
from diffq.errors import CalibrationError, RecipeError
from diffq.mixed.plan import Allocation, choose, layer_candidates
from diffq.mixed.sensitivity import SensitivityTable, measure_allocation, measure_sensitivity
from diffq.nn.base import QuantizedLayer, layer_kernels
from diffq.nn.clock import attach_clock
from diffq.nn.convert import QuantizationReport, describe_plan, linearize_conv1d, plan_layers
from diffq.nn.prepare import input_needs, prepare_and_convert
from diffq.nn.runtime import attach_runtime
from diffq.nn.state import diffq_state
from diffq.nn.timestep import TimestepClock, TimestepOf, install_clock
from diffq.verification import check_layers, verifiable, with_fallbacks


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


@dataclass(frozen=True)
class Plan:
    """What `convert` will do to each layer of one model, and what it needs first: `layers`
    (the scheme of each layer to quantize), `segments` (input channel segments with their own
    activation scales), `needs` (layers whose weights come from their inputs: (Hessian, sample
    rows)), `skipped` (layers kept float and why), `roles` (what each layer does, when a call
    was traced). Frozen; `to_dict` / `from_dict` round-trip."""

    recipe: Recipe
    layers: dict[str, LayerPlan]
    segments: dict[str, list[int]] = field(default_factory=dict)
    needs: dict[str, tuple[bool, int]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    unmatched_patterns: tuple[str, ...] = ()
    roles: dict[str, list[str]] = field(default_factory=dict)

    @property
    def static(self) -> list[str]:
        """The layers whose activation scales come from calibration statistics."""
        return [n for n, p in self.layers.items()
                if p.activations is not None and p.activations.mode == "static"]

    def role(self, name: str) -> str:
        return ", ".join(self.roles.get(name, ())) or "body"

    def to_dict(self) -> dict:
        return {"recipe": self.recipe.to_dict(),
                "layers": {n: {"weights": to_dict(p.weights),
                               "activations": None if p.activations is None else to_dict(p.activations)}
                           for n, p in self.layers.items()},
                "segments": self.segments, "needs": {n: list(v) for n, v in self.needs.items()},
                "skipped": self.skipped, "unmatched_patterns": list(self.unmatched_patterns),
                "roles": self.roles}

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        layers = {n: LayerPlan(from_dict(WeightSpec, v["weights"]), None if v["activations"] is None
                               else from_dict(ActivationSpec, v["activations"]))
                  for n, v in d["layers"].items()}
        return cls(Recipe.from_dict(d["recipe"]), layers, d["segments"],
                   {n: tuple(v) for n, v in d["needs"].items()}, d["skipped"],
                   tuple(d["unmatched_patterns"]), d.get("roles", {}))


def plan(model: nn.Module, recipe: str | Path | Recipe,
         segments: dict[str, list[int]] | None = None, example: Any = None,
         structure: Structure | None = None) -> Plan:
    """Resolve `recipe` against `model`'s layers (a mixed recipe: its widths as they stand; see
    `plan_mixed`). `example`: one call of the model (a calibration item) to trace for the
    layers' roles and skip concats (`diffq.calib.structure`), or that `structure` itself; a
    recipe that names roles needs one. `segments`: layer -> input channel segments that get
    their own activation scales where the layer's spec splits them (default: the traced skip
    concats). transformers' Conv1D layers become nn.Linear first so they can be planned."""
    recipe = load_recipe(recipe)
    linearize_conv1d(model)
    if structure is None and example is not None:
        structure = trace_structure(model, *as_call(example))
    if structure is None and recipe.uses_roles():
        raise CalibrationError(f"recipe {recipe.name!r} keeps layers float by role "
                               f"({', '.join(recipe.keep_float) or 'overrides'}), which one example "
                               "call shows: pass calibration=[...] (or example=...)")
    roles = {} if structure is None else structure.roles
    layers, report = plan_layers(model, recipe, roles)
    keep_fp32(model, layers, report)
    needs = {n: nd for n, p in layers.items() if (nd := input_needs(model.get_submodule(n), p))}
    if segments is None and structure is not None:
        segments = structure.segments
    kept = {n: list(seg) for n, seg in (segments or {}).items() if n in layers
            and layers[n].activations is not None and layers[n].activations.split_skip}
    return Plan(recipe, layers, kept, needs, dict(report.skipped), tuple(report.unmatched_patterns),
                {n: sorted(r) for n, r in roles.items() if r})


@dataclass(frozen=True)
class CalibrationStats:
    """What a calibration collected: activation statistics per timestep (`LayerStats`, merge
    with `merge_stats`, save with `save_stats`) and the layer inputs GPTQ / AWQ / smoothing use."""

    activations: dict[str, LayerStats]
    inputs: dict[str, InputStats]


class Calibration:
    """`with diffq.calibrate(model, plan) as cal:` hooks the model; `cal.run(data)` as often as
    needed; `cal.activation_stats` / `cal.input_stats` after (merge the former across runs,
    processes or resumed work with `diffq.calib.store.merge_stats`)."""

    def __init__(self, model: nn.Module, plans: Plan | Iterable[Plan], timestep_of=None,
                 activations: bool = True, inputs: bool = True, holdout: int = 0) -> None:
        plans = [plans] if isinstance(plans, Plan) else list(plans)
        self.model, self.timestep_of = model, timestep_of
        self.holdout, self.held = holdout, []  # calls kept out of the statistics
        self._per_t: dict = {}
        layers: dict = {}
        for p in plans:  # several plans: the union of their layers, each input split if any splits
            for n, v in static_layers(model, p.layers, p.segments).items():
                if n not in layers or len(v[2]) > len(layers[n][2]):
                    layers[n] = v
        needs = {n: nd for p in plans for n, nd in p.needs.items()} if inputs else {}
        self._clock = TimestepClock()
        self._activations = ActivationCollector(layers if activations else {}, self._clock)
        self._inputs = InputCollector({n: model.get_submodule(n) for n in needs},
                                      hessian=[n for n, (h, _) in needs.items() if h],
                                      samples={n: k for n, (_, k) in needs.items() if k}) if needs else None
        self._handle = None

    def __enter__(self) -> Calibration:
        self._handle = install_clock(self.model, self._clock, self.timestep_of)
        self._hold = self.model.register_forward_pre_hook(self._hold_back, with_kwargs=True)
        self._activations.__enter__()
        if self._inputs is not None:
            self._inputs.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._inputs is not None:
            self._inputs.__exit__(*exc)
        self._activations.__exit__(*exc)
        self._handle.remove()
        self._hold.remove()
        self._clock.held_back = False

    def _hold_back(self, _m, args: tuple, kwargs: dict) -> None:
        """Keep the second call of each timestep (up to `holdout` calls; every call with
        holdout=ALL) out of the statistics and record it, so verification runs on calls the
        scales never saw, timesteps covered."""
        t = self._clock.value
        seen = self._per_t.get(t, 0)
        self._per_t[t] = seen + 1
        self._clock.held_back = self.holdout == ALL or (seen == 1 and len(self.held) < self.holdout)
        if self._clock.held_back:
            copy = lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
            self.held.append((tuple(copy(a) for a in args), {k: copy(v) for k, v in kwargs.items()}))

    def run(self, data, progress: bool = False) -> None:
        """Feed `data` through the model: call items (tensor, args tuple, kwargs dict or (args,
        kwargs)) or a callable that drives it (e.g. a pipeline over prompts)."""
        feed(self.model, data, progress)

    @property
    def stats(self) -> CalibrationStats:
        """Both halves, as `convert` takes them."""
        return CalibrationStats(self.activation_stats, self.input_stats)

    @property
    def activation_stats(self) -> dict[str, LayerStats]:
        return self._activations.stats() if self._activations.layers else {}

    @property
    def input_stats(self) -> dict[str, InputStats]:
        return {} if self._inputs is None else self._inputs.stats()


def calibrate(model: nn.Module, plans: Plan | Iterable[Plan], timestep_of: TimestepOf | None = None,
              activations: bool = True, inputs: bool = True, holdout: int = 0) -> Calibration:
    """The calibration context of `plans` on `model` (see `Calibration`); `activations` /
    `inputs` False skips collecting that half; `holdout` calls (the second of each timestep)
    are kept out of the statistics for `convert(..., verify=cal.held)`."""
    return Calibration(model, plans, timestep_of, activations, inputs, holdout)


def convert(model: nn.Module, plan: Plan,
            activation_stats: CalibrationStats | dict[str, LayerStats] | None = None,
            input_stats: dict[str, InputStats] | None = None,
            timestep_of: TimestepOf | None = None, verify: list | None = None) -> nn.Module:
    """Choose every planned layer's weights (GPTQ / AWQ / smoothing from `input_stats`), swap the
    layers for their quantized twins with activation scale tables from `activation_stats`, and
    hook the timestep clock. `activation_stats` may be a whole `cal.stats`. Statistics collected
    split by segment serve unsplit layers too. `verify`: held-back calls (`cal.held`) on which
    static int8 layers are checked first and the whole model after (see `diffq.calib.verify`)."""
    if isinstance(activation_stats, CalibrationStats):
        activation_stats, input_stats = activation_stats.activations, activation_stats.inputs
    acts = activation_stats or {}
    missing = [n for n in plan.static if n not in acts]
    if missing:
        raise CalibrationError(f"no calibration statistics for layer {missing[0]!r} "
                               f"({len(missing)} layers); were they collected for another model?")
    absent = [n for n in plan.needs if n not in (input_stats or {})]
    if absent:
        raise CalibrationError(f"layer {absent[0]!r} chooses its weights from its inputs; calibrate "
                               "with inputs=True before convert")
    stats = {n: acts[n] if n in plan.segments else unsplit(acts[n]) for n in plan.static}
    bounds = {}  # one set of boundaries per (K, method), shared by all layers of the model
    for name in stats:
        spec = plan.layers[name].activations
        key = (spec.timestep_groups, spec.timestep_grouping)
        if key not in bounds:
            bounds[key] = choose_boundaries(stats, *key)
    check, smooth = None, {}
    if verify and verifiable(plan):
        check = check_layers(model, plan, stats, bounds, verify, timestep_of)
        plan = with_fallbacks(plan, check.verification)
        stats = {n: st for n, st in stats.items() if n in plan.static}
        smooth = {n: c.smooth for n, c in check.verification.layers.items() if c.choice == "smooth"}
    prepared, converted = prepare_and_convert(model, plan.layers, {n: input_stats[n] for n in plan.needs},
                                              plan.segments, offload_context(model), smooth)
    for name, st in stats.items():
        spec = plan.layers[name].activations
        key = (spec.timestep_groups, spec.timestep_grouping)
        if name in smooth:
            scale, zp = smoothed_table(unsplit(st), bounds[key], smooth[name]), None
        else:
            scale, zp = scale_table(st, bounds[key], spec)
        converted[name].input_quant.set_table(scale, bounds[key], zp)
    _finish(model, plan, prepared, timestep_of)
    if check is not None:
        report = diffq_state(model).report
        report.verification = check.widen(model, plan)
        report.kernels = layer_kernels(model)  # widened layers run another kernel
    return model


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
    stats: precollected activation statistics (see `calibrate`), instead of running `calibration`.
    load_block: for a model whose repeated blocks are still on the meta device, loads the
    float weights of the block it is given the name of; calibration then runs block by block
    (see `diffq.sequential` and `diffq.integrations.lowmem`).
    A recipe with a `mixed` section first measures per-layer sensitivity on the first
    prompts * timesteps calibration items and picks widths (see `plan_mixed`); the evidence
    is kept as `model.diffq.report.mixed`.
    """
    recipe = load_recipe(recipe)
    if calibration is not None and not callable(calibration) and not isinstance(calibration, list):
        calibration = list(calibration)  # read more than once: example call, statistics
    if calibration is None and stats is None and recipe.needs_calibration():
        static = any(a is not None and a.mode == "static"
                     for a in (recipe.activations, *(o.activations for o in recipe.overrides)))
        raise CalibrationError(_NEEDS_DATA["static" if static else "inputs"])
    example = None
    if calibration is not None and recipe.uses_roles():
        example = first_call(model, calibration)
    mixed = None
    if recipe.mixed is not None:
        if callable(calibration):
            raise CalibrationError("mixed precision replays calibration items; pass a list, not a callable")
        calibration = list(calibration or [])  # used twice: sensitivity, then statistics
        items = calibration[: recipe.mixed.prompts * recipe.mixed.timesteps]
        mixed = plan_mixed(model, recipe, items, progress=progress)
        recipe = mixed.recipe
    p = plan(model, recipe, segments, example)
    if load_block is not None or (p.needs and uses_sequential(model, recipe, p.needs)):
        _quantize_sequential(model, p, calibration, progress, load_block, timestep_of)
    else:
        acts, inputs = stats, {}
        if (p.static and stats is None) or p.needs:
            if calibration is None:
                raise CalibrationError(_NEEDS_DATA["inputs" if p.needs else "static"])
            holdout = HOLDOUT if stats is None and verifiable(p) else 0
            with calibrate(model, p, timestep_of, activations=stats is None, holdout=holdout) as cal:
                cal.run(calibration, progress)
            acts = cal.activation_stats if stats is None else stats
            inputs = cal.input_stats
        convert(model, p, acts, inputs, timestep_of, verify=cal.held if p.static and stats is None else None)
    diffq_state(model).report.mixed = mixed
    return model


ALL = -1  # Calibration(holdout=ALL): every call is held back (e.g. one designated prompt batch)
HOLDOUT = 16  # calls held back from the statistics to verify static layers (2nd of each timestep)

_NEEDS_DATA = {
    "inputs": "the recipe chooses weights from the layer inputs (weights.method gptq / awq or "
              "activations.smoothing) and needs calibration data (pass calibration=...)",
    "static": "the recipe quantizes activations statically and needs calibration data (pass "
              "calibration=...), or use a weight-only / dynamic recipe",
}


def _quantize_sequential(model, p: Plan, calibration, progress, load_block, timestep_of) -> None:
    """Block-by-block calibration and conversion (causal LMs, out-of-core models)."""
    if calibration is None or callable(calibration):
        raise CalibrationError("sequential calibration needs a list of calibration items "
                               "(pass calibration=[...])")
    if p.recipe.sequential is False:
        raise RecipeError("load_block (out-of-core) needs block-by-block calibration, but the "
                          "recipe sets sequential: false")
    from diffq.sequential import quantize_sequential

    prepared = quantize_sequential(model, p.layers, calibration, progress=progress,
                                   load_block=load_block, materialize=offload_context(model))
    _finish(model, p, prepared, timestep_of, sequential=True)


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


def _finish(model: nn.Module, plan: Plan, prepared: dict, timestep_of: TimestepOf | None,
            sequential: bool = False) -> nn.Module:
    attach_runtime(model, plan.recipe.attention, timestep_of)
    report = QuantizationReport(plan.recipe.name, skipped=dict(plan.skipped),
                                unmatched_patterns=list(plan.unmatched_patterns), sequential=sequential)
    report.quantized = {n: describe_plan(p) + (f" [{prepared[n].note}]" if n in prepared else "")
                        for n, p in plan.layers.items()}
    report.kernels = layer_kernels(model)
    state = diffq_state(model)
    state.report, state.recipe = report, plan.recipe
    return model


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


__all__ = ["ALL", "verifiable", "plan", "Plan", "calibrate", "Calibration", "CalibrationStats", "convert",
           "quantize",
           "plan_mixed", "MixedResult", "weight_bytes", "attach_clock", "QuantizationReport",
           "load_recipe", "LayerStats", "merge_stats", "save_stats", "load_stats", "SensitivityTable"]
