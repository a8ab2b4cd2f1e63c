"""Activation statistics as a value: merged exactly (other prompts, other processes, a resumed
run) and saved / loaded as safetensors (`<layer>/<field>` tensors, settings as JSON metadata)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from diffq.calib.collector import LayerStats
from diffq.errors import InputError

_FIELDS = ("timesteps", "minmax", "hist", "exponent")


def merge_stats(a: dict[str, LayerStats] | None, b: dict[str, LayerStats]) -> dict[str, LayerStats]:
    """The exact union of two collections over the same layers (min of minima, max of maxima,
    summed integer histograms); `a` None is the empty collection."""
    if not a:
        return b
    if a.keys() != b.keys():
        raise InputError("statistics of different layers cannot be merged")
    return {n: LayerStats.merge(a[n], b[n]) for n in b}


def save_stats(stats: dict[str, LayerStats], path: Path, meta: dict | None = None) -> None:
    """Write `stats` to `path` atomically; `meta` (JSON) says how they were collected."""
    tensors = {f"{n}/{k}": v.contiguous() for n, st in stats.items() for k, v in st.tensors().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"diffq": json.dumps(meta or {})})
    os.replace(tmp, path)


def load_stats(path: Path) -> dict[str, LayerStats]:
    """Statistics written by `save_stats` (never unpickles)."""
    try:
        raw = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise InputError(f"statistics file {path} is unreadable: {e}") from None
    names = {k.rpartition("/")[0] for k in raw}
    try:
        return {n: LayerStats(*(raw[f"{n}/{f}"] for f in _FIELDS), raw.get(f"{n}/chmax"))
                for n in names}
    except KeyError as e:
        raise InputError(f"statistics file {path} lacks tensor {e}") from None


def stats_meta(path: Path) -> dict:
    """The metadata `save_stats` stored with the statistics."""
    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {}).get("diffq", "{}"))
