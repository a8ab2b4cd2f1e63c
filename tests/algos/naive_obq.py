"""The test reference for GPTQ (kept out of the package): OBQ one column at a time."""
import torch

from diffq.algos.gptq import column_groups, column_order, group_qparams, prepare_hessian, round_column
from diffq.core.quant import QParams
from diffq.core.recipe import WeightSpec


@torch.no_grad()
def naive_obq(weight: torch.Tensor, hessian: torch.Tensor, spec: WeightSpec,
              act_order: bool = False, static_groups: bool = False, percdamp: float = 0.01
              ) -> torch.Tensor:
    """Reference for tests: the OBS update of every column, one at a time, on the explicit
    float64 inverse Hessian with the quantized column eliminated after each step (OBQ eq. 3-4);
    no Cholesky, no blocking. Returns the dequantized weight [O, K] in float64."""
    w = weight.detach().reshape(weight.shape[0], -1).double()
    h, w = prepare_hessian(hessian.double(), w, percdamp)
    groups = column_groups(spec, w.shape[1])
    members = [torch.nonzero(groups == g).flatten() for g in range(int(groups.max()) + 1)]
    row = spec.layout().storage.row_scale(w, spec.layout(), spec.clip)
    qps: list[QParams | None] = [None] * len(members)
    if static_groups:
        qps = [group_qparams(w[:, m], spec, row) for m in members]
    hinv = torch.linalg.inv(h)
    for q in column_order(h, act_order).tolist():
        g = int(groups[q])
        if qps[g] is None:
            qps[g] = group_qparams(w[:, members[g]], spec, row)
        _, deq = round_column(w[:, q], qps[g], spec, row)
        err = (w[:, q] - deq) / hinv[q, q]
        w -= err[:, None] * hinv[q][None, :]
        w[:, q] = deq  # equal up to rounding; make the quantized column exact
        hinv -= hinv[:, q:q + 1] @ hinv[q:q + 1, :] / hinv[q, q]
    return w
