"""Quantized modules holding real low-bit storage, and the module-swapping machinery."""
from diffq.nn.activation import ActivationQuantizer
from diffq.nn.base import QuantizedLayer
from diffq.nn.qconv2d import QConv2d
from diffq.nn.qlinear import QLinear
from diffq.nn.timestep import TimestepClock, install_clock

__all__ = ["ActivationQuantizer", "QuantizedLayer", "QConv2d", "QLinear", "TimestepClock", "set_backend",
           "install_clock", "restore_codes"]


def set_backend(model, backend: str) -> None:
    """Choose the compute path of every quantized layer: "auto" (fastest available kernel,
    e.g. oneDNN int8 on x86) or "reference" (dequantize and run the float op)."""
    from diffq.ops import BACKENDS

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    for m in model.modules():
        if isinstance(m, QuantizedLayer):
            m.backend = backend


def restore_codes(model) -> None:
    """Give every quantized layer of `model` its plain int8 codes back, where a call released
    them once packed (see `QuantizedLayer`): e.g. before reading `qweight` buffers directly."""
    for m in model.modules():
        if isinstance(m, QuantizedLayer):
            m.restore_codes()
