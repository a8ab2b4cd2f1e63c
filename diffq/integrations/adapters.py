"""The one place that picks a library adapter: mark a model quantized by `diffq.quantize` /
`diffq.load` as diffq-quantized for its library's `save_pretrained`, and register diffq's
quantizer with diffusers / transformers when asked to (`diffq.register()`). Imports
`hf_diffusers` / `hf_transformers` (and so the libraries) only for a model of that library or
on registration."""
from __future__ import annotations

import importlib
import importlib.util

from torch import nn

from diffq.integrations.hf import describe

_LIBRARIES = ("diffusers", "transformers")


def is_hf_model(model: nn.Module) -> str | None:
    """'diffusers' / 'transformers' when the model class comes from that library."""
    for cls in type(model).__mro__:
        root = cls.__module__.partition(".")[0]
        if root in _LIBRARIES and cls.__name__ in ("ModelMixin", "PreTrainedModel"):
            return root
    return None


def attach(model: nn.Module) -> nn.Module:
    """Mark a model quantized by `diffq.quantize` / `diffq.load` as a diffq-quantized HF model,
    so that `save_pretrained` writes its quantization_config and tensors (no-op for others)."""
    lib = is_hf_model(model)
    if lib == "diffusers":
        from diffq.integrations.hf_diffusers import attach_to
    elif lib == "transformers":
        from diffq.integrations.hf_transformers import attach_to
    else:
        return model
    attach_to(model, describe(model))
    return model


class Registration:
    """The entries `register` added to the libraries' quantizer registries. `close()` (or the
    end of a `with` block) removes them again; entries that were there before are left alone."""

    def __init__(self, added: list[tuple[dict, str]]) -> None:
        self.added = added

    def close(self) -> None:
        for mapping, key in self.added:
            mapping.pop(key, None)
        self.added = []

    def __enter__(self) -> Registration:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def register(libraries: tuple[str, ...] = _LIBRARIES) -> Registration:
    """Add quant_method "diffq" to the quantizer registries of diffusers and transformers (each
    that is installed), so their `from_pretrained` loads diffq checkpoints and takes
    `quant_backend="diffq"`. Idempotent. `with diffq.register(): ...` undoes it on exit."""
    added: list[tuple[dict, str]] = []
    for lib in libraries:
        if importlib.util.find_spec(lib) is None:
            continue
        module = importlib.import_module(f"diffq.integrations.hf_{lib}")
        auto = importlib.import_module(f"{lib}.quantizers.auto")
        maps = (auto.AUTO_QUANTIZATION_CONFIG_MAPPING, auto.AUTO_QUANTIZER_MAPPING)
        before = [module.QUANT_METHOD in m for m in maps]
        module.register()
        added += [(m, module.QUANT_METHOD) for m, had in zip(maps, before, strict=True) if not had]
    return Registration(added)
