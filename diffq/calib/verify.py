"""Calibration that checks itself: each static layer's output error, measured on calls held
back from the statistics, for the recipe's scales and the cheaper-to-costlier fallbacks; the
first fallback that brings a layer in line is chosen.

Run on the float model with FAKE-QUANT (quantize-dequantize) inputs and weights: an analysis
tool, like sensitivity; the chosen layers are then converted to real int8 storage and kernels.
For a layer with float input x and output y = f(x, W):

    error(candidate) = ||f(q_c(x), dq(W)) - y||^2 / ||y||^2 summed over the held-back calls,

with q_c the candidate's activation quantizer: the recipe's static scales (its observer, at
the call's timestep group), percentile / MSE observers from the same statistics, static
scales after SmoothQuant-style smoothing (x / s into W diag(s), s_c = max|x_c|^0.5 /
max|W_c|^0.5 from the calibrated per-channel maxima; Linear and Conv2d; the scale table
still per timestep group, so the kernels stay static int8), or dynamic per-token scales.
Among the candidates of static cost (observers, smoothing) the best is taken when it beats the
recipe's scales by more than 1 dB; it is in line when its SQNR is within `margin_db` of the
dynamic one's or at least `good_db` (a layer at 30 dB hardly moves the model's output, and
dynamic scales cost a reduction per token at run time) - smoothing only within 1 dB of
dynamic; a layer out of line goes dynamic, or float when dynamic activations still leave it
below 20 dB.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from diffq.algos.smoothquant import smooth_scales, smooth_weight
from diffq.calib.collector import LayerStats, call_model
from diffq.calib.hooks import input_hooks
from diffq.calib.scales import group_of, scale_table, smoothed_table
from diffq.core.formats import get_format
from diffq.core.granularity import PerTensor, PerToken
from diffq.core.quant import QParams, choose_qparams, fake_quantize
from diffq.core.recipe import ActivationSpec, LayerPlan
from diffq.core.weights import quantize_weight

OBSERVERS = ("percentile", "mse")  # the fallbacks tried before dynamic, cheapest first
SMOOTH_ALPHA = 0.5  # SmoothQuant's balance between activation and weight ranges
FLOOR_DB = 20.0  # a layer below this even with dynamic int8 activations stays float


def db(err: float) -> float:
    """Relative squared error as SQNR in dB (inf for none)."""
    return math.inf if err <= 0 else -10 * math.log10(err)


@dataclass
class LayerCheck:
    """One static layer's measured errors (SQNR dB per candidate) and the choice made."""

    sqnr: dict[str, float]
    # "static" (recipe's observer), an observer name, "smooth", "dynamic", "weight-only" (a
    # Conv2d's fallback instead of dynamic) or "float"
    choice: str
    smooth: torch.Tensor | None = None  # s [C] of the smoothing candidate

    @property
    def chosen_db(self) -> float:
        return math.inf if self.choice in ("float", "weight-only") else self.sqnr[self.choice]


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
                  calls: list, clock, weights: dict[str, torch.Tensor], margin_db: float = 6.0,
                  good_db: float = 30.0, no_smooth: frozenset = frozenset()) -> Verification:
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
    smooth = {n: _smoothing(model.get_submodule(n), plans[n], st, bounds[n]) for n, st in stats.items()
              if smoothable(model.get_submodule(n), st) and n not in no_smooth}
    err = {n: {c: 0.0 for c in [*tables[n], *(["smooth"] if n in smooth else []), "dynamic"]}
           for n in stats}
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
            if name in smooth:
                sv, table, ws = smooth[name]
                shape = [1] * x.dim()
                shape[ax] = -1
                xs = x / sv.to(x.dtype).reshape(shape)
                yq = _apply(m, _fq_static(xs, table[g], [xs.shape[ax]], ax), ws.to(x.dtype))
                err[name]["smooth"] += float((yq - y).double().pow(2).sum())
            yq = _apply(m, _fq_dynamic(x, ax), w)
            err[name]["dynamic"] += float((yq - y).double().pow(2).sum())
        return run

    with input_hooks({n: model.get_submodule(n) for n in stats}, hook), torch.inference_mode():
        for call in calls:
            call_model(model, call)
    out = Verification(calls=len(calls))
    for n in stats:
        sq = {c: db(e / power[n]) if power[n] > 0 else math.inf for c, e in err[n].items()}
        out.layers[n] = LayerCheck(sq, choose(sq, margin_db, good_db),
                                   smooth[n][0] if n in smooth else None)
    return out


