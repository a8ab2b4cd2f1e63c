"""The one place that picks a library adapter: mark a model quantized by `diffq.quantize` /
`diffq.load` as diffq-quantized for its library's `save_pretrained`, and register diffq's
quantizer with diffusers / transformers. Imports `hf_diffusers` / `hf_transformers` (and so
the libraries) only for a model or registry of that library."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

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


class _RegisterAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Runs `register` right after the module `name` has been executed (a post-import hook),
    so `import diffq` does not import diffusers / transformers itself."""

    def __init__(self, name: str, register_module: str) -> None:
        self.name, self.register_module, self._spec = name, register_module, None

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name or self._spec is not None:
            return None
        others = [f for f in sys.meta_path if f is not self]
        for finder in others:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                self._spec = spec
                return importlib.util.spec_from_loader(fullname, self, origin=spec.origin)
        return None

    def create_module(self, spec):
        return self._spec.loader.create_module(self._spec)

    def exec_module(self, module) -> None:
        module.__spec__ = self._spec
        module.__loader__ = self._spec.loader
        module.__file__ = self._spec.origin
        self._spec.loader.exec_module(module)
        sys.meta_path.remove(self)
        try:
            importlib.import_module(self.register_module).register()
        except Exception as e:  # a registration bug must not break `import diffusers`
            warnings.warn(f"diffq could not register its quantizer ({self.register_module}): {e}",
                          stacklevel=2)


def install() -> None:
    """Register diffq with diffusers and transformers now if imported, else right after."""
    for lib, registry in (("diffusers", "diffusers.quantizers.auto"),
                          ("transformers", "transformers.quantizers.auto")):
        module = f"diffq.integrations.hf_{lib}"
        if registry in sys.modules:
            importlib.import_module(module).register()
        elif not any(isinstance(f, _RegisterAfterImport) and f.name == registry for f in sys.meta_path):
            sys.meta_path.insert(0, _RegisterAfterImport(registry, module))
