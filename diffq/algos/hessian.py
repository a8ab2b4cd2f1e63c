"""Second-order input statistics of a layer: the GPTQ Hessian and per-channel magnitudes.

For a layer y = W x with the weight viewed as [O, K], the layer-wise reconstruction loss
‖(Ŵ − W) X‖² has Hessian H = 2 X Xᵀ (Frantar et al. 2022, eq. 1-2). We keep its running mean
H = (2/n) Σ x xᵀ over the n input rows seen so far, so batches of any size merge exactly.
Conv2d inputs become rows by im2col (`F.unfold`), whose column order c·kh·kw + i·kw + j matches
the conv weight flattened to [O, C·kh·kw].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Pair = tuple[int, int]


def linear_rows(x: torch.Tensor) -> torch.Tensor:
    """Input of a Linear layer [..., K] -> rows [N, K]."""
    return x.reshape(-1, x.shape[-1])


def conv_rows(x: torch.Tensor, kernel_size: Pair, stride: Pair = (1, 1), padding: Pair = (0, 0),
              dilation: Pair = (1, 1)) -> torch.Tensor:
    """Input of a groups=1 Conv2d [B, C, H, W] -> im2col rows [B·L, C·kh·kw], one row per output
    pixel, so that conv(x, W) = rows @ W.reshape(O, -1)ᵀ."""
    cols = F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)  # [B, K, L]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def update_hessian(h: torch.Tensor | None, n: int, rows: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, int]:
    """Running mean H_{n+m} = (n H_n + 2 Σ_new x xᵀ) / (n + m) for new rows [m, K]; h=None starts
    a new [K, K] accumulator in `dtype` (float32 or float64)."""
    m = rows.shape[0]
    if h is None:
        h = torch.zeros(rows.shape[1], rows.shape[1], dtype=dtype, device=rows.device)
    if m == 0:
        return h, n
    x = rows.to(h.dtype)
    h = h * (n / (n + m))
    # scaling x first keeps one addmm and the same rounding for every batch split
    x = x * (2.0 / (n + m)) ** 0.5
    return h.addmm_(x.t(), x), n + m


def update_channel_stats(mean_abs: torch.Tensor | None, max_abs: torch.Tensor | None, n: int,
                         x: torch.Tensor, axis: int = -1
                         ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Running per-channel mean |x| and max |x| (channels along `axis`, everything else is a
    token): the statistics behind AWQ's s_X and SmoothQuant's max|X_j|. Returns (mean [C],
    max [C], tokens seen)."""
    a = x.detach().abs().movedim(axis, -1)
    a = a.reshape(-1, a.shape[-1]).double()
    m = a.shape[0]
    if mean_abs is None:
        mean_abs = torch.zeros(a.shape[1], dtype=torch.float64, device=a.device)
        max_abs = torch.zeros(a.shape[1], dtype=torch.float64, device=a.device)
    if m == 0:
        return mean_abs, max_abs, n
    mean_abs = mean_abs * (n / (n + m)) + a.sum(0) / (n + m)
    return mean_abs, torch.maximum(max_abs, a.amax(0)), n + m


def hessian_error(delta: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Layer-output error tr(ΔW H ΔWᵀ) of a weight change ΔW [O, K]: with H = (2/n) Σ x xᵀ
    this is (2/n) Σ ‖ΔW x‖², the loss GPTQ and AWQ minimize. Returns a 0-d tensor."""
    d = delta.reshape(delta.shape[0], -1).to(h.dtype)
    return ((d @ h) * d).sum()


def rescale_hessian(h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Hessian of the inputs x / s (per-column s [K]) from that of x: diag(s)⁻¹ H diag(s)⁻¹."""
    inv = 1.0 / s.to(h.dtype)
    return h * inv[:, None] * inv[None, :]
