"""diffq's diffusers quantization backend: `DiffqConfig` and `DiffqQuantizer` (quant_method "diffq")."""
from __future__ import annotations

from typing import Any

import torch
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin

from diffq.errors import CheckpointError
from diffq.integrations.hf import QUANT_METHOD, DiffqConfigMixin, finish, prepare
from diffq.nn.adapters import base_tensors
from diffq.nn.base import QuantizedLayer


class DiffqConfig(DiffqConfigMixin, QuantizationConfigMixin):
    """`from_pretrained(..., quantization_config=DiffqConfig(weights="int8"))` for diffusers
    models; `DiffqConfig(recipe="w4g64")` takes any weight-only diffq recipe."""

    @staticmethod
    def register_quantizer() -> None:
        register()


def _storage(model: torch.nn.Module, name: str) -> tuple[QuantizedLayer, str] | None:
    """(quantized layer, tensor name) when `name` is diffq storage (codes, scales, tables)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            m = model.get_submodule(".".join(parts[:i]))
        except AttributeError:
            return None
        if isinstance(m, QuantizedLayer):
            return (m, ".".join(parts[i:])) if parts[i] != "bias" else None
    return None


class DiffqQuantizer(DiffusersQuantizer):
    """Quantize weights on load, or load a diffq checkpoint written by save_pretrained."""

    requires_calibration = False
    required_packages = ["diffq"]
    use_keep_in_fp32_modules = True

    def __init__(self, quantization_config: DiffqConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args, **kwargs) -> None:
        if not self.pre_quantized:
            self.quantization_config.quantize_recipe()

    def check_if_quantized_param(self, model, param_value, param_name, state_dict, **kwargs) -> bool:
        # diffq storage keeps its own dtypes: a torch_dtype must not cast int8 codes or scale tables
        return self.pre_quantized and _storage(model, param_name) is not None

    def check_quantized_param_shape(self, param_name, current_param, loaded_param) -> bool:
        if current_param.shape != loaded_param.shape:
            raise CheckpointError(f"tensor {param_name!r}: checkpoint shape {tuple(loaded_param.shape)} "
                                  f"!= model {tuple(current_param.shape)}; was it saved from another "
                                  "architecture?")
        return True

    def create_quantized_param(self, model, param_value, param_name, target_device, state_dict=None,
                               *args, **kwargs):
        layer, name = _storage(model, param_name)
        owner = layer.get_submodule(name.rpartition(".")[0]) if "." in name else layer
        key = name.rpartition(".")[2]
        # the checkpoint's tensor, not param_value: diffusers has already cast floats to torch_dtype
        value = state_dict[param_name] if state_dict is not None and param_name in state_dict else param_value
        self.check_quantized_param_shape(param_name, owner._buffers[key], value)
        owner._buffers[key] = value.to(device=target_device, dtype=owner._buffers[key].dtype)
        layer.kernel_cache.clear()  # the compute codes are remade once, when loading ends (finish)

    def _process_model_before_weight_loading(self, model, device_map=None, keep_in_fp32_modules=(), **kwargs):
        prepare(model, self.quantization_config, self.pre_quantized, keep_in_fp32_modules or ())
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        self.quantization_config = finish(model, self.quantization_config, self.pre_quantized)
        model.register_to_config(quantization_config=self.quantization_config)
        return model

    def get_state_dict_and_metadata(self, state_dict, safe_serialization: bool = False):
        # a loaded LoRA adapter is not part of the quantized model: its tensors are left out and
        # the layers it wraps saved under their own names (the adapter: save_lora_weights)
        return base_tensors(state_dict), {}

    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def attach_to(model, described: dict) -> None:
    """Make `save_pretrained` of a model quantized outside from_pretrained write diffq's config."""
    config = DiffqConfig(**described)
    model.hf_quantizer = DiffqQuantizer(config, pre_quantized=True)
    # is_quantized stays unset: diffusers would then refuse model.to(dtype), which diffq layers
    # support (float parts cast, codes and scales kept)
    model.quantization_method = config.quant_method
    model.register_to_config(quantization_config=config)


def register() -> None:
    """Add diffq to diffusers' quantizer registries (idempotent)."""
    from diffusers.quantizers import auto

    auto.AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(QUANT_METHOD, DiffqConfig)
    auto.AUTO_QUANTIZER_MAPPING.setdefault(QUANT_METHOD, DiffqQuantizer)
