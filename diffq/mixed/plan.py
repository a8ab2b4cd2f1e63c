"""From a sensitivity table and a recipe's `mixed` policy to one weight spec per layer."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from diffq.core.recipe import MixedSpec, WeightSpec
from diffq.errors import RecipeError
from diffq.mixed.allocate import allocate
from diffq.mixed.sensitivity import FLOAT_BITS, SensitivityTable


def storage_bytes(shape: tuple[int, ...], spec: WeightSpec | None) -> int:
    """Bytes a [O, ...] weight takes: bf16 when float, else its layout's codes + scales
    (+ zero points)."""
    out, k = shape[0], math.prod(shape[1:])
    return out * k * 2 if spec is None else spec.layout().nbytes(out, k)


def fit_group(spec: WeightSpec, k: int) -> WeightSpec | None:
    """`spec` for a layer with reduction dim k: a per-group spec whose group size does not divide
    k falls back to the largest power-of-two group below it that does (>= 16), else None."""
    if spec.granularity != "per_group" or k % spec.group_size == 0:
        return spec
    g = 1 << (spec.group_size.bit_length() - 1)
    while g >= 16 and k % g:
        g //= 2
    return replace(spec, group_size=g) if g >= 16 else None


def layer_candidates(mixed: MixedSpec,
                     layers: dict[str, tuple[int, ...]]) -> dict[str, dict[int, WeightSpec]]:
    """Per layer (name -> weight shape), the quantized widths it may take: the recipe's
    candidates fitted to its reduction dim, minus the widths its min_bits rule forbids."""
    out = {}
    for name, shape in layers.items():
        k = math.prod(shape[1:])
        floor = mixed.min_bits_for(name)
        fitted = {c.bits: fit_group(c, k) for c in mixed.candidates if c.bits >= floor}
        out[name] = {b: s for b, s in fitted.items() if s is not None}
    return out


@dataclass
class Allocation:
    """The chosen width per layer, with what the choice predicts."""

    bits: dict[str, int]
    specs: dict[str, WeightSpec | None]
    average_bits: float  # nominal, weighted by parameters
    bytes: int  # real storage of these layers (bf16 for float)
    predicted_error: float  # sum of the chosen per-layer measured errors


def choose(table: SensitivityTable, mixed: MixedSpec, shapes: dict[str, tuple[int, ...]],
           model_bytes: int | None = None) -> Allocation:
    """Solve the knapsack for the recipe's budget. Widths a layer cannot take (min_bits rule,
    group size) have an infinite error in the table and are never chosen. model_bytes: the
    float model's bf16 weight bytes (diffq.weight_bytes), needed by a max_ratio budget; what of
    it is not the tabled layers' weights stays as it is."""
    cands = layer_candidates(mixed, {n: shapes[n] for n in table.layers})
    for name in table.layers:
        if mixed.allow_float:
            cands[name][FLOAT_BITS] = None
    params = torch.tensor(table.params, dtype=torch.float64)
    bits = torch.tensor(table.bits, dtype=torch.float64)
    allowed = torch.tensor([[b in cands[n] for b in table.bits] for n in table.layers])
    allowed &= torch.isfinite(table.error)
    if not bool(allowed.any(dim=1).all()):
        bad = next(n for n, row in zip(table.layers, allowed, strict=True) if not row.any())
        raise RecipeError(f"no candidate width is allowed for layer {bad!r} (mixed.min_bits, "
                          "allow_float, or group sizes that do not divide it)")
    if mixed.target_bits is not None:
        costs = params[:, None] * bits[None, :]
        budget = mixed.target_bits * float(params.sum())
        what = f"target_bits {mixed.target_bits}"
    else:
        costs = torch.tensor([[storage_bytes(shapes[n], cands[n].get(b)) for b in table.bits]
                              for n in table.layers], dtype=torch.float64)
        if mixed.max_ratio is not None:
            if model_bytes is None:
                raise ValueError("a max_ratio budget needs the model's bf16 weight bytes")
            rest = model_bytes - sum(storage_bytes(shapes[n], None) for n in table.layers)
            budget = mixed.max_ratio * model_bytes - rest
            what = f"max_ratio {mixed.max_ratio} ({budget:,.0f} bytes for these layers)"
        else:
            budget = float(mixed.max_bytes)
            what = f"max_bytes {mixed.max_bytes:,}"
    floor = torch.where(allowed, costs, float("inf")).amin(dim=1).sum()
    if floor > budget:
        unit = "bits on average" if mixed.target_bits is not None else "bytes"
        low = floor / params.sum() if mixed.target_bits is not None else floor
        raise RecipeError(f"mixed {what} cannot be met: the narrowest allowed widths need "
                          f"{float(low):,.3f} {unit}")
    pick = allocate(table.error, costs, budget, allowed)
    chosen = {n: table.bits[c] for n, c in zip(table.layers, pick, strict=True)}
    specs = {n: cands[n][b] for n, b in chosen.items()}
    return Allocation(
        bits=chosen,
        specs=specs,
        average_bits=float(sum(p * chosen[n] for n, p in zip(table.layers, table.params, strict=True))
                           / params.sum()),
        bytes=sum(storage_bytes(shapes[n], specs[n]) for n in chosen),
        predicted_error=float(sum(table.error[i, c] for i, c in enumerate(pick))),
    )


__all__ = ["Allocation", "choose", "fit_group", "layer_candidates", "storage_bytes"]
