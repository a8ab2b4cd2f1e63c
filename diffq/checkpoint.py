"""diffq's checkpoint format: `model.safetensors` (every tensor of the quantized model, codes
in their real dtypes) plus `diffq.json` (format version, package version, recipe, per-layer
scheme, a SHA-256 of every tensor). Writes are atomic; loading never unpickles, refuses NaN / Inf
in any float tensor and checks every tensor against its recorded digest."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from diffq._version import __version__
from diffq.core.config import from_dict
from diffq.core.recipe import ActivationSpec, LayerPlan, Recipe, WeightSpec
from diffq.errors import CheckpointError, DiffqError
from diffq.io import writing_directory
from diffq.nn.adapters import base_state_dict, plain_name
from diffq.nn.base import QuantizedLayer
from diffq.nn.convert import convert
from diffq.nn.runtime import attach_runtime
from diffq.nn.state import diffq_state

FORMAT_VERSION = 1
META_FILE = "diffq.json"
TENSOR_FILE = "model.safetensors"
# save_pretrained's weight files: a diffq.json next to one of them is a drop-in HF component
HF_TENSOR_FILES = ("diffusion_pytorch_model.safetensors", TENSOR_FILE)


# transformers without diffq only warns about an unknown quant_method, then runs the model with
# random `weight`s in place of the quantized ones. An empty tensor under the first quantized
# layer's `weight` name turns that into its hard size-mismatch error, and its load report lists
# NOTICE_KEY, which says what to install. diffq itself drops both on load.
NOTICE_KEY = ("diffq_quantized_checkpoint.pip_install_diffq_toolkit"
              ".and_call_diffq_register_before_from_pretrained")
# written by earlier versions (before the rename, and when `import diffq` registered)
_OLD_NOTICE_KEYS = (
    "diffq_quantized_checkpoint.pip_install_diffq.and_import_diffq_before_from_pretrained",
    "diffq_quantized_checkpoint.pip_install_diffq_toolkit.and_import_diffq_before_from_pretrained",
)


def unloadable_markers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that make a transformers checkpoint of `model` fail to load without diffq."""
    first = next((n for n, m in model.named_modules() if isinstance(m, QuantizedLayer)), None)
    if first is None:
        return {}
    empty = torch.zeros(0, dtype=torch.int8)
    return {f"{first}.weight": empty, NOTICE_KEY: empty.clone()}


