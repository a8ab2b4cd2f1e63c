import itertools

import pytest
import torch

from diffq.calib.collector import LayerStats
from diffq.calib.scales import group_of, range_boundaries, scale_table, uniform_boundaries
from diffq.core.recipe import ActivationSpec
from diffq.errors import CalibrationError


def _sse(f, groups):
    return sum(float(((f[g] - f[g].mean(0)) ** 2).sum()) for g in groups)


def test_range_boundaries_are_optimal_against_enumeration(gen):
    values = torch.linspace(0, 950, 20).double()
    f = torch.randn(20, 6, generator=gen).double().cumsum(0)  # drifting log ranges
    k = 4
    b = range_boundaries(values, f, k)
    assert b.shape == (3,)
    got = group_of(values, b)
    got_cost = _sse(f, [got == g for g in range(k)])
    best = min(_sse(f, [slice(0, a), slice(a, c), slice(c, d), slice(d, 20)])
               for a, c, d in itertools.combinations(range(1, 20), 3))
    assert got_cost == pytest.approx(best)


def test_groups_follow_a_jump_in_range():
    values = torch.arange(10).double() * 100
    f = torch.cat([torch.zeros(7, 3), torch.full((3, 3), 5.0)])  # ranges jump after t=600
    b = range_boundaries(values, f, 2)
    assert b.tolist() == [650.0]


def test_lookup_is_by_value_not_step_index():
    b = uniform_boundaries(torch.tensor([1.0, 201, 401, 601]).double(), 2)
    assert b.tolist() == [301.0]
    # a 50-step Euler schedule hits values never seen in a 5-step calibration
    t = torch.linspace(999, 0, 50)
    assert torch.equal(group_of(t, b), (t >= 301).long())


def test_missing_timesteps_with_groups_is_an_error():
    with pytest.raises(CalibrationError, match="no timestep"):
        uniform_boundaries(torch.tensor([float("nan")]), 2)
    with pytest.raises(CalibrationError, match="distinct timesteps"):
        uniform_boundaries(torch.tensor([1.0, 2.0]), 4)


def _stats(values, lo, hi, segments=1):
    t = len(values)
    mm = torch.stack([torch.tensor(lo).float(), torch.tensor(hi).float()], 1).reshape(t, 2, 1)
    mm = mm.expand(t, 2, segments).clone()
    return LayerStats(torch.tensor(values).double(), mm,
                      torch.zeros(t, segments, 1024, dtype=torch.long),
                      torch.zeros(t, segments, dtype=torch.long))


def test_minmax_table_per_group_and_k1():
    st = _stats([0.0, 100, 900, 999], [-1, -2, -8, -4], [1, 3, 2, 16])
    spec = ActivationSpec(timestep_groups=2)
    scale, zp = scale_table(st, torch.tensor([500.0]), spec)
    assert zp is None
    assert scale[:, 0].tolist() == pytest.approx([3 / 127, 16 / 127])
    k1, _ = scale_table(st, torch.zeros(0), ActivationSpec())
    assert k1.flatten().tolist() == pytest.approx([16 / 127])


def test_asymmetric_table_zero_points():
    st = _stats([0.0], [0.0], [2.55])
    scale, zp = scale_table(st, torch.zeros(0), ActivationSpec(symmetric=False))
    assert scale.item() == pytest.approx(0.01)
    assert zp.item() == -128  # x = 0 maps to the bottom code
