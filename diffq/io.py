"""Atomic output directories and safe text input: an interrupted run leaves nothing half-written."""
from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from diffq._version import __version__
from diffq.errors import CheckpointError, InputError

OUTPUT_MARKER = "diffq-output.json"  # written into every directory diffq publishes
# what diffq wrote before the marker existed: still ours to replace
_LEGACY_OUTPUT_FILES = ("report.json", "eval.json", "compare.md", "diffq.json")


def is_diffq_output(directory: Path) -> bool:
    """Whether `directory` is something diffq wrote (its marker, or an older diffq's report)."""
    return any((directory / f).is_file() for f in (OUTPUT_MARKER, *_LEGACY_OUTPUT_FILES))


def check_output(directory: str | Path, overwrite: bool, inputs=()) -> Path:
    """Refuse, before any work, an output path whose publishing could destroy what is not ours:
    an existing file, the current directory or one above it, a folder holding an input (or the
    input itself), an existing folder without --overwrite, or --overwrite of a folder diffq did
    not write."""
    directory = Path(directory)
    where = directory.resolve()
    if directory.exists() and not directory.is_dir():
        raise InputError(f"output {directory} is a file; name a directory to write")
    if where == Path.cwd().resolve() or where in Path.cwd().resolve().parents:
        raise InputError(f"output {directory} is the current directory or holds it; name a new "
                         "folder inside it instead")
    for p in inputs:
        if p is not None and (Path(p).resolve() == where or where in Path(p).resolve().parents):
            raise InputError(f"output {directory} holds the input {p}; write somewhere else")
    if directory.exists():
        if not overwrite:
            raise InputError(f"output directory {directory} exists; pass --overwrite or choose another")
        if not is_diffq_output(directory):
            raise InputError(f"output directory {directory} exists and was not written by diffq (no "
                             f"{OUTPUT_MARKER}); --overwrite replaces only diffq's own outputs")
    return directory


def atomic_directory(directory: Path, overwrite: bool) -> Path:
    """A fresh temporary sibling of `directory` to write into; publish with `publish`."""
    try:
        check_output(directory, overwrite)
    except InputError as e:
        raise CheckpointError(str(e)) from None
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / OUTPUT_MARKER).write_text(json.dumps({"written_by": "diffq-toolkit", "version": __version__}))
    return tmp


def publish(tmp: Path, directory: Path) -> None:
    """Swap the finished temporary directory into place (rename is atomic on one filesystem).
    Every file gets the mode of a file written here normally (safetensors writes 0600)."""
    mode = (tmp / OUTPUT_MARKER).stat().st_mode & 0o777 if (tmp / OUTPUT_MARKER).is_file() else 0o644
    for f in tmp.rglob("*"):
        if f.is_file() and not f.is_symlink():
            f.chmod(mode)
    old = None
    if directory.exists():
        old = directory.parent / f".{directory.name}.old-{os.getpid()}"
        directory.rename(old)
    tmp.rename(directory)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def writing_directory(directory: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """`with writing_directory(out) as tmp:` write into tmp; published only if the block ends well."""
    directory = Path(directory)
    tmp = atomic_directory(directory, overwrite)
    try:
        yield tmp
        publish(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: Path, text: str) -> None:
    """A UTF-8 text file replaced atomically (written beside it, then renamed)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, value) -> None:
    write_text(path, json.dumps(value, indent=1))


def require_module(module: str, feature: str, extra: str) -> None:
    """Fail in one line, before any work, when an optional feature's package is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise InputError(f"{feature} needs the '{extra}' extra: pip install 'diffq-toolkit[{extra}]'")


def check_finite(option: str, value: float) -> None:
    """A CLI option's float must be a finite number (argparse's float() accepts nan and inf)."""
    if not math.isfinite(value):
        raise InputError(f"{option} must be a finite number, got {value}")


def check_at_least(option: str, value: int, minimum: int = 1) -> None:
    """A CLI option's integer must be at least `minimum`."""
    if value < minimum:
        raise InputError(f"{option} must be at least {minimum}, got {value}")


def read_text(path: str | Path, what: str = "text file") -> str:
    """A UTF-8 text file with something in it, or one clear InputError naming `what`."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path} is a directory, not a file")
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{what} {path} is not UTF-8 text") from None
    if not text.strip():
        raise InputError(f"{what} {path} is empty: no text, or only blank lines (no prompts)")
    return text


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-blank line of a UTF-8 text file."""
    text = read_text(path, "prompt file")
    return [line.strip() for line in text.splitlines() if line.strip()]
