"""Record the input activations of chosen layers across calls, keyed by the timestep value.

Hooks only observe: the float model computes as usual. For every layer, timestep value and
channel segment the collector keeps the min, the max and a histogram of |x| (see
`histogram`); calls at the same timestep (other prompts, other batches) merge exactly.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffq.calib import histogram as H
from diffq.calib.hooks import input_hooks
from diffq.errors import CalibrationError


def as_call(item: Any) -> tuple[tuple, dict]:
    """One calibration item as (args, kwargs): a tensor (one positional argument), a tuple
    (positional arguments), a dict (keyword arguments) or an (args, kwargs) pair."""
    if isinstance(item, torch.Tensor):
        return (item,), {}
    if isinstance(item, dict):
        return (), item
    if (isinstance(item, (tuple, list)) and len(item) == 2
            and isinstance(item[0], (tuple, list)) and isinstance(item[1], dict)):
        return tuple(item[0]), item[1]
    if isinstance(item, (tuple, list)):
        return tuple(item), {}
    raise CalibrationError(
        f"calibration item of type {type(item).__name__} is not a tensor, tuple, dict or "
        "(args, kwargs) pair"
    )


def call_model(model: nn.Module, item: Any) -> Any:
    """Call `model` with one calibration item (see `as_call`)."""
    args, kwargs = as_call(item)
    return model(*args, **kwargs)


class _Captured(Exception):
    pass


def first_call(model: nn.Module, data) -> tuple[tuple, dict]:
    """The first call the calibration data makes: its first item, or for a callable that
    drives the model (a pipeline), the arguments of its first model call (the run stops there)."""
    if not callable(data):
        for item in data:
            return as_call(item)
        raise CalibrationError("the calibration data is empty")
    got = []

    def hook(_m, args, kwargs):
        got.append((args, kwargs))
        raise _Captured

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            data()
    except _Captured:
        pass
    finally:
        handle.remove()
    if not got:
        raise CalibrationError("the calibration callable never called the model")
    return got[0]


@dataclass
class LayerStats:
    """Statistics of one layer input per timestep value (NaN: calls without a timestep).

    timesteps [T] ascending; minmax [T, 2, S] (min, max per channel segment); hist [T, S, BINS]
    int64 counts of |x| over [0, 2^exponent); exponent [T, S]; chmax [T, C] max |x| per input
    channel (what per-channel smoothing balances; None in statistics saved before it existed).
    """

    timesteps: torch.Tensor
    minmax: torch.Tensor
    hist: torch.Tensor
    exponent: torch.Tensor
    chmax: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        t = {"timesteps": self.timesteps, "minmax": self.minmax, "hist": self.hist,
             "exponent": self.exponent}
        return t if self.chmax is None else {**t, "chmax": self.chmax}

    @classmethod
    def merge(cls, a: LayerStats, b: LayerStats) -> LayerStats:
        """Exact union of two collections (other prompts, other processes)."""
        acc = _Accumulator(a.minmax.shape[-1])
        for st in (a, b):
            for i, t in enumerate(st.timesteps.tolist()):
                acc.add(t, st.minmax[i], st.hist[i], st.exponent[i].tolist(),
                        None if st.chmax is None else st.chmax[i])
        return acc.finish()


class _Accumulator:
    def __init__(self, segments: int) -> None:
        self.segments = segments
        self.by_t: dict[float, list] = {}

    def add(self, t: float, minmax: torch.Tensor, hist: torch.Tensor, exps: list[int],
            chmax: torch.Tensor | None = None) -> None:
        # NaN is no usable dict key: calls without a timestep share the key -inf
        key = -math.inf if t is None or math.isnan(t) else float(t)
        cur = self.by_t.get(key)
        if cur is None:
            ch = None if chmax is None else chmax.clone()
            self.by_t[key] = [minmax.clone(), hist.clone(), list(exps), ch]
            return
        cur[0][0] = torch.minimum(cur[0][0], minmax[0])
        cur[0][1] = torch.maximum(cur[0][1], minmax[1])
        cur[3] = None if chmax is None or cur[3] is None else torch.maximum(cur[3], chmax)
        for s in range(self.segments):
            cur[1][s], cur[2][s] = H.merge(cur[1][s], cur[2][s], hist[s], exps[s])

    def finish(self) -> LayerStats:
        keys = sorted(self.by_t)
        ts = torch.tensor([float("nan") if k == -math.inf else k for k in keys], dtype=torch.float64)
        ch = [self.by_t[k][3] for k in keys]
        return LayerStats(
            ts,
            torch.stack([self.by_t[k][0] for k in keys]),
            torch.stack([self.by_t[k][1] for k in keys]),
            torch.tensor([self.by_t[k][2] for k in keys], dtype=torch.int64),
            None if any(c is None for c in ch) else torch.stack(ch),
        )


def segment_stats(x: torch.Tensor, axis: int, segments: list[int]):
    """minmax [2, S], hist [S, BINS] and range exponents [S] of one activation;
    None when x holds NaN or Inf."""
    x = x.detach()
    parts = torch.split(x, segments, dim=axis) if len(segments) > 1 else (x,)
    mm, hists, exps = [], [], []
    for p in parts:
        lo, hi = (v.float() for v in torch.aminmax(p))
        amax = float(torch.maximum(-lo, hi))
        if not math.isfinite(amax) or not math.isfinite(float(lo)):  # NaN propagates into min/max
            return None
        e = H.range_exponent(amax)
        mm.append(torch.stack((lo, hi)))
        hists.append(H.histogram(p.abs(), e, absolute=True))
        exps.append(e)
    return torch.stack(mm, dim=1).cpu(), torch.stack(hists).cpu(), exps


class ActivationCollector:
    """Context manager: forward pre-hooks on `layers` (name -> (module, feature_axis, segments,
    prefix); the first `prefix` tokens of a [B, L, C] input are left out, see
    ActivationSpec.float_prefix).

    `clock` gives the timestep of the current call (see `diffq.nn.timestep`).
    """

    def __init__(self, layers: dict[str, tuple[nn.Module, int, list[int], int]], clock) -> None:
        self.layers = layers
        self.clock = clock
        self._acc = {name: _Accumulator(len(v[2])) for name, v in self.layers.items()}

    def _hook(self, name: str, axis: int, segments: list[int], prefix: int):
        def hook(_m: nn.Module, args: tuple) -> None:
            if getattr(self.clock, "held_back", False):  # a call kept for verification
                return
            t = self.clock.value
            x = args[0][:, prefix:] if prefix and args[0].dim() == 3 else args[0]
            found = segment_stats(x, axis, segments)
            if found is None:
                where = "" if t is None else f" at timestep {t:g}"
                raise CalibrationError(f"non-finite activation (NaN/Inf) entering layer {name!r}{where}")
            ax = axis % x.dim()
            chmax = x.detach().abs().amax(dim=[d for d in range(x.dim()) if d != ax]).float().cpu()
            self._acc[name].add(t, *found, chmax)

        return hook

    def stats(self) -> dict[str, LayerStats]:
        empty = [n for n, a in self._acc.items() if not a.by_t]
        if empty:
            raise CalibrationError(f"calibration never reached layer {empty[0]!r}")
        return {n: a.finish() for n, a in self._acc.items()}

    def __enter__(self) -> ActivationCollector:
        self._hooks = input_hooks({n: v[0] for n, v in self.layers.items()},
                                  lambda n, _m: self._hook(n, *self.layers[n][1:]))
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def feed(model: nn.Module, data, progress: bool = False) -> None:
    """Run calibration data through `model` without autograd: call items (see `call_model`), or
    a callable that drives it (e.g. a pipeline loop over prompts)."""
    from tqdm.auto import tqdm

    with torch.inference_mode():
        if callable(data):
            data()
            return
        n = 0
        for item in tqdm(data, desc="calibrating", disable=not progress, leave=False):
            call_model(model, item)
            n += 1
    if n == 0:
        raise CalibrationError("the calibration data is empty")


def run_calibration(model: nn.Module, data: Iterable[Any], collector: ActivationCollector,
                    progress: bool = True) -> None:
    """Feed every calibration item through `model` with the collector attached."""
    with collector:
        feed(model, data, progress)


def unsplit(st: LayerStats) -> LayerStats:
    """Statistics of the whole input from per-segment statistics (for recipes that do not
    split the skip concat): min of minima, max of maxima, histograms folded and summed."""
    if st.minmax.shape[-1] == 1:
        return st
    mm = torch.stack([st.minmax[:, 0].amin(-1), st.minmax[:, 1].amax(-1)], dim=1)[..., None]
    e = st.exponent.amax(-1, keepdim=True)
    hist = sum(_fold_rows(st.hist[:, s], e[:, 0] - st.exponent[:, s])
               for s in range(st.minmax.shape[-1]))
    return LayerStats(st.timesteps, mm, hist[:, None], e, st.chmax)


def _fold_rows(hist: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    return torch.stack([H.fold(h, int(k)) for h, k in zip(hist, shifts, strict=True)])
