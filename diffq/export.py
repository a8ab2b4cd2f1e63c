"""Export weight-only int8 / int4 Linear layers in the compressed-tensors layout (vLLM,
transformers' `compressed-tensors` loader): `<layer>.weight` int8 ("int-quantized") or
`<layer>.weight_packed` int32 + `weight_shape` ("pack-quantized"), `weight_scale`
[O, 1 | K/g], optional `weight_zero_point`, and a `quantization_config` with config_groups."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from diffq.core.granularity import PerTensor
from diffq.errors import CheckpointError
from diffq.io import writing_directory
from diffq.nn.base import QuantizedLayer
from diffq.nn.qlinear import QLinear

CT_VERSION = "0.9.0"  # the compressed-tensors layout written here (pack_to_int32 of that era)


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Signed codes [R, C] -> int32 words along `dim`, 32 // bits per word, lowest bits first;
    each code offset by 2^(bits-1) to unsigned, the last word zero-padded (compressed-tensors)."""
    per = 32 // bits
    u = (codes.to(torch.int64) + (1 << (bits - 1))) & ((1 << bits) - 1)
    if dim == 0:
        return pack_int32(codes.t(), bits).t().contiguous()
    pad = -u.shape[1] % per
    u = torch.nn.functional.pad(u, (0, pad)).reshape(u.shape[0], -1, per)
    words = sum(u[..., i] << (bits * i) for i in range(per))
    return (words - ((words >> 31) << 32)).to(torch.int32)  # reinterpret uint32 as int32


def _group_key(name: str, layer: nn.Module) -> tuple[str, int | None, bool]:
    """(format, group size or None for per-channel, symmetric): one config group each."""
    if not isinstance(layer, QLinear):
        raise CheckpointError(f"layer {name!r} is a {type(layer).__name__}; compressed-tensors export "
                              "takes Linear layers only")
    layout = layer.weight_layout
    if layer.input_quant is not None or getattr(layer, "input_scale", None) is not None:
        raise CheckpointError(f"layer {name!r} quantizes activations or scales its input; "
                              "compressed-tensors export takes weight-only int8 / int4 layers")
    if layout.format not in ("int8", "int4") or isinstance(layout.granularity, PerTensor):
        raise CheckpointError(f"layer {name!r} has {layout.format} weights, "
                              f"{type(layout.granularity).__name__}; "
                              "compressed-tensors export takes int8 / int4 per_channel or per_group")
    return (layout.format, layout.group_size, layout.symmetric)


def _tensors(name: str, layer: QLinear, fmt: str, symmetric: bool) -> dict[str, torch.Tensor]:
    qw = layer.quantized_weight
    out_features = qw.shape[0]
    codes = qw.codes().reshape(out_features, -1).to(torch.int8)
    scale = qw.scale.reshape(out_features, -1)
    out = {f"{name}.weight_scale": scale}
    if fmt == "int8":
        out[f"{name}.weight"] = codes
    else:
        out[f"{name}.weight_packed"] = pack_int32(codes, 4)
        out[f"{name}.weight_shape"] = torch.tensor(qw.shape, dtype=torch.int32)
    if not symmetric:
        zp = qw.zero_point.reshape(out_features, -1).to(torch.int8)
        out[f"{name}.weight_zero_point"] = zp if fmt == "int8" else pack_int32(zp, 4, dim=0)
    return out


def compressed_tensors(model: nn.Module, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write `model` (weight-only int8 / int4 QLinear layers from diffq.quantize) as a
    compressed-tensors checkpoint: model.safetensors + config.json (the model's HF config, if
    any, with `quantization_config`). Other quantized layers are refused, float ones kept."""
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLayer)}
    groups: dict[tuple, list[str]] = {}
    for name, m in quantized.items():
        groups.setdefault(_group_key(name, m), []).append(name)
    if not groups:
        raise CheckpointError("the model has no quantized Linear layers; run diffq.quantize first")
    ignore = [n for n, m in model.named_modules()  # left in float
              if isinstance(m, nn.Linear) and not isinstance(m, QuantizedLayer)]
    inside = tuple(f"{n}." for n in quantized)
    # float tensors as they are; of a quantized layer only its bias (codes and scales follow)
    tensors = {k: t for k, t in model.state_dict().items()
               if not k.startswith(inside) or k.endswith(".bias") and k[:-5] in quantized}
    for (fmt, _, symmetric), names in groups.items():
        for name in names:
            tensors.update(_tensors(name, quantized[name], fmt, symmetric))
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    packed = any(fmt == "int4" for fmt, _, _ in groups)
    qconfig = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized" if packed else "int-quantized",
        "quantization_status": "compressed",
        "version": CT_VERSION,
        "config_groups": {
            f"group_{i}": {
                "targets": names,
                "weights": {"num_bits": 8 if fmt == "int8" else 4, "type": "int", "symmetric": symmetric,
                            "strategy": "group" if group else "channel", "group_size": group,
                            "dynamic": False, "actorder": None, "observer": "minmax"},
                "input_activations": None, "output_activations": None,
                **({"format": "int-quantized" if fmt == "int8" else "pack-quantized"} if packed else {}),
            }
            for i, ((fmt, group, symmetric), names) in enumerate(groups.items())
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
    }
    config = getattr(model, "config", None)
    config = config.to_dict() if hasattr(config, "to_dict") else {}
    config["quantization_config"] = qconfig
    with writing_directory(out_dir, overwrite) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=1, default=str), encoding="utf-8")
    return Path(out_dir)


def unpack_int32(words: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """Inverse of `pack_int32` (dim 1): int32 [R, W] -> signed int8 codes [R, columns]."""
    per = 32 // bits
    mask = (1 << bits) - 1
    w = words.to(torch.int64) & 0xFFFFFFFF
    u = torch.stack([(w >> (bits * i)) & mask for i in range(per)], dim=-1).reshape(w.shape[0], -1)
    return (u[:, :columns] - (1 << (bits - 1))).to(torch.int8)


__all__ = ["compressed_tensors", "pack_int32", "unpack_int32"]
