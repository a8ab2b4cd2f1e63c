"""Record the input activations of chosen layers, call by call, tagged with the timestep.

Hooks only observe: the float model computes as usual. Each call stores per channel segment
the min and max of the layer input (the statistics static scales are derived from).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from diffq.errors import CalibrationError


def call_model(model: nn.Module, item: Any) -> Any:
    """Call `model` with one calibration item: a tensor (one positional argument), a tuple
    (positional arguments), a dict (keyword arguments) or an (args, kwargs) pair."""
    if isinstance(item, torch.Tensor):
        return model(item)
    if isinstance(item, dict):
        return model(**item)
    if (isinstance(item, (tuple, list)) and len(item) == 2
            and isinstance(item[0], (tuple, list)) and isinstance(item[1], dict)):
        return model(*item[0], **item[1])
    if isinstance(item, (tuple, list)):
        return model(*item)
    raise CalibrationError(
        f"calibration item of type {type(item).__name__} is not a tensor, tuple, dict or "
        "(args, kwargs) pair"
    )


@dataclass
class LayerStats:
    """Per-call statistics of one layer input: timesteps [N] (NaN when none), minmax [N, 2, S]."""

    timesteps: list[float] = field(default_factory=list)
    minmax: list[torch.Tensor] = field(default_factory=list)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(self.timesteps, dtype=torch.float64), torch.stack(self.minmax)


def segment_minmax(x: torch.Tensor, axis: int, segments: list[int]) -> torch.Tensor:
    """[2, S]: min and max of x over each channel segment along `axis`."""
    parts = torch.split(x.detach(), segments, dim=axis) if len(segments) > 1 else (x.detach(),)
    return torch.stack([torch.stack((p.amin(), p.amax())) for p in parts], dim=1).float().cpu()


class ActivationCollector:
    """Context manager: forward pre-hooks on `layers` (name -> (module, feature_axis, segments)).

    `clock` gives the timestep of the current call (see `diffq.nn.timestep`).
    """

    def __init__(self, layers: dict[str, tuple[nn.Module, int, list[int]]], clock) -> None:
        self.layers = layers
        self.clock = clock
        self.stats: dict[str, LayerStats] = {name: LayerStats() for name in layers}
        self._handles: list = []

    def _hook(self, name: str, axis: int, segments: list[int]):
        def hook(_m: nn.Module, args: tuple) -> None:
            x = args[0]
            t = self.clock.value
            if not torch.isfinite(x).all():
                where = "" if t is None else f" at timestep {t:g}"
                raise CalibrationError(f"non-finite activation (NaN/Inf) entering layer {name!r}{where}")
            st = self.stats[name]
            st.timesteps.append(float("nan") if t is None else t)
            st.minmax.append(segment_minmax(x, axis, segments))

        return hook

    def __enter__(self) -> "ActivationCollector":
        for name, (m, axis, segments) in self.layers.items():
            self._handles.append(m.register_forward_pre_hook(self._hook(name, axis, segments)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def run_calibration(model: nn.Module, data: Iterable[Any], collector: ActivationCollector,
                    progress: bool = True) -> None:
    """Feed every calibration item through `model` with the collector attached."""
    from tqdm.auto import tqdm

    n = 0
    with torch.inference_mode(), collector:
        for item in tqdm(data, desc="calibrating", disable=not progress, leave=False):
            call_model(model, item)
            n += 1
    if n == 0:
        raise CalibrationError("the calibration data is empty")