def marker_names(layers) -> set[str]:
    """Every name `unloadable_markers` may write, for a model with these quantized layers."""
    return {f"{n}.weight" for n in layers} | {NOTICE_KEY, *_OLD_NOTICE_KEYS}


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses shared storage (tied weights): keep one name, record the aliases."""
    seen: dict[tuple, str] = {}
    out, aliases = {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        out[name] = t.detach().cpu().contiguous()
    return out, aliases


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """Name -> the name it shares storage with (tied weights, e.g. T5's embed_tokens / shared),
    for checkpoints that another writer (save_pretrained) deduplicated."""
    return _dedupe(base_state_dict(model))[1]


def describe_layers(model: nn.Module) -> dict[str, dict]:
    """Layer name -> scheme and float weight shape of every quantized layer (diffq.json's `layers`)."""
    layers = {plain_name(n): {**m.describe(), "shape": list(m.weight_shape)}
              for n, m in model.named_modules() if isinstance(m, QuantizedLayer)}
    if not layers:
        raise CheckpointError("the model has no quantized layers; run diffq.quantize first")
    return layers


def tensor_digest(t: torch.Tensor) -> str:
    """"<dtype>:<sha256 of the bytes>" of one tensor as stored."""
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return f"{str(t.dtype).removeprefix('torch.')}:{hashlib.sha256(memoryview(data)).hexdigest()}"


def tensor_digests(model: nn.Module, known: dict[str, str] | None = None) -> dict[str, str]:
    """State-dict name -> `tensor_digest`, recorded at save time and checked at load; `known`
    digests (just verified, of these very tensors) are reused instead of hashed again."""
    known = known or {}
    return {n: known.get(n) or tensor_digest(t) for n, t in base_state_dict(model).items()
            if t.device.type != "meta"}


def verify(model: nn.Module, digests: dict[str, str] | None, where: str,
           hashes: bool = True) -> dict[str, str]:
    """Refuse a loaded model with NaN / Inf in a float tensor (scales, zero points, float weights)
    or, with `hashes`, a tensor whose bytes differ from the digest recorded at save time (flipped
    bytes, swapped tensors). Tensors the loader cast to another dtype keep only the first check.
    Returns the digests it checked (name -> digest), for `tensor_digests(known=...)`."""
    checked = {}
    for name, t in model.state_dict().items():
        if t.device.type == "meta":
            continue
        if t.is_floating_point() and not torch.isfinite(t.float() if t.element_size() == 1 else t).all():
            raise CheckpointError(f"{where}: tensor {name!r} holds NaN or Inf; the checkpoint is corrupt")
        recorded = (digests or {}).get(name) if hashes else None
        if recorded and recorded.split(":")[0] == str(t.dtype).removeprefix("torch."):
            if tensor_digest(t) != recorded:
                raise CheckpointError(
                    f"{where}: tensor {name!r} differs from the digest recorded when it was saved; "
                    "the file is corrupt or was edited (diffq.load(..., verify_hashes=False) or "
                    "diffq eval --no-verify skips this check)")
            checked[name] = recorded
    return checked


def metadata(model: nn.Module, aliases: dict[str, str] | None = None,
             known_digests: dict[str, str] | None = None) -> dict:
    """The contents of diffq.json for a quantized model."""
    recipe = diffq_state(model).recipe
    return {
        "format": "diffq",
        "format_version": FORMAT_VERSION,
        "diffq_version": __version__,
        "recipe": None if recipe is None else recipe.to_dict(),
        "layers": describe_layers(model),
        "aliases": aliases or {},
        "tensors": tensor_digests(model, known_digests),
    }


def save(model: nn.Module, directory: str | Path, overwrite: bool = False) -> Path:
    """Write a quantized model to `directory` atomically (safetensors + diffq.json)."""
    directory = Path(directory)
    describe_layers(model)  # refuse an unquantized model before any work
    tensors, aliases = _dedupe(base_state_dict(model))
    meta = metadata(model, aliases)
    with writing_directory(directory, overwrite) as tmp:
        save_file(tensors, str(tmp / TENSOR_FILE), metadata={"format": "diffq"})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return directory


def read_meta(directory: str | Path) -> dict:
    """Parse and check `diffq.json` of a checkpoint directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    path = directory / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a diffq checkpoint (no {META_FILE})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != "diffq" or "layers" not in meta:
        raise CheckpointError(f"{path} is not a diffq checkpoint description")
    check_format_version(meta.get("format_version"), str(directory))
    return meta


def check_format_version(version, where: str) -> None:
    """Refuse a checkpoint written by a newer diffq (its layout may differ)."""
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{where} has checkpoint format {version!r}, newer than this diffq reads "
            f"({FORMAT_VERSION}); upgrade diffq (pip install -U diffq-toolkit)"
        )


def convert_empty(model: nn.Module, layers: dict) -> None:
    """Swap the layers described by `layers` (diffq.json's table) for empty quantized layers of
    the same scheme, ready to receive a checkpoint's tensors; the model may be on `meta`."""
    plans, segments, input_scales = _plans(model, layers)
    convert(model, plans, segments, empty=True, input_scales=input_scales)


def _plans(model: nn.Module, layers: dict
           ) -> tuple[dict[str, LayerPlan], dict[str, list[int]], dict[str, torch.Tensor]]:
    plans, segments, input_scales = {}, {}, {}
    for name, d in layers.items():
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(
                f"checkpoint layer {name!r} does not exist in the model; was it saved from "
                "another architecture?"
            ) from None
        if isinstance(m, QuantizedLayer):
            raise CheckpointError("diffq.load expects the float model; this one is already quantized")
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            raise CheckpointError(f"checkpoint layer {name!r} is a {type(m).__name__} in the model, "
                                  "not Linear/Conv2d; was it saved from another architecture?")
        if list(m.weight.shape) != d["shape"]:
            raise CheckpointError(
                f"layer {name!r}: checkpoint weight shape {d['shape']} != model "
                f"{list(m.weight.shape)}; was it saved from another architecture?"
            )
        try:
            acts = d["activations"]
            plans[name] = LayerPlan(from_dict(WeightSpec, d["weights"]),
                                    None if acts is None else from_dict(ActivationSpec, acts))
        except (DiffqError, KeyError, TypeError) as e:
            raise CheckpointError(f"layer {name!r} has an invalid scheme in {META_FILE}: {e}") from None
        if d.get("segments"):
            segments[name] = d["segments"]
        if d.get("input_scale"):  # placeholder of the right size; the values are in the tensors
            input_scales[name] = torch.ones(m.weight.shape[1] * getattr(m, "groups", 1))
    return plans, segments, input_scales


def load(directory: str | Path, model: nn.Module, timestep_of=None, verify_hashes: bool = True) -> nn.Module:
    """Load a diffq checkpoint into `model`, a float model of the same architecture (in place).
    `verify_hashes=False` skips the per-tensor digest check (NaN / Inf are refused either way)."""
    directory = Path(directory)
    meta = read_meta(directory)
    path = next((directory / f for f in HF_TENSOR_FILES if (directory / f).is_file()),
                directory / TENSOR_FILE)
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{directory} has no {TENSOR_FILE}") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt: {e}") from None
    convert_empty(model, meta["layers"])
    for name in marker_names(meta["layers"]):
        if name in tensors and tensors[name].numel() == 0:
            del tensors[name]
    for alias, canonical in meta.get("aliases", {}).items():  # whichever name the writer kept
        if canonical in tensors:
            tensors[alias] = tensors[canonical]
        elif alias in tensors:
            tensors[canonical] = tensors[alias]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, t in tensors.items():
        e = expected[name]
        storage = name.rpartition(".")[2] in ("qweight", "weight_scale", "weight_zero_point")
        if t.shape != e.shape or (storage and t.dtype != e.dtype):
            raise CheckpointError(
                f"tensor {name!r}: checkpoint {tuple(t.shape)} {t.dtype} != model "
                f"{tuple(e.shape)} {e.dtype}"
            )
    model.load_state_dict(tensors, strict=True)
    verify(model, meta.get("tensors"), str(directory), verify_hashes)
    recipe = None if meta.get("recipe") is None else Recipe.from_dict(meta["recipe"])
    if recipe is not None:
        diffq_state(model).recipe = recipe
    attach_runtime(model, None if recipe is None else recipe.attention, timestep_of)
    return model
