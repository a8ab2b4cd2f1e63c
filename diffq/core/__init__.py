"""Formats, granularities and quantize/dequantize/pack primitives: pure torch, no model code."""
from diffq.core import ggml as _ggml  # noqa: F401  (registers the q8_0 storage format)
from diffq.core import progressive as _progressive  # noqa: F401  (registers int4_i8)
from diffq.core.formats import FORMATS, Format, get_format
from diffq.core.granularity import PerChannel, PerGroup, PerTensor, PerToken
from diffq.core.quant import QParams, choose_qparams, dequantize, fake_quantize, quantize, sqnr_db
from diffq.core.storage import Layout, StorageFormat, register_format, storage_format

__all__ = [
    "FORMATS", "Format", "get_format", "PerChannel", "PerGroup", "PerTensor", "PerToken",
    "QParams", "choose_qparams", "dequantize", "fake_quantize", "quantize", "sqnr_db",
    "Layout", "StorageFormat", "register_format", "storage_format",
]
