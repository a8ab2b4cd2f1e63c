"""`int4_i8`: int4 weights that int8 kernels multiply (QServe's progressive group quantization,
Lin et al. 2024, "QServe: W4A8KV4 quantization and system co-design").

Each output row has one float scale s (stored in the recipe's scale dtype) and each group of g
input columns an integer multiplier u in [1, 16]; a weight is q * u * s with q in [-8, 7]. So
every code q * u is an int8 value in [-128, 112] on the row's per-channel grid: the weight is
an int8 per-channel weight whose groups are 4-bit, and the W8A8 kernels (oneDNN on x86, Triton
on CUDA) run it as it is, where per-group float scales would need a GEMM that rescales every
group of the reduction. Stored as 4.25 bits a weight at g = 32 (nibbles, then one multiplier
byte per group) plus the row scale.

Codes outside the storage are the int8 products (`blocked`, `round`, GPTQ's columns), so
everything above this file sees an int8 per-channel weight; `store` factors them back into
nibbles and multipliers (any int8 codes whose groups lie on such a grid, whoever chose them).
"""
from __future__ import annotations

import torch

from diffq.core.clip import best_of
from diffq.core.formats import get_format
from diffq.core.granularity import PerChannel, PerGroup
from diffq.core.pack import pack_int4, unpack_int4
from diffq.core.quant import QParams
from diffq.core.storage import SCALE_DTYPES, Layout, StorageFormat, register_format
from diffq.errors import RecipeError

U_MAX = 16  # largest group multiplier: 7 * 16 = 112 and -8 * 16 = -128 stay int8
_INT4 = get_format("int4")


def _q(wb: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """int4 codes (float) of wb on the grid of `step`."""
    return (wb / step).round().clamp(_INT4.qmin, _INT4.qmax)


def _error(wb: torch.Tensor, step: torch.Tensor, dims) -> torch.Tensor:
    """Squared rounding error of wb on the int4 grid of `step`, summed over `dims`."""
    return (_q(wb, step) * step - wb).pow(2).sum(dims, keepdim=True)


def _multipliers(wb: torch.Tensor, row: torch.Tensor, clip: str) -> torch.Tensor:
    """Integer multiplier u [O, G, 1] (float) of each group of wb [O, G, g] on row scales
    [O, 1, 1]: the smallest that holds the group's range (q = 7 at its largest value), or with
    clip "mse" the one of it and the three below whose rounding error is smallest (a search
    of all 16 found the same error to 0.2 % on tiny-dit's weights, one-off)."""
    top = torch.ceil(wb.abs().amax(-1, keepdim=True) / (_INT4.qmax * row)).clamp(1, U_MAX)
    if clip != "mse":
        return top
    return best_of(((top - down).clamp(min=1) for down in range(4)), lambda u: _error(wb, row * u, -1))


def _products(wb: torch.Tensor, row: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """int8 codes q * u of wb [.., g] with q = round(w / (row * u)) in [-8, 7]."""
    return (_q(wb, row * u) * u).to(torch.int8)


def _group_gcd(codes: torch.Tensor) -> torch.Tensor:
    """Greatest common divisor along the last dimension of int32 codes (0 for all-zero)."""
    u = codes[..., 0].abs()
    for i in range(1, codes.shape[-1]):
        u = torch.gcd(u, codes[..., i])
    return u


class Int4OnInt8(StorageFormat):
    """See the module docstring. Symmetric, per group (the group size of the multipliers)."""

    def check(self, spec) -> None:
        if spec.granularity != "per_group" or not spec.symmetric:
            raise RecipeError(f"weights.format {self.name!r} is per_group and symmetric: groups "
                              "of int4 codes with integer multipliers of one scale per row")

    def layout(self, spec) -> Layout:
        return Layout(self.name, PerGroup(spec.group_size), SCALE_DTYPES[spec.scale_dtype], True)

    @property
    def data_dtype(self) -> torch.dtype:
        return torch.uint8

    @property
    def bits(self) -> int:
        return 4

    def compute_layout(self, layout):
        return Layout("int8", PerChannel(0), layout.scale_dtype, True)

    def data_shape(self, out, k, layout):
        return (out, k // 2 + k // layout.group_size)

    def scale_shape(self, out, k, layout):
        return (out, 1)

    def row_scale(self, w, layout, clip):
        """s [O, 1] (in the stored dtype's values): the row's largest weight at q * u = 112, or
        with clip "mse" that range shrunk by the one of 9 ratios in [0.6, 1] whose row error
        (each group at its best multiplier) is smallest: small-range groups get finer
        multiples (tiny-dit's weights, g = 128: relative error 0.00787 -> 0.00775, as with
        free fp16 group scales; a one-off measurement)."""
        amax = w.abs().amax(-1, keepdim=True)

        def scale(ratio: float) -> torch.Tensor:
            s = (amax * ratio / (_INT4.qmax * U_MAX)).to(layout.scale_dtype).float()
            return torch.where(s > 0, s, torch.ones_like(s))

        if clip != "mse":
            return scale(1.0)
        wb = w.reshape(w.shape[0], -1, layout.group_size)

        def row_error(s: torch.Tensor) -> torch.Tensor:
            s = s[:, :, None]
            return _error(wb, s * _multipliers(wb, s, clip), (1, 2))[:, :, 0]

        return best_of((scale(r) for r in torch.linspace(1.0, 0.6, 9).tolist()), row_error)

    def round(self, w, layout, clip="none"):
        row = self.row_scale(w, layout, clip)
        wb = w.reshape(w.shape[0], -1, layout.group_size)
        codes = _products(wb, row[:, :, None], _multipliers(wb, row[:, :, None], clip))
        return codes.reshape(w.shape), row.to(layout.scale_dtype), None

    def group_qparams(self, w, row, layout, clip):
        """One group's columns w [O, c]: scale row * u on the int4 grid (`column_grid`)."""
        return QParams(row * _multipliers(w[:, None, :], row[:, :, None], clip)[:, 0])

    def column_codes(self, q, qp, row):
        return (q.to(torch.int16) * (qp.scale / row).round().to(torch.int16)).to(torch.int8)

    @property
    def column_grid(self):
        return _INT4

    def store(self, codes, scale, zero_point, layout):
        out, k = codes.shape
        cb = codes.to(torch.int32).reshape(out, -1, layout.group_size)
        u = _group_gcd(cb)
        u = torch.where(u > 0, u, torch.ones_like(u))
        q = cb // u[..., None]
        if bool((q < _INT4.qmin).any() | (q > _INT4.qmax).any() | (u > 255).any()):
            raise ValueError(f"codes are not int4 x integer multiples in groups of {layout.group_size}; "
                             f"format {self.name!r} cannot store them")
        data = torch.cat((pack_int4(q.reshape(out, k).to(torch.int8)), u.to(torch.uint8)), dim=1)
        return data, scale.reshape(out, 1).to(layout.scale_dtype), None

    def blocked(self, data, layout):
        g = layout.group_size
        k = data.shape[1] * 2 * g // (g + 2)
        q = unpack_int4(data[:, :k // 2]).reshape(data.shape[0], -1, g)
        u = data[:, k // 2:].to(torch.int16)[..., None]
        return (q.to(torch.int16) * u).to(torch.int8).reshape(data.shape[0], k)


register_format(Int4OnInt8("int4_i8", get_format("int8")))
