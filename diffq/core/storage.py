"""How a quantized weight is stored, apart from the recipe that asked for it.

A `Layout` (storage format, granularity, scale dtype, symmetry) knows the shapes and bytes of a
[O, K] weight's codes, scales and zero points. Each storage format is one `StorageFormat`
registered by name: how it packs codes and rounds a float weight onto its grid. The recipe's
`WeightSpec` turns into a Layout through its format's handler (which may pin some fields: q8_0
is always per-group 32 with fp16 scales); everything below the recipe uses the Layout only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from diffq.core.clip import mse_clip_qparams
from diffq.core.formats import Format, get_format
from diffq.core.granularity import Granularity, PerChannel, PerGroup
from diffq.core.pack import pack_int4, pack_nibbles, unpack_int4, unpack_nibbles
from diffq.core.quant import QParams, choose_qparams, quantize
from diffq.core.registry import Registry
from diffq.errors import RecipeError


class WeightSpec(Protocol):
    """The recipe fields a format reads (`diffq.core.recipe.WeightSpec`, which sits above)."""

    format: str
    granularity: str
    group_size: int
    symmetric: bool
    clip: str
    scale_dtype: str

    def granularity_obj(self) -> Granularity: ...

SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Layout:
    """Storage of one [O, K] weight matrix (K = in * kh * kw): codes in `format`, one scale
    (and zero point when not symmetric) per `granularity` element, scales in `scale_dtype`."""

    format: str
    granularity: Granularity
    scale_dtype: torch.dtype = torch.float32
    symmetric: bool = True

    @property
    def storage(self) -> StorageFormat:
        return storage_format(self.format)

    @property
    def grid(self) -> Format:
        return self.storage.grid

    @property
    def bits(self) -> int:
        return self.storage.bits

    @property
    def group_size(self) -> int | None:
        return self.granularity.group_size if isinstance(self.granularity, PerGroup) else None

    def check(self, out: int, k: int) -> None:
        g = self.group_size
        if g is not None and k % g:
            raise ValueError(f"group size {g} does not divide the reduction dimension {k}")

    def data_shape(self, out: int, k: int) -> tuple[int, ...]:
        return self.storage.data_shape(out, k, self)

    def scale_shape(self, out: int, k: int) -> tuple[int, ...]:
        """keepdim shape of the scales over the blocked [O, (K/g, g | K)] view."""
        return self.storage.scale_shape(out, k, self)

    def zero_point_shape(self, out: int, k: int) -> tuple[int, ...] | None:
        return None if self.symmetric else self.scale_shape(out, k)

    def nbytes(self, out: int, k: int) -> int:
        """Bytes of codes, scales and zero points (int8) of an [out, k] weight."""
        n_scales = math.prod(self.scale_shape(out, k))
        zp = 0 if self.symmetric else n_scales
        elem = torch.empty((), dtype=self.scale_dtype).element_size()
        return math.prod(self.data_shape(out, k)) * self.storage.data_dtype.itemsize + n_scales * elem + zp

    def empty(self, out: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Zero-filled (data, scale, zero point) of the right shapes and dtypes, for loading."""
        zp_shape = self.zero_point_shape(out, k)
        return (torch.zeros(self.data_shape(out, k), dtype=self.storage.data_dtype),
                torch.zeros(self.scale_shape(out, k), dtype=self.scale_dtype),
                None if zp_shape is None else torch.zeros(zp_shape, dtype=torch.int8))


