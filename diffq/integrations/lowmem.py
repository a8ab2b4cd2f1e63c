"""Out-of-core layer-by-layer calibration: build a transformers model on the meta device (no
memory for weights), load everything outside its repeated blocks (embeddings, final norm,
head), and load each block's float weights from the safetensors checkpoint only when
`diffq.sequential` reaches it. A block's float Linear weights are dropped as soon as it is
quantized, so the float weights in memory at any time are one block plus the non-block ones."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from diffq.errors import InputError


def _checkpoint_files(path: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file of a transformers directory (single file or sharded)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {k: path / f for k, f in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise InputError(f"{path}: --low-memory needs safetensors weights (model.safetensors "
                         "or model.safetensors.index.json)")
    from safetensors import safe_open

    with safe_open(single, "pt") as f:
        return dict.fromkeys(f.keys(), single)


class LazyWeights:
    """Loads named tensors of a checkpoint into a meta-device model, as float32, on demand."""

    def __init__(self, model: nn.Module, path: Path) -> None:
        self.model = model
        self.files = _checkpoint_files(Path(path))
        names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        missing = sorted(n for n in names if n not in self.files and not self._tied(n))
        if missing:
            raise InputError(f"{path}: checkpoint lacks {missing[0]!r} ({len(missing)} tensors); "
                             "--low-memory needs tensor names that match the model's")

    def _tied(self, name: str) -> bool:
        tied = getattr(self.model.config, "tie_word_embeddings", False)
        return tied and name.endswith("lm_head.weight")

    def load(self, names: list[str]) -> None:
        from accelerate.utils import set_module_tensor_to_device
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for n in names:
            if n in self.files:
                by_file.setdefault(self.files[n], []).append(n)
        for file, keys in by_file.items():
            with safe_open(file, "pt") as f:
                for k in keys:
                    # a copy: a tensor left on the file's mmap keeps its pages resident (RSS)
                    # until the whole mapping goes, i.e. every block's weights would stay
                    value = f.get_tensor(k).to(torch.float32, copy=True)
                    set_module_tensor_to_device(self.model, k, "cpu", value=value)

    def load_block(self, prefix: str) -> None:
        """Every parameter of the module at `prefix` ("model.layers.3")."""
        head = prefix + "."
        self.load([n for n, _ in self.model.named_parameters() if n.startswith(head)])


def load_skeleton(path: Path, blocks_prefix_of) -> tuple[nn.Module, LazyWeights]:
    """(model with only its non-block weights loaded, the loader of the rest).
    blocks_prefix_of(model) -> the name of the model's block list (see diffq.sequential)."""
    import transformers
    from accelerate import init_empty_weights

    config = transformers.AutoConfig.from_pretrained(path)
    arch = (config.architectures or [None])[0]
    cls = getattr(transformers, arch or "", None)
    if cls is None:
        raise InputError(f"{path}: architecture {arch!r} is not in this transformers version")
    with init_empty_weights():  # parameters on the meta device; buffers (rotary tables) real
        model = cls._from_config(config, dtype=torch.float32)
    if any(type(m).__name__ == "Conv1D" for m in model.modules()):
        raise InputError(f"{path}: --low-memory needs a model built from nn.Linear (GPT-2-style "
                         "Conv1D layers become nn.Linear with transposed weights)")
    lazy = LazyWeights(model, path)
    blocks = blocks_prefix_of(model) + "."
    lazy.load([n for n, _ in model.named_parameters() if not n.startswith(blocks)])
    model.tie_weights()
    return model.eval(), lazy


def on_meta(module: nn.Module) -> bool:
    """Whether any parameter of `module` is still unloaded (meta device)."""
    return any(p.is_meta for p in module.parameters())