def smoothable(m: nn.Module, st: LayerStats) -> bool:
    return st.chmax is not None and (isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1))


def _smoothing(m: nn.Module, plan: LayerPlan, st: LayerStats, bounds: torch.Tensor):
    """(s [C], static scales [K, 1] of x / s, dequantized W diag(s)) for one layer."""
    w = m.weight.detach().float()
    per_channel = w.transpose(0, 1).reshape(w.shape[1], -1).t()  # [O * kh * kw, C]: columns = channels
    s = smooth_scales(st.chmax.amax(0), per_channel, SMOOTH_ALPHA)
    w = quantize_weight(smooth_weight(m.weight.detach().double(), s).float(), plan.weights).dequantize()
    return s.float(), smoothed_table(st, bounds, s), w


def choose(sqnr: dict[str, float], margin_db: float, good_db: float, prefer_db: float = 1.0,
           floor_db: float = FLOOR_DB) -> str:
    """The best candidate at static cost (the recipe's scales unless another observer or
    smoothing beats them by `prefer_db`), if it is in line; else dynamic; float when even
    dynamic activations leave the layer below `floor_db`. Smoothing must come within
    `prefer_db` of dynamic: it folds one set of factors for all timesteps into the weight, an
    error that is the same at every step and adds up over a trajectory (on tiny-dit, smoothed
    layers 1-3 dB under dynamic held each step's output within 0.5 dB of all-dynamic yet took
    the worst image from 34.7 to 26.1 dB)."""
    bar = min(sqnr["dynamic"] - margin_db, good_db)
    best = max((c for c in ("static", *OBSERVERS, "smooth") if c in sqnr), key=sqnr.__getitem__)
    pick = "static" if sqnr["static"] >= sqnr[best] - prefer_db else best
    if pick == "smooth":
        bar = sqnr["dynamic"] - prefer_db
    if sqnr[pick] >= bar:
        return pick
    return "dynamic" if sqnr["dynamic"] >= floor_db else "float"


@torch.no_grad()
def dequantized_weights(model: nn.Module, plans: dict[str, LayerPlan], names) -> dict[str, torch.Tensor]:
    """Each layer's weight as its recipe quantizes it (round to nearest), back in float: what
    both the per-layer check and the dynamic twin multiply with."""
    return {n: quantize_weight(model.get_submodule(n).weight, plans[n].weights).dequantize() for n in names}


@torch.no_grad()
def dynamic_twin_outputs(model: nn.Module, weights: dict[str, torch.Tensor], calls: list,
                         output) -> list[torch.Tensor]:
    """The model's outputs on `calls` with the layers of `weights` at plain all-dynamic W8A8
    (those dequantized weights, per-token int8 inputs): FAKE-QUANT on the float model, the reference the
    verified model is held to. `output(result)` picks the output tensor."""
    def hook(name, m):
        axis = -1 if isinstance(m, nn.Linear) else 1

        def run(_m, args, _out):
            x = args[0].float()
            return _apply(m, _fq_dynamic(x, axis % x.dim()), weights[name].to(x.dtype)).to(_out.dtype)
        return run

    handles = [model.get_submodule(n).register_forward_hook(hook(n, model.get_submodule(n))) for n in weights]
    try:
        with torch.inference_mode():
            return [output(call_model(model, c)) for c in calls]
    finally:
        for h in handles:
            h.remove()