class StorageFormat:
    """A stored number format: the grid codes live on, how codes are packed into `data`, and
    round-to-nearest from a float weight. Subclass and `register_format` to add one."""

    def __init__(self, name: str, grid: Format | None = None) -> None:
        self.name = name
        self.grid = grid or get_format(name)

    @property
    def data_dtype(self) -> torch.dtype:
        return self.grid.storage

    @property
    def bits(self) -> int:
        """Bits a weight costs before scales (the mixed-precision candidates' key)."""
        return self.grid.bits

    @property
    def code_dtype(self) -> torch.dtype:
        """dtype of unpacked codes: int8 on integer grids, uint8 code-book indices, float8 itself."""
        return {"int": torch.int8, "lut": torch.uint8}.get(self.grid.kind, self.grid.storage)

    def check(self, spec: WeightSpec) -> None:
        """Raise RecipeError for recipe fields this format cannot store."""
        if not spec.symmetric and not self.grid.supports_zero_point:
            raise RecipeError(f"weights.format {self.name!r} cannot be asymmetric")

    def layout(self, spec: WeightSpec) -> Layout:
        return Layout(self.name, spec.granularity_obj(), SCALE_DTYPES[spec.scale_dtype], spec.symmetric)

    def data_shape(self, out: int, k: int, layout: Layout) -> tuple[int, ...]:
        return (out, k // 2) if self.grid.packed else (out, k)

    def scale_shape(self, out: int, k: int, layout: Layout) -> tuple[int, ...]:
        g = layout.granularity
        if isinstance(g, PerGroup):
            return (out, k // g.group_size, 1)
        return (out, 1) if isinstance(g, PerChannel) else (1, 1)

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [O, K] as stored."""
        return codes

    def unpack(self, data: torch.Tensor) -> torch.Tensor:
        """Stored data -> codes [O, K]."""
        return data

    def store(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
              layout: Layout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Codes [O, K] with their scale and zero point -> (data, scale, zero point) as stored."""
        zp = None if zero_point is None else zero_point.to(torch.int8)
        return self.pack(codes), scale.to(layout.scale_dtype), zp

    def blocked(self, data: torch.Tensor, layout: Layout) -> torch.Tensor:
        """Stored data -> unpacked codes in the blocked view the scales broadcast over."""
        q = self.unpack(data)
        g = layout.group_size
        return q if g is None else q.reshape(q.shape[0], -1, g)

    def compute_layout(self, layout: Layout) -> Layout | None:
        """The layout of the codes kernels multiply when it is not the stored one (`blocked`
        then gives those codes), else None."""
        return None

    # GPTQ's hooks: a format whose groups share a per-row scale (`row_scale` not None) chooses
    # each group's params on that row scale and turns the grid's codes into its own.
    def row_scale(self, w: torch.Tensor, layout: Layout, clip: str) -> torch.Tensor | None:
        return None

    def group_qparams(self, w: torch.Tensor, row: torch.Tensor, layout: Layout, clip: str) -> QParams:
        raise NotImplementedError

    def column_codes(self, q: torch.Tensor, qp: QParams, row: torch.Tensor | None) -> torch.Tensor:
        return q

    @property
    def column_grid(self) -> Format:
        """The grid GPTQ rounds one column onto, with a group's params."""
        return self.grid

    def round(self, w: torch.Tensor, layout: Layout, clip: str = "none"
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Round-to-nearest of w [O, K] float32 -> (codes [O, K], scale, zero point) as stored.
        Codes are computed with the scale as stored, so dequantizing reproduces the choice."""
        g = layout.granularity
        choose = mse_clip_qparams if clip == "mse" else choose_qparams
        qp = choose(w, self.grid, g, layout.symmetric)
        scale = qp.scale.to(layout.scale_dtype)
        q = quantize(w, QParams(scale.float(), qp.zero_point), self.grid, g).reshape(w.shape[0], -1)
        return q, scale, None if qp.zero_point is None else qp.zero_point.to(torch.int8)


class Int4(StorageFormat):
    def pack(self, codes):
        return pack_int4(codes)

    def unpack(self, data):
        return unpack_int4(data)


class NF4(StorageFormat):
    def check(self, spec):
        super().check(spec)
        if spec.granularity != "per_group":
            raise RecipeError("weights.format 'nf4' needs granularity 'per_group'")

    def pack(self, codes):
        return pack_nibbles(codes)

    def unpack(self, data):
        return unpack_nibbles(data)


FORMATS: Registry[StorageFormat] = Registry("weight format", RecipeError)


def register_format(fmt: StorageFormat) -> StorageFormat:
    """Make `fmt` available as `weights.format: <fmt.name>` (the name must also be in the
    recipe schema's WeightFormat, which a test keeps in step with this registry)."""
    return FORMATS.register(fmt.name, fmt)


def storage_format(name: str) -> StorageFormat:
    return FORMATS.get(name)


def storage_formats() -> tuple[str, ...]:
    return FORMATS.names()


for _f in (StorageFormat("int8"), StorageFormat("int7"), Int4("int4"), StorageFormat("fp8_e4m3"),
           StorageFormat("fp8_e5m2"), NF4("nf4")):
    register_format(_f)

__all__ = ["Layout", "StorageFormat", "SCALE_DTYPES", "register_format", "storage_format",
           "storage_formats"]
