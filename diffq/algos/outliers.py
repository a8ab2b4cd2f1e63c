"""Outlier handling: keep the few values that quantize worst in 16-bit.

* LLM.int8() (Dettmers et al. 2022, eq. 3): input feature dimensions whose activations reach
  |x| >= 6 go through a float matmul, the rest through int8:
      X W ᵀ ≈ X_O W_Oᵀ (float) + Q(X_R) Q(W_R)ᵀ (int8), O = outlier columns, R = the rest.
* SpQR (Dettmers et al. 2023, eq. 6) / OWQ: weights whose quantization error, weighted by the
  inverse Hessian, is largest are stored sparsely in 16-bit: saliency
      s_ij = (w_ij − quant(w_ij))² / [H⁻¹]_jj,
  the increase of the layer loss when w_ij alone is rounded (the OBS criterion).
"""
from __future__ import annotations

import torch

from diffq.algos.awq import rtn
from diffq.algos.gptq import prepare_hessian
from diffq.algos.smoothquant import w8a8_output
from diffq.core.recipe import WeightSpec


def outlier_channels(act_max: torch.Tensor, threshold: float = 6.0) -> torch.Tensor:
    """Indices (ascending) of input channels whose max |x| [K] reaches `threshold`."""
    return torch.nonzero(act_max >= threshold).flatten()


def decomposed_linear(x: torch.Tensor, weight: torch.Tensor, channels: torch.Tensor,
                      spec: WeightSpec) -> torch.Tensor:
    """Reference LLM.int8() output [N, O] for x [N, K], weight [O, K]: outlier `channels` in
    float, the other columns W8A8 with dynamic per-token activations and weights per `spec`."""
    rest = torch.ones(weight.shape[1], dtype=torch.bool)
    rest[channels] = False
    out = x[:, channels] @ weight[:, channels].t().to(x.dtype)
    if rest.any():
        out = out + w8a8_output(x[:, rest], weight[:, rest].to(x.dtype), spec)
    return out


@torch.no_grad()
def sparse_outliers(weight: torch.Tensor, hessian: torch.Tensor, spec: WeightSpec,
                    fraction: float = 0.01, percdamp: float = 0.01
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The `fraction` of weight entries with the largest saliency (SpQR eq. 6) under
    round-to-nearest with `spec`. weight [O, K], hessian [K, K] -> (flat indices [n] into the
    [O, K] view, ascending; their float values [n]). Ties are broken by index."""
    w = weight.detach().reshape(weight.shape[0], -1).double()
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    h, _ = prepare_hessian(hessian.double(), w, percdamp)
    hinv_diag = torch.diag(torch.cholesky_inverse(torch.linalg.cholesky(h)))
    saliency = ((w - rtn(w, spec)).pow(2) / hinv_diag[None, :]).flatten()
    n = round(fraction * saliency.numel())
    idx = torch.argsort(saliency, descending=True, stable=True)[:n].sort().values
    return idx, weight.detach().reshape(-1)[idx].clone()
