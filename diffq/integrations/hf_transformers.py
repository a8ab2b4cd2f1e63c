"""diffq's transformers quantization backend: `DiffqTransformersConfig` and `DiffqHfQuantizer`."""
from __future__ import annotations

import re
from typing import Any

from torch import nn
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from diffq.checkpoint import marker_names, unloadable_markers
from diffq.integrations.hf import QUANT_METHOD, DiffqConfigMixin, finish, prepare
from diffq.nn.adapters import base_state_dict


def _ignore_markers(model: nn.Module, layers: dict) -> None:
    """With diffq imported, the markers are expected: keep them out of transformers' load report.
    `layers`: the checkpoint's quantized-layer table, as `prepare` converted them."""
    patterns = {f"^{re.escape(k)}$" for k in marker_names(layers)}
    model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | patterns


class DiffqTransformersConfig(DiffqConfigMixin, QuantizationConfigMixin):
    """The transformers twin of `DiffqConfig` (same arguments), e.g. for text encoders and LLMs."""

    @staticmethod
    def register_quantizer() -> None:
        register()


class DiffqHfQuantizer(HfQuantizer):
    """Quantize weights on load, or load a diffq checkpoint written by save_pretrained. The
    checkpoint's tensor names are the quantized model's own, so no weight conversion is needed;
    save_pretrained adds the markers of `diffq.checkpoint.unloadable_markers`."""

    requires_calibration = False

    def __init__(self, quantization_config: DiffqTransformersConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args, **kwargs) -> None:
        if not self.pre_quantized:
            self.quantization_config.quantize_recipe()

    def _process_model_before_weight_loading(self, model, **kwargs):
        prepare(model, self.quantization_config, self.pre_quantized,
                getattr(model, "_keep_in_fp32_modules", None) or ())
        if self.pre_quantized:
            _ignore_markers(model, self.quantization_config.layers)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        self.quantization_config = finish(model, self.quantization_config, self.pre_quantized)
        model.config.quantization_config = self.quantization_config
        return model

    def get_state_dict_and_metadata(self, model):
        return {**base_state_dict(model), **unloadable_markers(model)}, {}

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def attach_to(model, described: dict) -> None:
    """Make `save_pretrained` of a model quantized outside from_pretrained write diffq's config."""
    config = DiffqTransformersConfig(**described)
    model.hf_quantizer = DiffqHfQuantizer(config, pre_quantized=True)
    model.quantization_method = config.quant_method
    model.config.quantization_config = config


def register() -> None:
    """Add diffq to transformers' quantizer registries (idempotent)."""
    from transformers.quantizers import auto

    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(DiffqTransformersConfig)
    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(DiffqHfQuantizer)
