"""Collect what GPTQ, AWQ and SmoothQuant need from a layer's inputs, with forward pre-hooks:
the Hessian H = (2/n) Σ x xᵀ (K x K float32 per layer), per-channel mean / max |x|, and a few
sample rows for searches that must see real inputs. Hooks only observe."""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import nn

from diffq.algos.hessian import conv_rows, linear_rows, update_channel_stats, update_hessian
from diffq.calib.hooks import input_hooks
from diffq.errors import CalibrationError


@dataclass
class InputStats:
    """One layer's inputs. hessian [K, K] over `rows` rows (im2col rows for convs) or None when
    not asked for; mean_abs / max_abs [C] per input channel over `tokens` tokens (pixels for
    convs); samples [<= max, K] input rows kept for searches, or None."""

    hessian: torch.Tensor | None
    rows: int
    mean_abs: torch.Tensor
    max_abs: torch.Tensor
    tokens: int
    samples: torch.Tensor | None = None


def hessian_problem(module: nn.Module) -> str | None:
    """Why H cannot be built for `module` by im2col, or None when it can."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return "grouped conv"
        if isinstance(module.padding, str):
            return f"padding {module.padding!r}"
        return None
    return None if isinstance(module, nn.Linear) else f"{type(module).__name__} layer"


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer input as rows [N, K] matching the weight viewed as [O, K]."""
    if isinstance(module, nn.Conv2d):
        return conv_rows(x, module.kernel_size, module.stride, module.padding, module.dilation)
    return linear_rows(x)


class _Layer:
    def __init__(self, module: nn.Module, hessian: bool, max_samples: int) -> None:
        self.module, self.want_h, self.max_samples = module, hessian, max_samples
        self.h: torch.Tensor | None = None
        self.rows = self.tokens = 0
        self.mean = self.max = None
        self.samples = None  # rows whose index (over all calls) is a multiple of `stride`
        self.seen, self.stride = 0, 1

    def add(self, x: torch.Tensor) -> None:
        axis = 1 if isinstance(self.module, nn.Conv2d) else -1
        self.mean, self.max, self.tokens = update_channel_stats(self.mean, self.max, self.tokens, x, axis)
        if not self.want_h and not self.max_samples:
            return
        rows = input_rows(self.module, x.detach())
        if self.want_h:
            self.h, self.rows = update_hessian(self.h, self.rows, rows)
        if self.max_samples:
            self._keep(rows)

    def _keep(self, rows: torch.Tensor) -> None:
        """Deterministic thinning: keep every stride-th row of the whole stream, doubling the
        stride whenever more than max_samples are kept, so samples span all calls evenly."""
        first = (-self.seen) % self.stride
        new = rows[first::self.stride].float().cpu()
        self.seen += rows.shape[0]
        self.samples = new if self.samples is None else torch.cat((self.samples, new))
        while self.samples.shape[0] > self.max_samples:
            self.samples, self.stride = self.samples[::2], self.stride * 2

    def finish(self, name: str) -> InputStats:
        if self.mean is None:
            raise CalibrationError(f"calibration never reached layer {name!r}")
        return InputStats(self.h, self.rows, self.mean, self.max, self.tokens, self.samples)


class InputCollector:
    """Context manager: forward pre-hooks on `layers` (name -> Linear / groups=1 Conv2d).
    Layers named in `hessian` accumulate H; `samples` maps names to how many rows to keep."""

    def __init__(self, layers: dict[str, nn.Module], hessian: Collection[str] = (),
                 samples: dict[str, int] | None = None) -> None:
        samples = samples or {}
        bad = next(((n, p) for n in hessian if (p := hessian_problem(layers[n]))), None)
        if bad:
            raise ValueError(f"layer {bad[0]!r}: no im2col Hessian for a {bad[1]}")
        self._layers = {n: _Layer(m, n in hessian, samples.get(n, 0)) for n, m in layers.items()}

    def _hook(self, name: str, layer: _Layer):
        def hook(_m: nn.Module, args: tuple) -> None:
            x = args[0]
            if not torch.isfinite(x).all():
                raise CalibrationError(f"non-finite activation (NaN/Inf) entering layer {name!r}")
            layer.add(x)

        return hook

    def stats(self) -> dict[str, InputStats]:
        return {n: layer.finish(n) for n, layer in self._layers.items()}

    def __enter__(self) -> InputCollector:
        self._hooks = input_hooks({n: layer.module for n, layer in self._layers.items()},
                                  lambda n, _m: self._hook(n, self._layers[n]))
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
