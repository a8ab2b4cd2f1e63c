"""Verified calibration at the lifecycle level: the per-layer check before conversion
(`diffq.calib.verify`, fake-quant on the float model), the plan it implies (observer, smoothing,
dynamic or float per layer), and the whole-model check after conversion on the same held-back
calls, which widens the dynamic fallback until the model is within 0.5 dB of plain all-dynamic
W8A8. `diffq.api.convert(..., verify=calls)` runs it; plans are `diffq.api.Plan`s."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from diffq.calib.collector import call_model
from diffq.calib.verify import Verification, dequantized_weights, dynamic_twin_outputs, verify_layers
from diffq.core.quant import sqnr_db
from diffq.core.recipe import ActivationSpec, LayerPlan
from diffq.nn.activation import ActivationQuantizer
from diffq.nn.base import QuantizedLayer
from diffq.nn.convert import describe_plan
from diffq.nn.state import diffq_state
from diffq.nn.timestep import TimestepClock, TimestepOf, install_clock


@dataclass
class Check:
    """Verification of one conversion: per-layer choices (before) and the whole-model check on
    the same held-back calls (after), which widens the dynamic fallback when needed."""

    verification: Verification
    calls: list
    reference: list  # the float model's outputs on `calls`
    dynamic_db: float  # plain all-dynamic W8A8 (fake-quant twin of the float model) on them
    margin_db: float = 0.5

    def _sqnr(self, model: nn.Module) -> float:
        with torch.inference_mode():
            out = [_output_tensor(call_model(model, c)) for c in self.calls]
        return _joint_sqnr(self.reference, out)

    def widen(self, model: nn.Module, plan) -> dict:
        """Measure the converted model; while it is more than `margin_db` below plain
        all-dynamic W8A8, switch the static layers with the largest measured gap to dynamic
        (Conv2d: weight-only), an eighth of those left at a time."""
        static = [n for n in plan.static]
        chosen, dynamic = self._sqnr(model), self.dynamic_db
        widened: list[str] = []
        v = self.verification.layers
        order = sorted(static, key=lambda n: v[n].sqnr["dynamic"] - v[n].chosen_db, reverse=True)
        while chosen < dynamic - self.margin_db and order:
            k = max(1, len(order) // 8)
            step, order = order[:k], order[k:]
            for n in step:
                _set_dynamic(model.get_submodule(n))
            widened += step
            chosen = self._sqnr(model)
        report = diffq_state(model).report
        fallback = {n: "weight-only" if _conv(model.get_submodule(n)) else "dynamic" for n in widened}
        for n in widened:
            a = None if fallback[n] == "weight-only" else dynamic_spec(plan.layers[n].activations)
            report.quantized[n] = describe_plan(LayerPlan(plan.layers[n].weights, a)) + " (widened)"
        return {"calls": len(self.calls), "sqnr_db": chosen, "dynamic_sqnr_db": dynamic,
                "widened": widened,
                "layers": {n: {"sqnr_db": c.sqnr, "choice": f"{fallback[n]} (widened)" if n in widened
                               else c.choice, "role": plan.role(n)} for n, c in v.items()}}


def _output_tensor(out) -> torch.Tensor:
    """The main tensor of a model's output (diffusers / transformers outputs: the first field)."""
    if isinstance(out, torch.Tensor):
        return out.float()
    out = out.to_tuple() if hasattr(out, "to_tuple") else out
    return _output_tensor(out[0])


def _conv(m: nn.Module) -> bool:
    """Per-pixel dynamic scales cannot be factored out of a convolution's sum, so no int8 kernel
    runs a dynamic Conv2d: where a Linear falls back to dynamic int8, a Conv2d falls back to
    int8 weights with float inputs (weight-only: real storage, real compute, more accurate)."""
    return isinstance(m, nn.Conv2d) or getattr(m, "feature_axis", -1) == 1


def _set_dynamic(layer: QuantizedLayer) -> ActivationQuantizer:
    """Widen one converted layer: dynamic int8 inputs (Linear) or float inputs (Conv2d)."""
    old = layer.input_quant
    layer.input_quant = None if _conv(layer) else ActivationQuantizer(
        dynamic_spec(old.spec), old.feature_axis, [sum(old.segments)])
    return old


def _joint_sqnr(reference: list, out: list) -> float:
    return sqnr_db(torch.cat([r.flatten() for r in reference]), torch.cat([o.flatten() for o in out]))


def check_layers(model: nn.Module, plan, stats: dict, bounds: dict, calls: list,
                 timestep_of: TimestepOf | None) -> Check:
    """Per-layer verification of `plan` (a `diffq.api.Plan`) on the float model, the float
    outputs of `calls` and the all-dynamic twin's SQNR: what `convert` needs before and after."""
    clock = TimestepClock()
    handle = install_clock(model, clock, timestep_of)
    try:
        weights = dequantized_weights(model, plan.layers, stats)  # once, for both passes
        v = verify_layers(model, plan.layers, stats, plan.segments, bounds, calls, clock, weights,
                          no_smooth=frozenset(plan.needs))
        for n, c in v.layers.items():
            if c.choice == "dynamic" and _conv(model.get_submodule(n)):
                c.choice = "weight-only"
        with torch.inference_mode():
            ref = [_output_tensor(call_model(model, c)) for c in calls]
        dyn = dynamic_twin_outputs(model, weights, calls, _output_tensor)
    finally:
        handle.remove()
    return Check(v, calls, ref, _joint_sqnr(ref, dyn))


def verifiable(plan) -> bool:
    """Whether `convert(..., verify=calls)` checks this plan (static int8 layers, recipe verify)."""
    return plan.recipe.verify and any(plan.layers[n].activations.format == "int8" for n in plan.static)


def with_fallbacks(plan, v: Verification):
    """The plan with each verified layer's chosen observer, or dynamic activations (Conv2d:
    weight-only), or float."""
    layers, moved, skipped = dict(plan.layers), v.fallbacks(), dict(plan.skipped)
    for n, choice in moved.items():
        a = layers[n].activations
        if choice == "float":
            sq = v.layers[n].sqnr
            skipped[n] = (f"kept float by verification (int8 output SQNR {sq['static']:.1f} dB static, "
                          f"{sq['dynamic']:.1f} dB dynamic)")
            del layers[n]
            continue
        if choice == "weight-only":
            a = None
        elif choice == "dynamic":
            a = dynamic_spec(a)
        elif choice == "smooth":  # one scale for the smoothed input: no split
            a = dataclasses.replace(a, split_skip=False)
        else:
            a = dataclasses.replace(a, observer=choice)
        layers[n] = LayerPlan(layers[n].weights, a)
    return dataclasses.replace(plan, layers=layers, skipped=skipped, needs={
        n: nd for n, nd in plan.needs.items() if n in layers}, segments={
        n: s for n, s in plan.segments.items()
        if moved.get(n) not in ("dynamic", "weight-only", "smooth", "float")})


def dynamic_spec(a: ActivationSpec) -> ActivationSpec:
    return dataclasses.replace(a, mode="dynamic", granularity="per_token", observer="minmax",
                               timestep_groups=1, split_skip=False, float_prefix=0)
