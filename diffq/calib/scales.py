"""From collected statistics to timestep groups and static activation scale tables.
Pure functions on tensors."""
from __future__ import annotations

import torch

from diffq.calib import histogram as H
from diffq.calib import observers as O
from diffq.calib.collector import LayerStats
from diffq.core.formats import get_format
from diffq.core.recipe import ActivationSpec
from diffq.errors import CalibrationError


def _midpoints(values: torch.Tensor, splits: list[int]) -> torch.Tensor:
    """Boundaries halfway between neighbouring observed timesteps: lookup is by value, so
    schedules with other step counts fall into the nearest calibrated group."""
    return torch.tensor([(float(values[i - 1]) + float(values[i])) / 2 for i in splits])


def _check_timesteps(values: torch.Tensor, k: int) -> None:
    if torch.isnan(values).any():
        raise CalibrationError(
            f"the recipe asks for {k} timestep groups but calibration calls carried no timestep; "
            "pass timestep_of=... or set activations.timestep_groups: 1"
        )
    if len(values) < k:
        raise CalibrationError(f"only {len(values)} distinct timesteps seen in calibration; "
                               f"need at least {k} for {k} groups")


def uniform_boundaries(values: torch.Tensor, k: int) -> torch.Tensor:
    """k groups of about equal numbers of observed timestep values (ascending values [T])."""
    if k == 1:
        return torch.zeros(0)
    _check_timesteps(values, k)
    return _midpoints(values, torch.linspace(0, len(values), k + 1)[1:-1].round().long().tolist())


def range_boundaries(values: torch.Tensor, features: torch.Tensor, k: int) -> torch.Tensor:
    """k contiguous groups of timesteps that minimize the within-group variance of `features`
    [T, L] (log input range of every layer): splits fall where ranges change most.
    Exact 1-D segmentation by dynamic programming, O(k T^2)."""
    if k == 1:
        return torch.zeros(0)
    _check_timesteps(values, k)
    f = features.double()
    t = len(values)
    c1 = torch.cat([torch.zeros(1, f.shape[1], dtype=f.dtype), f.cumsum(0)])
    c2 = torch.cat([torch.zeros(1, f.shape[1], dtype=f.dtype), (f * f).cumsum(0)])

    def cost(a: int, b: int) -> float:  # sum of squared deviations of rows a..b-1
        n = b - a
        s1, s2 = c1[b] - c1[a], c2[b] - c2[a]
        return float((s2 - s1 * s1 / n).sum())

    inf = float("inf")
    best = [[inf] * (t + 1) for _ in range(k + 1)]
    arg = [[0] * (t + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        for b in range(j, t + 1):
            for a in range(j - 1, b):
                v = best[j - 1][a] + cost(a, b) if best[j - 1][a] < inf else inf
                if v < best[j][b]:
                    best[j][b], arg[j][b] = v, a
    splits, b = [], t
    for j in range(k, 1, -1):
        b = arg[j][b]
        splits.append(b)
    return _midpoints(values, sorted(splits))


def log_ranges(stats: dict[str, LayerStats]) -> tuple[torch.Tensor, torch.Tensor]:
    """(timestep values [T], log abs-max [T, layers]) shared by all layers of one collection."""
    names = sorted(stats)
    values = stats[names[0]].timesteps
    cols = []
    for n in names:
        st = stats[n]
        if not torch.equal(st.timesteps.nan_to_num(-1), values.nan_to_num(-1)):
            raise CalibrationError(f"layer {n!r} saw other timesteps than {names[0]!r}")
        cols.append(st.minmax.abs().amax(dim=(1, 2)).clamp(min=1e-12).log())
    return values, torch.stack(cols, dim=1)


def choose_boundaries(stats: dict[str, LayerStats], k: int, method: str = "range") -> torch.Tensor:
    """Timestep-group boundaries [k-1] for a whole model, from its collected statistics."""
    values, feats = log_ranges(stats)
    if method == "uniform":
        return uniform_boundaries(values, k)
    return range_boundaries(values, feats, k)


def group_of(timesteps: torch.Tensor, boundaries: torch.Tensor) -> torch.Tensor:
    """Group index of each timestep (a value equal to a boundary goes to the upper group)."""
    if len(boundaries) == 0:
        return torch.zeros(len(timesteps), dtype=torch.long)
    return torch.bucketize(timesteps.float(), boundaries.float(), right=True)


def _threshold(spec: ActivationSpec, hist: torch.Tensor, exp: int, amax: float, qmax: float) -> float:
    if spec.observer == "minmax" or amax == 0:
        return O.minmax_threshold(amax)
    if spec.observer == "percentile":
        return min(amax, O.percentile_threshold(hist, exp, spec.percentile))
    if spec.observer == "mse":
        return O.mse_threshold(hist, exp, qmax, amax)
    return min(amax, O.kl_threshold(hist, exp, levels=int(qmax) + 1))


def scale_table(st: LayerStats, boundaries: torch.Tensor, spec: ActivationSpec
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales [K, S] (and zero points for asymmetric minmax) of one layer: each group merges
    the statistics of its timesteps and applies the recipe's observer per channel segment."""
    fmt = get_format(spec.format)
    k, s = len(boundaries) + 1, st.minmax.shape[-1]
    groups = group_of(st.timesteps.nan_to_num(0.0), boundaries)
    scale = torch.ones(k, s)
    zp = None if spec.symmetric else torch.zeros(k, s, dtype=torch.int32)
    for g in range(k):
        sel = (groups == g).nonzero().flatten().tolist() or list(range(len(st.timesteps)))
        lo = st.minmax[sel, 0].amin(0).clamp(max=0)
        hi = st.minmax[sel, 1].amax(0).clamp(min=0)
        for j in range(s):
            if not spec.symmetric:  # asymmetric: min/max observer only (recipe validation)
                sc = float(hi[j] - lo[j]) / (fmt.qmax - fmt.qmin)
                scale[g, j] = sc if sc > 0 else 1.0
                z = fmt.qmin - round(float(lo[j]) / float(scale[g, j]))
                zp[g, j] = int(min(fmt.qmax, max(fmt.qmin, z)))
                continue
            hist, exp = st.hist[sel[0], j], int(st.exponent[sel[0], j])
            for i in sel[1:]:
                hist, exp = H.merge(hist, exp, st.hist[i, j], int(st.exponent[i, j]))
            amax = float(torch.maximum(-lo[j], hi[j]))
            thr = _threshold(spec, hist, exp, amax, fmt.qmax)
            scale[g, j] = thr / fmt.qmax if thr > 0 else 1.0
    return scale, zp


def smoothed_table(st: LayerStats, boundaries: torch.Tensor, s: torch.Tensor, qmax: float = 127.0
                   ) -> torch.Tensor:
    """Static scales [K, 1] of a layer's input divided per channel by `s` [C] (SmoothQuant with
    static activations): per group, the largest max |x_c| / s_c over its timesteps and channels."""
    groups = group_of(st.timesteps.nan_to_num(0.0), boundaries)
    ranges = (st.chmax.double() / s.double()).amax(1)  # [T]
    scale = torch.ones(len(boundaries) + 1, 1)
    for g in range(len(scale)):
        sel = groups == g
        amax = float(ranges[sel].max()) if sel.any() else float(ranges.max())
        scale[g, 0] = amax / qmax if amax > 0 else 1.0
    return scale
