"""Formats, granularities and quantize/dequantize/pack primitives: pure torch, no model code."""
from diffq.core.formats import FORMATS, Format, get_format
from diffq.core.granularity import PerChannel, PerGroup, PerTensor, PerToken
from diffq.core.quant import QParams, choose_qparams, dequantize, fake_quantize, quantize, sqnr_db

__all__ = [
    "FORMATS", "Format", "get_format", "PerChannel", "PerGroup", "PerTensor", "PerToken",
    "QParams", "choose_qparams", "dequantize", "fake_quantize", "quantize", "sqnr_db",
]
