"""Per-layer sensitivity to weight width: quantize one layer at a time and measure how much the
model output moves.

This is the one place besides calibration where weights are fake-quantized (quantized and
dequantized in float, in place, then restored): it is an analysis, not a deployed model.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffq.calib.collector import call_model
from diffq.calib.hooks import input_hooks
from diffq.core.recipe import WeightSpec
from diffq.core.weights import quantize_weight

FLOAT_BITS = 16


@dataclass
class SensitivityTable:
    """error[l, c]: relative MSE of the model output when only layer l has width bits[c]
    (FAKE-QUANT analysis); proxy[l, c]: the layer's own relative output error estimated from
    its weight error and input energy; params[l]: weights of layer l."""

    layers: list[str]
    bits: list[int]
    error: torch.Tensor
    proxy: torch.Tensor
    params: list[int]

    def to_json(self) -> str:
        return json.dumps({"layers": self.layers, "bits": self.bits, "params": self.params,
                           "error": self.error.tolist(), "proxy": self.proxy.tolist()})

    @classmethod
    def from_json(cls, text: str) -> SensitivityTable:
        d = json.loads(text)
        return cls(d["layers"], d["bits"], torch.tensor(d["error"], dtype=torch.float64),
                   torch.tensor(d["proxy"], dtype=torch.float64), d["params"])


def _output(result: Any) -> torch.Tensor:
    """The main tensor of a model output (diffusers `.sample`, a tuple's first item, ...)."""
    if isinstance(result, torch.Tensor):
        return result
    if hasattr(result, "sample"):
        return result.sample
    if isinstance(result, (tuple, list)):
        return _output(result[0])
    if isinstance(result, dict):
        return _output(next(iter(result.values())))
    raise TypeError(f"cannot find the output tensor in a {type(result).__name__}")


def record_calls(model: nn.Module, drive: Callable[[], Any], keep: Callable[[int], bool]) -> list:
    """Run `drive()` (e.g. a pipeline loop) and return the (args, kwargs) of the model calls whose
    index passes `keep`, detached and cloned, to replay later."""
    return record_calls_of({"": model}, drive, keep)[""]


def record_calls_of(models: dict[str, nn.Module], drive: Callable[[], Any],
                    keep: Callable[[int], bool] = lambda _i: True) -> dict[str, list]:
    """`record_calls` for several models in one run of `drive()`: name -> the calls of that model
    (each counted on its own for `keep`)."""
    calls: dict[str, list] = {n: [] for n in models}
    count = dict.fromkeys(models, 0)

    def make(name, _m):
        def hook(_mod, args, kwargs):
            if keep(count[name]):
                clone = lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
                calls[name].append((tuple(clone(a) for a in args), {k: clone(v) for k, v in kwargs.items()}))
            count[name] += 1
        return hook

    with input_hooks(models, make, with_kwargs=True), torch.inference_mode():
        drive()
    return calls


def _reduction_channel_map(m: nn.Module) -> int:
    """How many weight columns share one input channel ([O, C*kh*kw] layout of a conv)."""
    return m.weight[0, 0].numel() if isinstance(m, nn.Conv2d) else 1


def input_energy(model: nn.Module, layers: dict[str, nn.Module], calls: list) -> dict[str, torch.Tensor]:
    """Mean of x^2 per input channel of each layer over the calls (float64)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def make(name, axis):
        def hook(_m, args):
            x = args[0].detach().double()
            x = x.movedim(axis, -1).reshape(-1, x.shape[axis])
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    with input_hooks(layers, lambda n, m: make(n, 1 if isinstance(m, nn.Conv2d) else -1)), \
            torch.inference_mode():
        for item in calls:
            call_model(model, item)
    return {n: sums[n] / counts[n] for n in layers if n in sums}


def proxy_error(weight: torch.Tensor, dequantized: torch.Tensor, energy: torch.Tensor,
                per_channel: int) -> float:
    """Relative output error of a layer, diagonal approximation:
    sum_{o,k} dW[o,k]^2 E[x_k^2] / sum_{o,k} W[o,k]^2 E[x_k^2] (weight SQNR weighted by the input
    energy of each column; ignores correlations between inputs)."""
    w = weight.detach().reshape(weight.shape[0], -1).double()
    dw = dequantized.reshape(w.shape).double() - w
    e = energy.double().repeat_interleave(per_channel)
    return float((dw.pow(2) @ e).sum() / (w.pow(2) @ e).sum().clamp(min=1e-30))


def _relative_mse(model: nn.Module, calls: list, ref: list[torch.Tensor]) -> float:
    num = den = 0.0
    with torch.inference_mode():
        for item, y0 in zip(calls, ref, strict=True):
            y = _output(call_model(model, item)).double()
            num += float((y - y0).pow(2).sum())
            den += float(y0.pow(2).sum())
    return num / max(den, 1e-30)


def measure_sensitivity(model: nn.Module, layers: dict[str, nn.Module], calls: list,
                        candidates: dict[str, dict[int, WeightSpec]],
                        progress: bool = False) -> SensitivityTable:
    """For every layer and each of its candidate widths (`candidates[layer]`: width -> spec;
    plus float, error 0), quantize only that layer's weight (fake-quant) and measure the
    relative MSE of the model output over `calls`. A width a layer does not offer is not
    measured and gets an infinite error. Costs one pass over the calls per (layer, width)."""
    from tqdm.auto import tqdm

    bits = sorted({b for c in candidates.values() for b in c}) + [FLOAT_BITS]
    with torch.inference_mode():
        ref = [_output(call_model(model, item)).double() for item in calls]
    energy = input_energy(model, layers, calls)
    error = torch.full((len(layers), len(bits)), float("inf"), dtype=torch.float64)
    error[:, -1] = 0.0
    proxy = error.clone()
    bar = tqdm(total=sum(len(candidates.get(n, {})) for n in layers), desc="sensitivity",
               disable=not progress)
    for i, (name, m) in enumerate(layers.items()):
        original = m.weight.data.clone()
        for j, b in enumerate(bits[:-1]):
            spec = candidates.get(name, {}).get(b)
            if spec is None:
                continue
            deq = quantize_weight(original, spec).dequantize(original.dtype)
            m.weight.data.copy_(deq)  # FAKE-QUANT: sensitivity analysis only
            try:
                error[i, j] = _relative_mse(model, calls, ref)
            finally:
                m.weight.data.copy_(original)
            if name in energy:
                proxy[i, j] = proxy_error(original, deq, energy[name], _reduction_channel_map(m))
            bar.update(1)
    bar.close()
    return SensitivityTable(list(layers), bits, error, proxy, [m.weight.numel() for m in layers.values()])


def measure_allocation(model: nn.Module, layers: dict[str, nn.Module], calls: list,
                       choice: dict[str, WeightSpec | None]) -> float:
    """Measured relative MSE of the output with every layer at its chosen width at once
    (FAKE-QUANT; None = float); compared in the report with the additive prediction."""
    with torch.inference_mode():
        ref = [_output(call_model(model, item)).double() for item in calls]
    originals = {n: layers[n].weight.data.clone() for n, s in choice.items() if s is not None}
    try:
        for n, w in originals.items():
            layers[n].weight.data.copy_(quantize_weight(w, choice[n]).dequantize(w.dtype))
        return _relative_mse(model, calls, ref)
    finally:
        for n, w in originals.items():
            layers[n].weight.data.copy_(w)


__all__ = ["SensitivityTable", "record_calls", "record_calls_of", "input_energy", "proxy_error",
           "measure_sensitivity", "measure_allocation", "FLOAT_BITS"]
