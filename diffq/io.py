"""Atomic output directories and safe text input: an interrupted run leaves nothing half-written."""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from diffq.errors import CheckpointError, InputError


def atomic_directory(directory: Path, overwrite: bool) -> Path:
    """A fresh temporary sibling of `directory` to write into; publish with `publish`."""
    if directory.exists() and not overwrite:
        raise CheckpointError(f"{directory} already exists; choose another path or overwrite")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def publish(tmp: Path, directory: Path) -> None:
    """Swap the finished temporary directory into place (rename is atomic on one filesystem)."""
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


def check_at_least(option: str, value: int, minimum: int = 1) -> None:
    """A CLI option's integer must be at least `minimum`."""
    if value < minimum:
        raise InputError(f"{option} must be at least {minimum}, got {value}")


def read_text(path: str | Path, what: str = "text file") -> str:
    """A UTF-8 text file with something in it, or one clear InputError naming `what`."""
    path = Path(path)
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
