import itertools
import math

import pytest
import torch

from diffq.errors import RecipeError
from diffq.mixed.allocate import allocate


def brute_force(errors: torch.Tensor, costs: torch.Tensor, budget: float,
                allowed: torch.Tensor | None = None) -> list[int]:
    """Exhaustive optimum of the same problem (C**L combinations): the reference `allocate` is
    checked against."""
    n_layers, n_choices = errors.shape
    best, arg = math.inf, None
    for combo in itertools.product(range(n_choices), repeat=n_layers):
        if allowed is not None and not all(bool(allowed[i, c]) for i, c in enumerate(combo)):
            continue
        cost = sum(float(costs[i, c]) for i, c in enumerate(combo))
        err = sum(float(errors[i, c]) for i, c in enumerate(combo))
        if cost <= budget and err < best:
            best, arg = err, list(combo)
    if arg is None:
        raise RecipeError("no feasible allocation")
    return arg


def _instance(seed: int, n_layers: int = 7):
    g = torch.Generator().manual_seed(seed)
    params = torch.randint(1, 40, (n_layers,), generator=g).double()
    bits = torch.tensor([4.0, 8.0, 16.0])
    costs = params[:, None] * bits  # integer costs
    # error shrinks with width, by a layer-dependent amount; 16 bits costs nothing
    base = torch.rand(n_layers, generator=g, dtype=torch.float64) * 10
    errors = torch.stack([base, base / (4 + 12 * torch.rand(n_layers, generator=g, dtype=torch.float64)),
                          torch.zeros(n_layers, dtype=torch.float64)], dim=1)
    return errors, costs, params


@pytest.mark.parametrize("seed", range(6))
def test_dp_matches_exhaustive_optimum_with_integer_costs(seed):
    errors, costs, params = _instance(seed)
    budget = float(torch.floor(params.sum() * (5.0 + seed)))  # between all-4 and all-16
    allowed = torch.ones_like(errors, dtype=torch.bool)
    allowed[0, 0] = False  # a policy rule: layer 0 at least 8 bits
    base = float(torch.where(allowed, costs, float("inf")).amin(dim=1).sum())
    dp = allocate(errors, costs, budget, allowed, resolution=int(budget - base))
    best = brute_force(errors, costs, budget, allowed)
    err = lambda c: sum(float(errors[i, k]) for i, k in enumerate(c))  # noqa: E731
    assert sum(float(costs[i, k]) for i, k in enumerate(dp)) <= budget
    assert dp[0] != 0
    assert err(dp) == pytest.approx(err(best), rel=1e-12)


def test_coarse_resolution_stays_feasible_and_near_optimal():
    errors, costs, params = _instance(11, n_layers=8)
    budget = float(params.sum() * 6.3)
    dp = allocate(errors, costs, budget, resolution=64)
    best = brute_force(errors, costs, budget)
    err = lambda c: sum(float(errors[i, k]) for i, k in enumerate(c))  # noqa: E731
    assert sum(float(costs[i, k]) for i, k in enumerate(dp)) <= budget
    assert err(dp) <= err(best) * 1.5 + 1e-12  # rounding costs up can only lose a little


def test_budget_below_minimum_is_refused():
    errors, costs, params = _instance(0)
    with pytest.raises(RecipeError, match="below the smallest"):
        allocate(errors, costs, float(params.sum() * 3.9))


def test_budget_at_the_cheapest_total_is_feasible_at_coarse_resolution():
    errors, costs, params = _instance(3, n_layers=40)
    budget = float(costs[:, 0].sum())  # exactly all-4-bit
    assert allocate(errors, costs, budget, resolution=16) == [0] * 40
    slack = allocate(errors, costs, budget * 1.02, resolution=16)
    assert sum(float(costs[i, c]) for i, c in enumerate(slack)) <= budget * 1.02
