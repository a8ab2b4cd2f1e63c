"""Calibration that checks itself: each static layer's output error, measured on calls held
back from the statistics, for the recipe's scales and the cheaper-to-costlier fallbacks; the
first fallback that brings a layer in line is chosen.

Run on the float model with FAKE-QUANT (quantize-dequantize) inputs and weights: an analysis
tool, like sensitivity; the chosen layers are then converted to real int8 storage and kernels.
For a layer with float input x and output y = f(x, W):

    error(candidate) = ||f(q_c(x), dq(W)) - y||^2 / ||y||^2 summed over the held-back calls,

with q_c the candidate's activation quantizer: the recipe's static scales (its observer, at
the call's timestep group), percentile / MSE observers from the same statistics, or dynamic
per-token scales. A static layer is in line when its SQNR is within `margin_db` of the
dynamic one's or at least `good_db` (a layer at 30 dB hardly moves the model's output, and
dynamic scales cost a reduction per token at run time); otherwise it takes the first observer
that is, else dynamic activations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from diffq.calib.collector import LayerStats, call_model
from diffq.calib.hooks import input_hooks
from diffq.calib.scales import group_of, scale_table
from diffq.core.formats import get_format
from diffq.core.granularity import PerTensor, PerToken
from diffq.core.quant import QParams, choose_qparams, fake_quantize
from diffq.core.recipe import ActivationSpec, LayerPlan
from diffq.core.weights import quantize_weight

OBSERVERS = ("percentile", "mse")  # the fallbacks tried before dynamic, cheapest first


def db(err: float) -> float:
    """Relative squared error as SQNR in dB (inf for none)."""
    return math.inf if err <= 0 else -10 * math.log10(err)


@dataclass
class LayerCheck:
    """One static layer's measured errors (SQNR dB per candidate) and the choice made."""

    sqnr: dict[str, float]
    choice: str  # "static" (recipe's observer), an observer name, or "dynamic"

    @property
    def chosen_db(self) -> float:
        return self.sqnr[self.choice]


@dataclass
class Verification:
    layers: dict[str, LayerCheck] = field(default_factory=dict)
    calls: int = 0

    def fallbacks(self) -> dict[str, str]:
        return {n: c.choice for n, c in self.layers.items() if c.choice != "static"}


def _fq_static(x: torch.Tensor, scale: torch.Tensor, segments: list[int], axis: int) -> torch.Tensor:
    shape = [1] * x.dim()
    shape[axis] = -1
    s = torch.cat([scale[i:i + 1].expand(n) for i, n in enumerate(segments)]).reshape(shape)
    return fake_quantize(x, QParams(s), get_format("int8"), PerTensor())


def _fq_dynamic(x: torch.Tensor, axis: int) -> torch.Tensor:
    int8 = get_format("int8")
    g = PerToken(axis)
    return fake_quantize(x, choose_qparams(x, int8, g), int8, g)


def _apply(m: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if isinstance(m, nn.Linear):
        return F.linear(x, w, m.bias)
    return F.conv2d(x, w, m.bias, m.stride, m.padding, m.dilation, m.groups)


@torch.no_grad()
def verify_layers(model: nn.Module, plans: dict[str, LayerPlan], stats: dict[str, LayerStats],
                  segments: dict[str, list[int]], boundaries: dict[tuple, torch.Tensor],
                  calls: list, clock, margin_db: float = 6.0,
                  good_db: float = 30.0) -> Verification:
    """Measure every static layer of `plans` (float `model`, with `clock` hooked: anything whose
    `.value` is the current call's timestep) on `calls`."""
    tables: dict[str, dict[str, torch.Tensor]] = {}
    bounds: dict[str, torch.Tensor] = {}
    for n, st in stats.items():
        spec: ActivationSpec = plans[n].activations
        b = boundaries[(spec.timestep_groups, spec.timestep_grouping)]
        bounds[n] = b
        tables[n] = {"static": scale_table(st, b, spec)[0]}
        for obs in OBSERVERS:
            if obs != spec.observer:
                tables[n][obs] = scale_table(st, b, replace(spec, observer=obs))[0]
    weights = {n: quantize_weight(model.get_submodule(n).weight, plans[n].weights).dequantize()
               for n in stats}
    err = {n: {c: 0.0 for c in [*tables[n], "dynamic"]} for n in stats}
    power = dict.fromkeys(stats, 0.0)

    def hook(name, m):
        axis = -1 if isinstance(m, nn.Linear) else 1
        segs = segments.get(name, [m.in_features if axis == -1 else m.in_channels])

        def run(_m, args):
            x = args[0].float()
            w = weights[name].to(x.dtype)
            y = _apply(m, x, m.weight.float())
            power[name] += float(y.double().pow(2).sum())
            t = clock.value
            b = bounds[name]
            g = 0 if t is None or len(b) == 0 else int(group_of(torch.tensor([t]), b)[0])
            ax = axis % x.dim()
            for cand, table in tables[name].items():
                scale = table[g] if table.shape[1] == len(segs) else table[g, :1].expand(len(segs))
                yq = _apply(m, _fq_static(x, scale, segs, ax), w)
                err[name][cand] += float((yq - y).double().pow(2).sum())
            yq = _apply(m, _fq_dynamic(x, ax), w)
            err[name]["dynamic"] += float((yq - y).double().pow(2).sum())
        return run

    with input_hooks({n: model.get_submodule(n) for n in stats}, hook), torch.inference_mode():
        for call in calls:
            call_model(model, call)
    out = Verification(calls=len(calls))
    for n in stats:
        sq = {c: db(e / power[n]) if power[n] > 0 else math.inf for c, e in err[n].items()}
        out.layers[n] = LayerCheck(sq, choose(sq, margin_db, good_db))
    return out


def choose(sqnr: dict[str, float], margin_db: float, good_db: float) -> str:
    """The cheapest candidate in line: the recipe's static scales, another observer, dynamic."""
    bar = min(sqnr["dynamic"] - margin_db, good_db)
    for cand in ("static", *OBSERVERS):
        if cand in sqnr and sqnr[cand] >= bar:
            return cand
    return "dynamic"
