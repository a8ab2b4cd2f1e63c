"""The quantized model under its adapters: state-dict keys and layer names as if no PEFT
adapter (LoRA) were loaded, for everything diffq writes (checkpoints, digests, the layers of
diffq.json). PEFT wraps an adapted layer as `<name>.base_layer` beside `<name>.lora_A.<adapter>`
and friends; the adapter itself is saved apart, by diffusers' `save_lora_weights`."""
from __future__ import annotations

import torch
from torch import nn

_WRAP = ".base_layer"


def plain_name(name: str) -> str:
    """A module or tensor name with PEFT's `.base_layer` hops removed."""
    return name.replace(_WRAP + ".", ".").removesuffix(_WRAP)


def is_adapter_tensor(name: str) -> bool:
    return any(part.startswith("lora_") for part in name.split("."))


def base_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict without adapter tensors, under the names the model has unadapted."""
    return {plain_name(k): v for k, v in state.items() if not is_adapter_tensor(k)}


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return base_tensors(model.state_dict())
