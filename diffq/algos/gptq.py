"""GPTQ (Frantar et al. 2022): quantize a weight column by column, each time moving the rounding
error onto the columns not yet quantized so that the layer output ‖(Ŵ − W) X‖² stays small.

For the column q being quantized, the optimal update of the remaining weights is the OBS step
(OBQ, Frantar & Alistarh 2022, eq. 3):  δ = −(w_q − quant(w_q)) / [H⁻¹]_qq · (H⁻¹)_{q,:}
followed by removing q from H⁻¹ (eq. 4). GPTQ (Algorithm 1) gets every such H⁻¹ row at once
from the upper Cholesky factor U of H⁻¹ (row q of U is row q of the reduced inverse divided
by its square root), and applies updates lazily: immediately inside a block of columns, once
per block (one matmul) to the columns after it.
"""
from __future__ import annotations

import torch

from diffq.core.clip import mse_clip_qparams
from diffq.core.granularity import PerChannel, PerTensor
from diffq.core.quant import QParams, choose_qparams, dequantize, quantize
from diffq.core.recipe import WeightSpec
from diffq.core.storage import Layout
from diffq.core.weights import QuantizedWeight


def column_groups(spec: WeightSpec, k: int) -> torch.Tensor:
    """Scale group of each of the k input columns: column // group_size for per-group layouts,
    one group for per-channel / per-tensor ones (scales chosen before the first column)."""
    size = spec.layout().group_size
    if size is None:
        return torch.zeros(k, dtype=torch.long)
    if k % size:
        raise ValueError(f"group size {size} does not divide the reduction dimension {k}")
    return torch.arange(k) // size


def group_qparams(w: torch.Tensor, spec: WeightSpec, row: torch.Tensor | None = None) -> QParams:
    """Scale (and zero point) [O, 1] (per-tensor: [1, 1]) for the columns `w` [O, c] of one
    group, rounded to the stored scale dtype so quantizing uses exactly what is saved (on the
    row scales `row` for formats whose groups share one, see `StorageFormat.row_scale`)."""
    layout = spec.layout()
    if row is not None:
        return layout.storage.group_qparams(w, row, layout, spec.clip)
    gran = PerTensor() if isinstance(layout.granularity, PerTensor) else PerChannel(0)
    choose = mse_clip_qparams if spec.clip == "mse" else choose_qparams
    qp = choose(w, layout.grid, gran, layout.symmetric)
    return QParams(qp.scale.to(layout.scale_dtype).float(), qp.zero_point)


