"""Find the layers a recipe quantizes, report the ones it leaves alone, and swap modules."""
from __future__ import annotations

import fnmatch
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from diffq.core.recipe import LayerPlan, Recipe
from diffq.core.weights import QuantizedWeight
from diffq.nn.base import QuantizedLayer
from diffq.nn.qconv2d import QConv2d
from diffq.nn.qlinear import QLinear
from diffq.nn.qoutlier import QLinearOutlier

# Weight-bearing layer types diffq does not quantize (yet); they stay float and are reported.
_UNSUPPORTED = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                nn.ConvTranspose3d, nn.Embedding, nn.MultiheadAttention)


@dataclass
class QuantizationReport:
    """What `diffq.quantize` did: per-layer scheme, layers left float with the reason."""

    recipe: str
    quantized: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    unmatched_patterns: list[str] = field(default_factory=list)
    sequential: bool = False  # calibrated block by block (diffq.sequential)
    mixed: Any = None  # diffq.api.MixedResult of a mixed-precision recipe: table, widths, errors
    verification: dict | None = None  # held-back checks of static layers (diffq.api.convert)
    kernels: dict[str, str] = field(default_factory=dict)  # layer -> compute on CPU (ops.kernel_of)

    def summary(self) -> str:
        lines = [f"recipe {self.recipe}: {len(self.quantized)} layers quantized, "
                 f"{len(self.skipped)} left in float"]
        lines += [f"  kept float: {n} ({why})" for n, why in self.skipped.items()]
        lines += [f"  recipe pattern matched no layer: {p}" for p in self.unmatched_patterns]
        return "\n".join(lines)


def _group_problem(module: nn.Module, plan: LayerPlan) -> str | None:
    w = plan.weights
    k = module.weight[0].numel()
    if w.granularity == "per_group" and k % w.group_size:
        return f"reduction dim {k} not divisible by group size {w.group_size}"
    if w.bits == 4 and k % 2:
        return f"odd reduction dim {k} cannot be packed two per byte"
    return None


def plan_layers(model: nn.Module, recipe: Recipe, roles: dict[str, set[str]] | None = None
                ) -> tuple[dict[str, LayerPlan], QuantizationReport]:
    """Resolve the recipe against `model`'s Linear/Conv2d layers, which play `roles` (see
    `diffq.calib.structure`; needed when the recipe names roles)."""
    roles = roles or {}
    report = QuantizationReport(recipe.name)
    plans: dict[str, LayerPlan] = {}
    names = []
    for name, m in model.named_modules():
        names.append(name)
        if isinstance(m, QuantizedLayer):
            report.skipped[name] = "already quantized"
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            played = frozenset(roles.get(name, ()))
            plan = recipe.plan_for(name, played)
            problem = None if plan is None else _group_problem(m, plan)
            if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
                problem = f"padding_mode {m.padding_mode!r} unsupported"
            kept = sorted(played & set(recipe.keep_float))
            if plan is None:
                report.skipped[name] = f"kept float by recipe (role {', '.join(kept)})" if kept \
                    else "kept float by recipe"
            elif problem:
                report.skipped[name] = problem
            else:
                plans[name] = plan
        elif isinstance(m, _UNSUPPORTED):
            report.skipped[name] = f"unsupported layer type {type(m).__name__}"
    report.unmatched_patterns = [
        p for p in recipe.patterns() if not any(fnmatch.fnmatchcase(n, p) for n in names)
    ]
    return plans, report


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def convert(
    model: nn.Module,
    plans: dict[str, LayerPlan],
    segments: dict[str, list[int]] | None = None,
    empty: bool = False,
    weights: dict[str, QuantizedWeight] | None = None,
    input_scales: dict[str, torch.Tensor] | None = None,
    outliers: dict[str, torch.Tensor] | None = None,
    materialize: Callable[[nn.Module], AbstractContextManager] | None = None,
) -> dict[str, QuantizedLayer]:
    """Replace each planned layer by its quantized twin (empty=True: zeros, for loading).
    `weights`: already quantized weights (GPTQ, AWQ) by layer name, the others are rounded
    here; `input_scales`: per-input-channel factors [C] of AWQ / SmoothQuant layers;
    `outliers`: the 16-bit input channel slots of LLM.int8() layers (see `outlier_slots`);
    `materialize(module)`: a context in which an offloaded module's weights are real (e.g.
    accelerate's align_module_device); its quantized twin is built there and stays in memory."""
    segments, weights, input_scales = segments or {}, weights or {}, input_scales or {}
    outliers = outliers or {}
    out: dict[str, QuantizedLayer] = {}
    for name, plan in plans.items():
        m = model.get_submodule(name)
        with nullcontext() if materialize is None else materialize(m):
            q = _twin(m, name, plan, segments, weights, input_scales, outliers, empty)
            q.to(device=m.weight.device)
        if q.input_quant is not None:
            q.input_quant.name = name
        replace_module(model, name, q)
        out[name] = q
    return out


def _twin(m: nn.Module, name: str, plan: LayerPlan, segments, weights, input_scales, outliers,
          empty: bool) -> QuantizedLayer:
    if is_outlier_plan(m, plan):
        return QLinearOutlier(m, plan.weights, plan.activations, outliers.get(name), empty=empty,
                              qweight=weights.get(name))
    cls = QLinear if isinstance(m, nn.Linear) else QConv2d
    return cls(m, plan.weights, plan.activations, segments.get(name), empty=empty,
               qweight=weights.get(name), input_scale=input_scales.get(name))


def is_outlier_plan(module: nn.Module, plan: LayerPlan) -> bool:
    """Whether `plan` makes `module` an LLM.int8() layer (Linear with an outlier threshold)."""
    a = plan.activations
    return isinstance(module, nn.Linear) and a is not None and a.outlier_threshold is not None


def linearize_conv1d(model: nn.Module) -> list[str]:
    """Replace transformers' `Conv1D` (GPT-2; y = x W + b with W [in, out]) by the equivalent
    nn.Linear (W transposed), in place, so that it can be planned. Returns the names replaced.
    Matched by class name and shape so that this module never imports transformers."""
    names = []
    for name, m in list(model.named_modules()):
        if type(m).__name__ == "Conv1D" and getattr(m, "weight", None) is not None \
                and m.weight.dim() == 2 and getattr(m, "nf", None) == m.weight.shape[1]:
            k, o = m.weight.shape
            lin = nn.Linear(k, o, bias=m.bias is not None, device=m.weight.device, dtype=m.weight.dtype)
            with torch.no_grad():
                lin.weight.copy_(m.weight.t())
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            replace_module(model, name, lin)
            names.append(name)
    return names


def describe_plan(plan: LayerPlan) -> str:
    w = plan.weights
    s = f"W:{w.format}/{w.granularity}" + (f"{w.group_size}" if w.granularity == "per_group" else "")
    a = plan.activations
    if a is not None:
        s += f" A:{a.format}/{a.mode}" + (f"/K={a.timestep_groups}" if a.mode == "static" else "")
    return s
