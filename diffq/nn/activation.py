"""The activation-quantizer slot of a quantized layer: none, static (a table of scales per
timestep group and channel segment), or dynamic per-token."""
from __future__ import annotations

import bisect

import torch
from torch import nn

from diffq.core.formats import get_format
from diffq.core.recipe import ActivationSpec
from diffq.errors import CalibrationError
from diffq.nn.timestep import TimestepClock
from diffq.ops.types import ActQuant


class ActivationQuantizer(nn.Module):
    """Static mode holds `scale` [K, S]: K timestep groups split at `boundaries` [K-1]
    (ascending timestep values), S channel segments of sizes `segments` (S > 1 for layers that
    consume cat(skip, h)). The group is chosen from the clock's timestep value at call time."""

    def __init__(self, spec: ActivationSpec, feature_axis: int, segments: list[int]):
        super().__init__()
        self.spec = spec
        self.feature_axis = feature_axis
        self.segments = list(segments)
        self.clock: TimestepClock | None = None
        self.name = ""
        self._bounds: tuple = (None, [])
        self._made: tuple = (None, None)  # (table key, ActQuant) of the last eager call
        if spec.mode == "static":
            k, s = spec.timestep_groups, len(self.segments)
            self.register_buffer("scale", torch.ones(k, s))
            self.register_buffer("boundaries", torch.zeros(k - 1))
            if not spec.symmetric:
                self.register_buffer("zero_point", torch.zeros(k, s, dtype=torch.int32))

    def set_table(self, scale: torch.Tensor, boundaries: torch.Tensor, zero_point=None) -> None:
        """Install calibrated scales [K, S] and timestep boundaries [K-1]."""
        self.scale.copy_(scale)
        self.boundaries.copy_(boundaries)
        if zero_point is not None:
            self.zero_point.copy_(zero_point)

    def group_index(self) -> int:
        k = self.scale.shape[0]
        if k == 1:
            return 0
        t = None if self.clock is None else self.clock.value
        if t is None and self.clock is not None and self.clock.tensor is not None:
            t = float(self.clock.tensor)  # set by a compiled call; this layer runs eagerly
        if t is None:
            raise CalibrationError(
                f"layer {self.name!r} has {k} timestep groups but no timestep reached it; call "
                "the quantized model itself (its pre-hook reads the timestep) or pass timestep_of"
            )
        return bisect.bisect_right(self._host_boundaries(), t)

    def _traced_group(self) -> int | torch.Tensor:
        """The group index as a tensor op on the clock's timestep tensor (torch.compile)."""
        t = None if self.clock is None else self.clock.tensor
        if self.scale.shape[0] == 1 or t is None:
            return self.group_index()
        return torch.searchsorted(self.boundaries, t.to(self.boundaries.dtype), right=True)[0]

    def _host_boundaries(self) -> list[float]:
        """The boundaries as Python floats, read from the device once per table (not per call)."""
        key = (self.boundaries.data_ptr(), self.boundaries._version)
        if self._bounds[0] != key:
            self._bounds = (key, self.boundaries.tolist())
        return self._bounds[1]

    def params(self) -> ActQuant:
        """This call's activation quantization: eagerly, the same object for every call in one
        timestep group until the table changes (building it cost small layers ~10 us a call)."""
        if self.spec.mode == "dynamic":
            return ActQuant(get_format(self.spec.format), self.feature_axis, dynamic=True)
        if torch.compiler.is_compiling():
            return self._params(self._traced_group())
        g = self.group_index()
        zp = getattr(self, "zero_point", None)
        key = (g, self.scale.data_ptr(), self.scale._version, None if zp is None else zp._version)
        if self._made[0] != key:
            self._made = (key, self._params(g))
        return self._made[1]

    def _params(self, g: int | torch.Tensor) -> ActQuant:
        fmt = get_format(self.spec.format)
        pick = (lambda table: table[g]) if isinstance(g, int) else (
            lambda table: table.index_select(0, g.reshape(1))[0])  # no host read under compile
        scale, zp = pick(self.scale), getattr(self, "zero_point", None)
        zp = None if zp is None else pick(zp)
        if len(self.segments) > 1:  # per channel; sizes as Python ints keep the shape static
            def spread(v):
                return torch.cat([v[i:i + 1].expand(n) for i, n in enumerate(self.segments)])
            scale = spread(scale)
            zp = None if zp is None else spread(zp)
        return ActQuant(fmt, self.feature_axis, scale=scale, zero_point=zp,
                        segments=tuple(self.segments))

    def extra_repr(self) -> str:
        s = f"{self.spec.format}, {self.spec.mode}"
        if self.spec.mode == "static":
            s += f", groups={self.scale.shape[0]}, segments={self.segments}"
        return s
