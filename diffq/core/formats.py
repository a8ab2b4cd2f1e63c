"""Number formats that diffq stores: their value ranges and storage dtypes."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from diffq.errors import RecipeError

# QLoRA's NormalFloat-4 code book: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


@dataclass(frozen=True)
class Format:
    """A quantized number format.

    kind: "int" (uniform integer grid), "float" (torch float8 dtype) or "lut" (code book).
    qmin/qmax: the representable range in quantized units; `storage` is the dtype kept in memory,
    with two 4-bit codes per uint8 byte when `packed`.
    """

    name: str
    bits: int
    kind: str
    qmin: float
    qmax: float
    storage: torch.dtype
    packed: bool = False

    @property
    def supports_zero_point(self) -> bool:
        return self.kind == "int"


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("int8", 8, "int", -128, 127, torch.int8),
        # int8 storage on half the grid: CPUs without VNNI multiply these unsplit (diffq.ops.onednn)
        Format("int7", 7, "int", -64, 63, torch.int8),
        Format("int4", 4, "int", -8, 7, torch.uint8, packed=True),
        Format("fp8_e4m3", 8, "float", -448.0, 448.0, torch.float8_e4m3fn),
        Format("fp8_e5m2", 8, "float", -57344.0, 57344.0, torch.float8_e5m2),
        Format("nf4", 4, "lut", -1.0, 1.0, torch.uint8, packed=True),
    )
}


def get_format(name: str) -> Format:
    """Look up a format by name, with an error that lists the known ones."""
    try:
        return FORMATS[name]
    except KeyError:
        raise RecipeError(f"unknown format {name!r}; known: {', '.join(FORMATS)}") from None
