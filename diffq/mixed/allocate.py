"""Choose one width per layer under a size budget: a multiple-choice knapsack solved exactly by
dynamic programming over the (discretized) budget.

Per-layer errors are assumed additive (small independent perturbations of the network output
add in expectation); the report compares that prediction with the measured error.
"""
from __future__ import annotations

import math

import torch

from diffq.errors import RecipeError


def allocate(errors: torch.Tensor, costs: torch.Tensor, budget: float, allowed: torch.Tensor | None = None,
             resolution: int = 4096) -> list[int]:
    """Minimize sum_l errors[l, c_l] subject to sum_l costs[l, c_l] <= budget.

    errors, costs: [L, C] (C candidate widths per layer); allowed: bool [L, C] (False: the policy
    forbids that width for that layer). Returns the chosen candidate index per layer.

    Costs above each layer's cheapest allowed width are rounded *up* to units of
    (budget - cheapest total) / resolution, so the returned choice always fits the real budget,
    and a budget at the cheapest total still has a solution. With integer costs and resolution
    equal to that remaining budget the solution is exact.
    """
    errors, costs = errors.double(), costs.double()
    n_layers, n_choices = errors.shape
    if allowed is None:
        allowed = torch.ones(n_layers, n_choices, dtype=torch.bool)
    if not bool(allowed.any(dim=1).all()):
        raise RecipeError("every candidate width is forbidden for some layer")
    cheapest = torch.where(allowed, costs, math.inf).amin(dim=1).sum().item()
    if cheapest > budget * (1 + 1e-12):
        raise RecipeError(f"budget {budget:,.0f} is below the smallest allowed size {cheapest:,.0f}")
    # Discretize only what each layer costs above its cheapest allowed width: the cheapest
    # allocation then costs exactly 0 units and stays feasible however coarse the units are.
    base = torch.where(allowed, costs, math.inf).amin(dim=1, keepdim=True)
    costs, budget = costs - base, budget - float(base.sum())
    unit = max(budget, 1e-12) / resolution
    units = torch.ceil(costs / unit - 1e-9).long().clamp(min=0)
    units[~allowed] = resolution + 1  # never fits
    inf = math.inf
    best = torch.zeros(resolution + 1, dtype=torch.float64)  # best[s]: min error with cost <= s
    picks = torch.empty(n_layers, resolution + 1, dtype=torch.long)
    for layer in range(n_layers):
        cand = torch.full((n_choices, resolution + 1), inf, dtype=torch.float64)
        for c in range(n_choices):
            u = int(units[layer, c])
            if u <= resolution:
                cand[c, u:] = best[: resolution + 1 - u] + errors[layer, c]
        best, picks[layer] = cand.min(dim=0)
    if not math.isfinite(best[resolution].item()):
        # Only rounding can cause this: the budget is within a unit per layer of the minimum.
        raise RecipeError(f"budget {budget:,.0f} is too tight to allocate; raise it slightly")
    choice, s = [0] * n_layers, resolution
    for layer in range(n_layers - 1, -1, -1):
        c = int(picks[layer, s])
        choice[layer] = c
        s -= int(units[layer, c])
    return choice


__all__ = ["allocate"]
