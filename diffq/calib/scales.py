"""From collected statistics to static activation scale tables. Pure functions."""
from __future__ import annotations

import torch

from diffq.core.formats import Format
from diffq.errors import CalibrationError


def timestep_boundaries(timesteps: torch.Tensor, k: int) -> torch.Tensor:
    """Split the observed timestep values into `k` groups of about equal call count.

    Returns ascending boundaries [k-1]; a value t falls in group bisect_right(boundaries, t).
    Boundaries sit halfway between neighbouring observed values, so lookup is by timestep value
    and works for schedules with other step counts.
    """
    if k == 1:
        return torch.zeros(0)
    if torch.isnan(timesteps).any():
        raise CalibrationError(
            f"the recipe asks for {k} timestep groups but calibration calls carried no timestep; "
            "pass timestep_of=... or set activations.timestep_groups: 1"
        )
    values = torch.unique(timesteps)
    if len(values) < k:
        raise CalibrationError(
            f"only {len(values)} distinct timesteps seen in calibration; need >= {k} groups"
        )
    edges = torch.linspace(0, len(values), k + 1)[1:-1].round().long()
    return ((values[edges - 1] + values[edges]) / 2).float()


def group_of(timesteps: torch.Tensor, boundaries: torch.Tensor) -> torch.Tensor:
    """Group index of each timestep (right-closed like bisect_right)."""
    return torch.bucketize(timesteps.float(), boundaries, right=True)


def minmax_table(
    timesteps: torch.Tensor,
    minmax: torch.Tensor,
    boundaries: torch.Tensor,
    fmt: Format,
    symmetric: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale table [K, S] (and zero points) covering the min/max of all calls of each group.

    minmax: [N, 2, S] per-call (min, max) per channel segment.
    """
    k = len(boundaries) + 1
    groups = group_of(timesteps, boundaries) if k > 1 else torch.zeros(len(timesteps), dtype=torch.long)
    s = minmax.shape[-1]
    lo = torch.zeros(k, s)
    hi = torch.zeros(k, s)
    for g in range(k):
        sel = minmax[groups == g]
        if len(sel):
            lo[g] = sel[:, 0].amin(0).clamp(max=0)
            hi[g] = sel[:, 1].amax(0).clamp(min=0)
    if symmetric:
        scale = torch.maximum(-lo, hi) / fmt.qmax
        return torch.where(scale > 0, scale, torch.ones_like(scale)), None
    scale = (hi - lo) / (fmt.qmax - fmt.qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zp = (fmt.qmin - torch.round(lo / scale)).clamp(fmt.qmin, fmt.qmax).to(torch.int32)
    return scale, zp
