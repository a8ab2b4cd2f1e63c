"""Weights chosen by calibration-driven algorithms (GPTQ, AWQ, SmoothQuant) for planned layers,
before the modules are swapped: the glue between `diffq.calib.hessian` statistics and the pure
functions of `diffq.algos`."""
from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace

import torch
from torch import nn

from diffq.algos.hessian import rescale_hessian
from diffq.algos.methods import weight_method
from diffq.algos.smoothquant import smooth_scales, smooth_search, smooth_weight
from diffq.calib.hessian import InputStats, hessian_problem
from diffq.core.recipe import LayerPlan
from diffq.core.weights import QuantizedWeight, quantize_weight
from diffq.errors import RecipeError
from diffq.nn.base import QuantizedLayer
from diffq.nn.convert import convert, is_outlier_plan
from diffq.nn.qoutlier import outlier_slots


@dataclass
class PreparedLayer:
    """A layer's quantized weight, the factor its inputs get at run time (1/s for AWQ and
    SmoothQuant, [C]) and a note for the report."""

    weight: QuantizedWeight
    input_scale: torch.Tensor | None
    note: str
    outliers: torch.Tensor | None = None  # LLM.int8() channel slots [slots], -1 unused


def _smooths(module: nn.Module, plan: LayerPlan) -> bool:
    a = plan.activations
    return a is not None and a.smoothing != "none" and isinstance(module, nn.Linear)


def input_needs(module: nn.Module, plan: LayerPlan) -> tuple[bool, int] | None:
    """(needs the Hessian, sample rows to keep) for a layer whose plan uses a calibrated weight
    method or smoothing, None for plain RTN layers. Raises RecipeError for unsupported combinations."""
    w, a = plan.weights, plan.activations
    method = weight_method(w.method)
    if method.search_scales is not None and a is not None and (a.mode == "static" or a.smoothing != "none"):
        raise RecipeError(f"weights.method {w.method!r} scales the layer input: it needs activations "
                          "none or dynamic without smoothing")
    if is_outlier_plan(module, plan):
        if method.needs_hessian:
            raise RecipeError("activations.outlier_threshold works with weights.method 'rtn'")
        return False, 0  # max |x| per channel only
    if not method.needs_hessian and (a is None or a.smoothing == "none"):
        return None
    hessian = method.needs_hessian and hessian_problem(module) is None
    # the layers an algorithm cannot handle still pass through prepare_layer, which says why
    return hessian, 512 if _smooths(module, plan) and a.smooth_alpha is None else 0


def _taps(module: nn.Module) -> int:
    """Weight columns per input channel: kh * kw for a conv, 1 for a Linear."""
    return module.weight[0, 0].numel() if isinstance(module, nn.Conv2d) else 1


def _columns(module: nn.Module, per_channel: torch.Tensor) -> torch.Tensor:
    """Per-input-channel values [C] repeated over a conv's kernel taps: one per weight column."""
    return per_channel.repeat_interleave(_taps(module))


@torch.no_grad()
def prepare_layer(module: nn.Module, plan: LayerPlan, stats: InputStats | None) -> PreparedLayer:
    """Quantize `module.weight` as its plan's method says, from its input statistics."""
    spec = plan.weights
    weight = module.weight.detach().float()
    if is_outlier_plan(module, plan):
        a = plan.activations
        idx = outlier_slots(stats.max_abs.float(), a.outlier_threshold, min(a.max_outliers, weight.shape[1]))
        used = idx[idx >= 0]
        qw = quantize_weight(weight.index_fill(1, used, 0.0), spec)
        return PreparedLayer(qw, None, f"{used.numel()} outlier channels in 16-bit", idx)
    s, notes = None, []
    if _smooths(module, plan):
        a = plan.activations
        if a.smooth_alpha is not None:
            s, alpha = smooth_scales(stats.max_abs, weight, a.smooth_alpha), a.smooth_alpha
        else:
            rtn_spec = replace(spec, method="rtn", gptq=None)
            s, alpha = smooth_search(weight, stats.samples.to(weight.device), stats.max_abs, rtn_spec,
                                     act_format=a.format)
        notes.append(f"smoothquant α={alpha:.2f}")
    elif plan.activations is not None and plan.activations.smoothing != "none":
        notes.append("no smoothing (Linear only)")
    method = weight_method(spec.method)
    problem = hessian_problem(module)
    if method.needs_hessian and problem:
        notes.append(f"rtn: {spec.method} needs a Linear or groups=1 Conv2d ({problem})")
    h = None if stats is None or stats.hessian is None else stats.hessian
    if method.search_scales is not None and h is not None:
        s, note = method.search_scales(weight, h, _columns(module, stats.mean_abs), spec)
        s = s[:: _taps(module)]  # the search saw every column; the scale is per channel
        notes.append(note)
    if s is not None:
        weight = smooth_weight(weight.double(), s).float()
        h = None if h is None else rescale_hessian(h, _columns(module, s))
    qw, note = method.round(weight, h, spec)
    notes += [note] if note else []
    inv = None if s is None else (1.0 / s).float()
    return PreparedLayer(qw, inv, ", ".join(notes))


def prepare_and_convert(
    model: nn.Module, plans: dict[str, LayerPlan], stats: dict[str, InputStats],
    segments: dict[str, list[int]] | None = None,
    materialize: Callable[[nn.Module], AbstractContextManager] | None = None,
    smooth: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, PreparedLayer], dict[str, QuantizedLayer]]:
    """Choose the weights of the layers in `stats` (GPTQ, AWQ, ... from their inputs), then swap
    every planned layer of `model` for its quantized twin (see `convert`). `smooth`: layer ->
    s [C] of static smoothing (weights W diag(s), inputs x / s). `materialize(module)`: a
    context in which an offloaded module's weights are real. Returns (prepared, converted)."""
    prepared = {}
    for n in stats:
        with nullcontext() if materialize is None else materialize(model.get_submodule(n)):
            prepared[n] = prepare_layer(model.get_submodule(n), plans[n], stats[n])
    for n, s in (smooth or {}).items():
        with nullcontext() if materialize is None else materialize(model.get_submodule(n)):
            w = smooth_weight(model.get_submodule(n).weight.detach().double(), s).float()
            prepared[n] = PreparedLayer(quantize_weight(w, plans[n].weights), (1.0 / s).float(),
                                        "smoothed, static")
    converted = convert(model, plans, segments, weights={n: p.weight for n, p in prepared.items()},
                        input_scales={n: p.input_scale for n, p in prepared.items()
                                      if p.input_scale is not None},
                        outliers={n: p.outliers for n, p in prepared.items() if p.outliers is not None},
                        materialize=materialize)
    return prepared, converted
