"""Quantized modules holding real low-bit storage, and the module-swapping machinery."""
from diffq.nn.activation import ActivationQuantizer
from diffq.nn.base import QuantizedLayer
from diffq.nn.qconv2d import QConv2d
from diffq.nn.qlinear import QLinear
from diffq.nn.timestep import TimestepClock, install_clock

__all__ = ["ActivationQuantizer", "QuantizedLayer", "QConv2d", "QLinear", "TimestepClock",
           "install_clock"]
