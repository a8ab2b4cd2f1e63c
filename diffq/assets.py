"""Where the embedded default lives: the reference pipeline (tiny-sd), its evaluator (tiny-clip)
and the prompt sets ship inside the installed package (`diffq/_samples/`); a source checkout reads
them from `samples/`."""
from __future__ import annotations

from pathlib import Path

from diffq.errors import InputError

_PACKAGED = Path(__file__).resolve().parent / "_samples"
_SOURCE = Path(__file__).resolve().parents[1] / "samples"
_MARKERS = {"tiny-sd": "model_index.json", "tiny-clip": "config.json", "prompts": "shapes-calib.txt"}


def shipped(name: str) -> Path:
    """The folder of a shipped sample (`tiny-sd`, `tiny-clip` or `prompts`): the installed copy,
    else the source tree's; the installed path (absent) when neither is there."""
    packaged = _PACKAGED / name.replace("-", "_")
    for folder in (packaged, _SOURCE / name):
        if (folder / _MARKERS[name]).is_file():
            return folder
    return packaged


def is_shipped(path: Path) -> bool:
    """Whether `path` lies where a shipped sample would be (installed or source tree)."""
    path = Path(path).resolve()
    return any(path.is_relative_to(root) for root in (_PACKAGED, _SOURCE))


def check_exists(path: Path, what: str) -> Path:
    """`path` exists, or one InputError; a missing embedded default says how to name a model."""
    path = Path(path)
    if path.exists():
        return path
    if is_shipped(path):
        raise InputError(f"the embedded default {what} ({path}) is not installed with this copy of "
                         "diffq-toolkit; name your own with --model DIR (a diffusers pipeline folder)")
    raise InputError(f"{what} {path} does not exist")
