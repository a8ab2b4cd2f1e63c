"""AWQ (Lin et al. 2023): scale salient input channels up before quantizing the weight, and the
inputs down by the same factor, so the channels that carry large activations lose less.

Eq. 4-5: s = s_X^α with s_X = mean |x| per input channel, α* = argmin_α L(s),
  L(s) = ‖Q(W · diag(s)) (diag(s)⁻¹ X) − W X‖².
With ΔW(s) = Q(W diag(s)) diag(s)⁻¹ − W this equals (n/2) tr(ΔW H ΔWᵀ) for the input Hessian
H = (2/n) Σ x xᵀ (see `algos.hessian`), so the search runs on H: the exact loss over every
calibration row, without keeping the rows.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from diffq.algos.hessian import hessian_error
from diffq.core.recipe import WeightSpec
from diffq.core.weights import quantize_weight


def rtn(weight: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """Round-to-nearest quantize-dequantize with plain min/max scales (no clipping), [O, K]."""
    return quantize_weight(weight, replace(spec, clip="none")).dequantize(weight.dtype)


def awq_scales_for(act_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = s_X^α, normalized so that sqrt(max(s) · min(s)) = 1 (as in the reference code):
    the scales stay centred around 1 and the weight range does not drift."""
    s = act_mean.double().clamp(min=1e-4).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def awq_search(weight: torch.Tensor, hessian: torch.Tensor, act_mean: torch.Tensor,
               spec: WeightSpec, grid: int = 20) -> tuple[torch.Tensor, float]:
    """Grid search of α over `grid` points in [0, 1] (α = 0 is s = 1, plain RTN, so the result
    is never worse than RTN on the calibration loss). weight [O, K], hessian [K, K], act_mean
    [K] = mean |x| per weight column. Returns (s [K] float64, α)."""
    w = weight.detach().reshape(weight.shape[0], -1).double()
    h = hessian.double()
    best: tuple[float, torch.Tensor, float] | None = None
    for alpha in torch.linspace(0.0, 1.0, grid).tolist():
        s = awq_scales_for(act_mean, alpha)
        delta = rtn(w * s, spec) / s - w
        err = float(hessian_error(delta, h))
        if best is None or err < best[0]:
            best = (err, s, alpha)
    assert best is not None
    return best[1], best[2]


@torch.no_grad()
def awq_clip(weight: torch.Tensor, hessian: torch.Tensor, spec: WeightSpec, grid: int = 20,
             min_ratio: float = 0.5) -> torch.Tensor:
    """AWQ's clipping search: for every (output channel, scale group) independently, the clamp
    ratio of max |w| in [min_ratio, 1] that minimizes that block's output error
    e H_gg eᵀ (H_gg: the group's diagonal block of H). Returns the clamped weight [O, K];
    quantizing it with plain min/max scales gives the clipped scales. Per-tensor specs share
    one scale across rows, so they are returned unchanged."""
    w = weight.detach().reshape(weight.shape[0], -1).double()
    if spec.granularity == "per_tensor":
        return w
    o, k = w.shape
    g = spec.group_size if spec.granularity == "per_group" else k
    wb = w.reshape(o, k // g, g)
    hb = torch.stack([hessian[i:i + g, i:i + g] for i in range(0, k, g)]).double()  # [G, g, g]
    amax = wb.abs().amax(-1, keepdim=True)
    best_err, best_ratio = None, torch.ones_like(amax)
    for ratio in torch.linspace(1.0, min_ratio, grid).tolist():
        clamped = torch.maximum(torch.minimum(wb, amax * ratio), -amax * ratio)
        e = (rtn(clamped.reshape(o, k), spec).reshape(o, k // g, g) - wb)
        err = torch.einsum("ogi,gij,ogj->og", e, hb, e)[..., None]
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    limit = amax * best_ratio
    return torch.maximum(torch.minimum(wb, limit), -limit).reshape(o, k)