def round_column(col: torch.Tensor, qp: QParams, spec: WeightSpec, row: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One column [O] -> (codes [O] unpacked, dequantized values [O] in col's dtype)."""
    storage = spec.layout().storage
    fmt = storage.column_grid
    q = quantize(col[:, None], qp, fmt, PerTensor())
    return storage.column_codes(q, qp, row)[:, 0], dequantize(q, qp, fmt, col.dtype)[:, 0]


def prepare_hessian(h: torch.Tensor, w: torch.Tensor, percdamp: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dead input channels (H_jj = 0: never active) get H_jj = 1 and a zero weight column, since
    they cannot affect the output; then add percdamp · mean(diag H) to the diagonal."""
    h = h.to(w.dtype).clone()
    w = w.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    damp = percdamp * torch.diag(h).mean()
    h.diagonal().add_(damp)
    return h, w


def column_order(h: torch.Tensor, act_order: bool) -> torch.Tensor:
    """Processing order: by decreasing H_jj with act_order (columns with large inputs first,
    while many columns remain to absorb their error), else left to right. Ties keep index order."""
    if not act_order:
        return torch.arange(h.shape[0], device=h.device)
    return torch.argsort(torch.diag(h), descending=True, stable=True)


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor U of H⁻¹ (H⁻¹ = Uᵀ U), adding damping only if H is numerically
    not positive definite."""
    ident = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for extra in (0.0, 1e-6, 1e-4, 1e-2):  # float32 Hessians of near-rank-deficient inputs
        hd = h + extra * torch.diag(h).mean() * ident
        chol, info = torch.linalg.cholesky_ex(hd)
        if info == 0:
            u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if info == 0:
                return u
    raise ValueError("the Hessian is not positive definite even after damping; collect more "
                     "calibration data or raise the damping (weights.gptq.damp)")


def _storage(codes: torch.Tensor, qps: list[QParams], spec: WeightSpec,
             shape: tuple[int, ...], row: torch.Tensor | None = None) -> QuantizedWeight:
    """Codes [O, K] and per-group params -> diffq's QuantizedWeight (same layout as RTN)."""
    layout: Layout = spec.layout()
    if row is not None:  # the groups' params are multiples of the row scales it stores
        return QuantizedWeight.from_codes(codes, row, None, layout, shape)
    scale = torch.stack([qp.scale for qp in qps], dim=1)  # [O|1, G, 1]
    zps = [qp.zero_point for qp in qps]
    zp = None if zps[0] is None else torch.stack(zps, dim=1)
    if layout.group_size is None:  # [O|1, 1] like RTN
        scale, zp = scale[:, 0], None if zp is None else zp[:, 0]
    return QuantizedWeight.from_codes(codes, scale, zp, layout, shape)


@torch.no_grad()
def gptq(weight: torch.Tensor, hessian: torch.Tensor, spec: WeightSpec, block_size: int = 128,
         act_order: bool = False, static_groups: bool = False, percdamp: float = 0.01
         ) -> QuantizedWeight:
    """Quantize `weight` (Linear [O, K] or Conv2d [O, C, kh, kw], viewed as [O, K]) with GPTQ
    given the input Hessian [K, K] (see `algos.hessian`). Per-group scales are chosen when the
    first column of their group is reached, from the weights updated so far (static_groups: all
    from the original weights up front); groups stay contiguous in the original column order
    even with act_order, so the result is plain diffq storage. Computes in float64 when weight
    or hessian is float64, else float32."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    shape = tuple(weight.shape)
    dtype = torch.float64 if torch.float64 in (weight.dtype, hessian.dtype) else torch.float32
    w = weight.detach().reshape(shape[0], -1).to(dtype)
    k = w.shape[1]
    h, w = prepare_hessian(hessian, w, percdamp)
    groups = column_groups(spec, k).to(w.device)
    members = [torch.nonzero(groups == g).flatten() for g in range(int(groups.max()) + 1)]
    row = spec.layout().storage.row_scale(w, spec.layout(), spec.clip)
    qps: list[QParams | None] = [None] * len(members)
    if static_groups:
        qps = [group_qparams(w[:, m], spec, row) for m in members]

    perm = column_order(h, act_order)
    pos = torch.empty_like(perm)
    pos[perm] = torch.arange(k, device=perm.device)  # original column -> processing position
    w = w[:, perm].contiguous()
    u = _inverse_cholesky(h[perm][:, perm])
    gid = groups[perm].tolist()
    codes = torch.empty(w.shape, dtype=spec.layout().storage.code_dtype, device=w.device)

    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = gid[i1 + i]
            if qps[g] is None:
                qps[g] = group_qparams(_current(w, w1, err1, u, i1, i, pos[members[g]]), spec, row)
            q, deq = round_column(w1[:, i], qps[g], spec, row)
            codes[:, i1 + i] = q
            e = (w1[:, i] - deq) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]  # the lazy batch update (GPTQ Algorithm 1, line 12)
    return _storage(codes[:, pos], qps, spec, shape, row)


def _current(w, w1, err1, u, i1: int, i: int, cols: torch.Tensor) -> torch.Tensor:
    """Fully updated values [O, c] of processing positions `cols` (all >= i1 + i) while column
    i of the block starting at i1 is next: block columns are current, later ones still miss
    the pending updates of this block's first i columns."""
    out = torch.empty(w.shape[0], len(cols), dtype=w.dtype, device=w.device)
    inside = cols < i1 + w1.shape[1]
    out[:, inside] = w1[:, cols[inside] - i1]
    later = cols[~inside]
    if len(later):
        out[:, ~inside] = w[:, later] - err1[:, :i] @ u[i1:i1 + i, later]
    return out
