"""Peak memory of one `diffq bench` variant, measured in a process of its own.

One process holds one variant: the row is built, turned into that variant in place (no float
copy kept), the calibration calls dropped, one untimed call made (packs and caches built), the
freed heap handed back to the system; then the kernel's peak-RSS mark is reset and one call
runs. The peak is what a user's process running that model needs at its high point: weights,
packed kernels, activations and the runtime; `imports_mib` is the same process after importing
torch, diffusers and transformers, before any model (the part no variant changes). Linux only
(/proc); elsewhere the numbers are None.

    python -m diffq.commands.bench_memory --row tiny-sd --variant w8a8 --batch 2
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import sys
from pathlib import Path

import torch

from diffq.errors import DiffqError

_STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the kernel's high-water mark of resident memory to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    """Collect, then give freed heap back to the system (glibc keeps it otherwise, and the
    peak would count memory the process no longer uses)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(row: str, name: str, batch: int, lora: Path | None = None) -> dict:
    import diffusers  # noqa: F401  (imported before the baseline: the rows use them)
    import transformers  # noqa: F401

    from diffq.commands.bench import BenchSettings, _rows, _with_lora, variant

    _trim()
    imports = _status_kib("VmRSS")
    ((_, wl),) = _rows(BenchSettings(model=row))
    built = wl.build(batch)
    model, dtype = variant(built.model, name, built.calibration, copy_=False)
    if lora is not None:
        model = _with_lora(model, lora)
    fn = built.run(model, dtype)
    built.model, built.calibration = None, []
    with torch.inference_mode():
        fn()
    _trim()
    resident = _status_kib("VmRSS")
    if resident is None or not _reset_peak():
        return {"imports_mib": None, "resident_mib": None, "peak_mib": None}
    with torch.inference_mode():
        fn()
    return {"imports_mib": imports / 1024, "resident_mib": resident / 1024,
            "peak_mib": _status_kib("VmHWM") / 1024}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--row", required=True)
    p.add_argument("--variant", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--threads", type=int)
    p.add_argument("--lora", type=Path)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        print(json.dumps(measure(a.row, a.variant, a.batch, a.lora)))
    except DiffqError as e:  # the one line the parent shows
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
