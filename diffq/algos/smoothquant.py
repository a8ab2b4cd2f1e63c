"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights with a per-input-
channel scale, Y = (X diag(s)⁻¹)(diag(s) Wᵀ), which is exact before quantization.

Eq. 4: s_j = max|X_j|^α / max|W_j|^(1−α). α = 0.5 balances the two ranges; here it can also
be searched on sample inputs for the W8A8 error with dynamic per-token int8 activations.
"""
from __future__ import annotations

import torch

from diffq.core.formats import get_format
from diffq.core.granularity import PerToken
from diffq.core.quant import choose_qparams, fake_quantize
from diffq.core.recipe import WeightSpec
from diffq.core.weights import quantize_weight


def smooth_scales(act_max: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """s [K] (float64) from max |X_j| [K] and weight [O, K] (eq. 4). Channels whose activation
    or weight column is all zero get s = 1: they carry nothing to balance."""
    w_max = weight.detach().reshape(weight.shape[0], -1).abs().amax(0).double()
    a_max = act_max.double()
    s = a_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    return torch.where((a_max > 0) & (w_max > 0), s, torch.ones_like(s))


def smooth_weight(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """W diag(s): column j of a Linear weight [O, K] times s_j (input channel j of a conv
    weight [O, C, kh, kw] with s [C])."""
    shape = [1, -1] + [1] * (weight.dim() - 2)
    return weight * s.to(weight.dtype).reshape(shape)


def smooth_input(x: torch.Tensor, s: torch.Tensor, axis: int = -1) -> torch.Tensor:
    """x diag(s)⁻¹ along the channel `axis`, so smooth_input(x) · smooth_weight(W)ᵀ = x Wᵀ."""
    shape = [1] * x.dim()
    shape[axis] = -1
    return x / s.to(x.dtype).reshape(shape)


def w8a8_output(x: torch.Tensor, weight: torch.Tensor, spec: WeightSpec,
                act_format: str = "int8") -> torch.Tensor:
    """Q_a(x) Q_w(W)ᵀ [N, O]: x [N, K] with dynamic per-token symmetric scales (what the layer
    does at run time), W [O, K] quantized by `spec`."""
    fmt = get_format(act_format)
    xq = fake_quantize(x, choose_qparams(x, fmt, PerToken(-1)), fmt, PerToken(-1))
    return xq @ quantize_weight(weight, spec).dequantize(x.dtype).t()


@torch.no_grad()
def smooth_search(weight: torch.Tensor, x: torch.Tensor, act_max: torch.Tensor, spec: WeightSpec,
                  alphas: list[float] | None = None, act_format: str = "int8"
                  ) -> tuple[torch.Tensor, float]:
    """α minimizing the quantized-output error ‖Q(x/s) Q(W s)ᵀ − x Wᵀ‖² on sample rows x [N, K]
    (default grid 0, 0.05, ..., 1). act_max [K] comes from all calibration data, not only the
    samples. Returns (s [K] float64, α)."""
    w = weight.detach().double()
    xs = x.double()
    ref = xs @ w.t()
    best: tuple[float, torch.Tensor, float] | None = None
    for alpha in alphas if alphas is not None else torch.linspace(0, 1, 21).tolist():
        s = smooth_scales(act_max, w, alpha)
        out = w8a8_output(smooth_input(xs, s), smooth_weight(w, s), spec, act_format)
        err = float((out - ref).pow(2).sum())
        if best is None or err < best[0]:
            best = (err, s, alpha)
    assert best is not None
    return best[1], best[2]
