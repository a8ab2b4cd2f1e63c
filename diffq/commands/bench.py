"""`diffq bench`: fp32, bf16 and quantized models side by side, one table, ratios vs bf16, fp32
and the fastest float variant.

Rows are the workloads of `diffq.commands.bench_models` (or a pipeline folder); each row times
fp32, bf16 and every scheme asked for (quantized layers on their kernels, float ops in bf16, or
in fp32 on CPUs without native bf16, where bf16 is the slow choice), and with `--compile` every
variant under `torch.compile` too (fp32 included: "vs faster float" is against the fastest
float a user could run, compiled or not). Repeats are interleaved (one call of every variant
per round) so that a machine that slows down slows every column alike; the table shows
medians. For a single denoiser row, a second table times its largest layers alone.
"""
from __future__ import annotations

import contextlib
import copy
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffq.api import quantize, weight_bytes
from diffq.calib.hooks import input_hooks
from diffq.commands.bench_models import DEFAULT_BATCH, WORKLOADS, Built, Workload, pipeline_built
from diffq.core.recipe import load_recipe
from diffq.errors import InputError
from diffq.io import check_at_least
from diffq.markdown import Markdown
from diffq.nn.timestep import default_timestep_of, timestep_value
from diffq.ops import onednn


@dataclass
class BenchSettings:
    model: str = "tiny-sd"      # workload names, comma-separated, "all", or a pipeline folder
    schemes: str | None = None  # recipes, comma-separated (default: each workload's own)
    batch: int | None = None    # denoisers: 2 (guidance); bert: 32; llm-decode: 1
    repeats: int = 5
    warmup: int = 2
    threads: int | None = None
    compile: bool = False       # also every variant under torch.compile (Inductor)
    lora: Path | None = None    # a diffusers LoRA folder loaded on every variant (denoiser rows)
    layers: int = 4             # one denoiser row: also time its N layers with the most MACs
    memory: bool = True         # peak memory of each eager variant, one process each
    out: Path | None = None


def median_seconds(fn, repeats: int, warmup: int) -> float:
    """Median wall time of `fn()` over `repeats` calls after `warmup` calls (inference mode)."""
    return interleaved({"fn": fn}, repeats, warmup)["fn"]


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, float]:
    """Median wall time of each function, `warmup` untimed calls each, then `repeats` rounds
    of one timed call of every function."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        for _ in range(repeats):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to `n` (None: unchanged) while the block runs."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _rows(s: BenchSettings) -> list[tuple[str, Workload]]:
    names = list(WORKLOADS) if s.model == "all" else s.model.split(",")
    if len(names) == 1 and names[0] not in WORKLOADS:
        path = Path(names[0])
        if not path.is_dir():
            raise InputError(f"--model {s.model!r}: not a pipeline folder nor a bench row "
                             f"({', '.join(WORKLOADS)}, all)")
        return [(str(path), Workload(f"{path} denoiser step", "step", ("w8a8",),
                                     lambda b: pipeline_built(path, b)))]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        raise InputError(f"--model: unknown bench rows {', '.join(unknown)} "
                         f"(rows: {', '.join(WORKLOADS)}, all; or one pipeline folder)")
    return [(n, WORKLOADS[n]) for n in names]


def run_bench(s: BenchSettings) -> dict:
    for option, value, minimum in (("--repeats", s.repeats, 1), ("--warmup", s.warmup, 0),
                                   ("--layers", s.layers, 0)):
        check_at_least(option, value, minimum)
    for option, value in (("--batch", s.batch), ("--threads", s.threads)):
        if value is not None:
            check_at_least(option, value)
    rows = _rows(s)
    if s.lora is not None and not (s.lora / "pytorch_lora_weights.safetensors").is_file():
        raise InputError(f"--lora {s.lora}: no pytorch_lora_weights.safetensors there (a folder "
                         "written by diffusers' save_lora_weights)")
    if s.lora is not None and any(wl.unit != "step" for _, wl in rows):
        raise InputError("--lora applies to denoiser rows (tiny-sd, sd15, sd3 or a pipeline folder)")
    schemes = None if s.schemes is None else [x for x in s.schemes.split(",") if x]
    for scheme in schemes or []:
        load_recipe(scheme)  # a bad name fails before any model is built
    with torch_threads(s.threads):
        out = {"threads": torch.get_num_threads(), "rows": [],
               "float_dtype": str(float_dtype()).removeprefix("torch.").replace("bfloat16", "bf16")}
        for name, wl in rows:
            out["rows"].append(_bench_row(name, wl, schemes or list(wl.schemes), s,
                                          layers=s.layers if len(rows) == 1 else 0))
    return out


def _with_lora(model: nn.Module, folder: Path) -> nn.Module:
    """The adapter in `folder` (diffusers' save_lora_weights layout) loaded on a denoiser."""
    prefix = "unet" if type(model).__name__.startswith("UNet") else "transformer"
    model.load_lora_adapter(str(folder), prefix=prefix, adapter_name="bench",
                            weight_name="pytorch_lora_weights.safetensors")
    return model


def float_dtype() -> torch.dtype:
    """The float dtype quantized variants keep their float ops in: bf16 where the CPU has it
    in hardware, else fp32."""
    return torch.bfloat16 if onednn.native_bf16() else torch.float32


def variant(fp: nn.Module, name: str, calibration: list,
            copy_: bool = True) -> tuple[nn.Module, torch.dtype]:
    """The fp32 model `fp` as variant `name` ("fp32", "bf16" or a recipe: float ops in
    `float_dtype()`, images channels-last) and the dtype its inputs take; a copy unless `copy_`
    is false."""
    if name == "fp32":
        return fp, torch.float32
    m = copy.deepcopy(fp) if copy_ else fp
    dtype = torch.bfloat16 if name == "bf16" else float_dtype()
    if name != "bf16":
        m = quantize(m, name, calibration=calibration)
    return m.to(dtype).to(memory_format=torch.channels_last), dtype


def _variants(built: Built, schemes: list[str], compile_: bool,
              lora: Path | None = None) -> dict[str, tuple[nn.Module, torch.dtype]]:
    """fp32, bf16 and each scheme, each with the LoRA adapter when one is given, plus compiled
    twins when asked."""
    out = {k: variant(built.model, k, built.calibration) for k in ("fp32", "bf16", *schemes)}
    if lora is not None:
        out = {f"{k} +lora": (_with_lora(m, lora), dt) for k, (m, dt) in out.items()}
    if compile_:  # fp32 too: on CPUs without native bf16 compiled fp32 is the float to beat
        for name in list(out):
            out[f"{name} +compile"] = (torch.compile(out[name][0]), out[name][1])
    return out


def faster_float(secs: dict[str, float]) -> str:
    """The fastest float variant of a row (fp32 or bf16, eager or compiled, with any adapter):
    what a user who does not quantize would run."""
    return min((k for k in secs if k.startswith(("fp32", "bf16"))), key=secs.__getitem__)


def _bench_row(name: str, wl: Workload, schemes: list[str], s: BenchSettings, layers: int) -> dict:
    batch = s.batch or DEFAULT_BATCH.get(name, 2)
    built = wl.build(batch)
    variants = _variants(built, schemes, s.compile, s.lora)
    fns = {k: built.run(m, dt) for k, (m, dt) in variants.items()}
    secs = interleaved(fns, s.repeats, s.warmup)
    base = next(k for k in secs if k.startswith("bf16"))  # "bf16", or "bf16 +lora"
    fp32 = next(iter(secs))
    faster = faster_float(secs)
    row = {
        "row": name, "label": wl.label, "unit": wl.unit, "batch": batch,
        "seconds_per_unit": {k: v / built.units for k, v in secs.items()},
        "speedup_vs_bf16": {k: secs[base] / v for k, v in secs.items()},
        "speedup_vs_fp32": {k: secs[fp32] / v for k, v in secs.items()},
        "faster_float": faster, "speedup_vs_faster_float": {k: secs[faster] / v for k, v in secs.items()},
        "weight_bytes": {k: weight_bytes(m, None if k.startswith("fp32") else torch.bfloat16)
                         for k, (m, _) in variants.items()},
    }
    if layers and wl.unit == "step":
        row["layers"] = _layer_times(built, variants, layers, s)
    if s.memory:
        del variants, fns, built
        row["peak_mib"] = {k: _peak_mib(name, k, batch, s) for k in secs if not k.endswith("+compile")}
    return row


def _peak_mib(row: str, name: str, batch: int, s: BenchSettings) -> dict | None:
    """Peak resident memory (MiB) of one call of variant `name` in a process holding only it,
    and that process's after its imports (`diffq.commands.bench_memory`); None where it cannot
    be read, with the reason on stderr."""
    cmd = [sys.executable, "-m", "diffq.commands.bench_memory", "--row", row,
           "--variant", name.removesuffix(" +lora"), "--batch", str(batch)]
    cmd += ["--threads", str(s.threads)] if s.threads else []
    cmd += ["--lora", str(s.lora)] if s.lora is not None else []
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"note: peak memory of {row} {name} not measured: {tail}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def _layer_inputs(model: nn.Module, call, top: int) -> dict[str, torch.Tensor]:
    """Inputs of the `top` Linear/Conv2d layers with the most multiply-accumulates."""
    seen: dict[str, tuple[int, torch.Tensor]] = {}

    def make(name, _m):
        def hook(mod, args):
            a = args[0]
            if isinstance(mod, nn.Linear):
                macs = a.numel() // a.shape[-1] * mod.in_features * mod.out_features
            else:
                macs = a.shape[0] * a.shape[-1] * a.shape[-2] * mod.weight.numel()
            if name not in seen or seen[name][0] < macs:
                seen[name] = (macs, a.detach().clone())
        return hook

    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    with input_hooks(layers, make), torch.inference_mode():
        model(*call[0], **call[1])
    best = sorted(seen, key=lambda n: -seen[n][0])[:top]
    return {n: seen[n][1] for n in best}


def _layer_times(built: Built, variants: dict, top: int, s: BenchSettings) -> list[dict]:
    call = built.calibration[len(built.calibration) // 2]
    t = timestep_value(default_timestep_of(*call))
    rows = []
    for lname, inp in _layer_inputs(built.model, call, top).items():
        fns = {}
        for k, (m, dt) in variants.items():
            if k.endswith("+compile"):
                continue
            layer = m.get_submodule(lname)  # with --lora, PEFT's wrapper around the layer
            clock = getattr(getattr(getattr(layer, "base_layer", layer), "input_quant", None), "clock", None)
            if clock is not None:
                clock.value = t
            xi = inp.to(dt)
            xi = xi.contiguous(memory_format=torch.channels_last) if xi.dim() == 4 else xi
            fns[k] = lambda layer=layer, xi=xi: layer(xi)
        rows.append({"layer": lname, "input": list(inp.shape),
                     "seconds": interleaved(fns, s.repeats * 4, s.warmup)})
    return rows


def _mib(m: dict | None) -> str:
    """Peak MiB, and above the process's imports."""
    if not m or m.get("peak_mib") is None:
        return "-"
    return f"{m['peak_mib']:,.0f} ({m['peak_mib'] - m['imports_mib']:+,.0f})"


def _faster(row: dict, k: str) -> str:
    """The speedup against the faster float variant, and which one that is."""
    v = row.get("speedup_vs_faster_float", {}).get(k)
    return "-" if v is None else f"{v:.2f}x ({row['faster_float']})"


def format_bench(r: dict) -> str:
    dtype = r.get("float_dtype", "bf16")
    md = Markdown().text(f"{r['threads']} threads; quantized variants keep their float ops in {dtype}"
                         f"{'' if dtype == 'bf16' else ' (this CPU has no native bf16)'}; 'vs faster "
                         "float': against the fastest float variant on this row (fp32 or bf16, "
                         "compiled or not); medians of "
                         "interleaved repeats; peak MiB: resident "
                         "memory at the high point of one call, in a process holding only that "
                         "variant (eager variants), and in brackets above the same process after "
                         "importing torch, diffusers and transformers")
    table = []
    for row in r["rows"]:
        unit = {"step": "s / step", "token": "ms / token", "batch": "ms / batch"}[row["unit"]]
        mult = 1.0 if row["unit"] == "step" else 1e3
        for k, sec in row["seconds_per_unit"].items():
            table.append((f"{row['row']} (batch {row['batch']})", k, f"{sec * mult:.4g} {unit}",
                          f"{row['speedup_vs_bf16'][k]:.2f}x", f"{row['speedup_vs_fp32'][k]:.2f}x",
                          _faster(row, k), f"{row['weight_bytes'][k]:,}",
                          _mib(row.get("peak_mib", {}).get(k))))
    md.table(["row", "variant", "time", "vs bf16", "vs fp32", "vs faster float", "weight bytes",
              "peak MiB (over imports)"], table)
    for row in r["rows"]:
        if row.get("layers"):
            names = list(row["layers"][0]["seconds"])
            md.text(f"{row['row']}: largest layers alone (ms)")
            md.table(["layer", "input", *names],
                     [(lr["layer"], lr["input"], *(f"{lr['seconds'][k] * 1e3:.3f}" for k in names))
                      for lr in row["layers"]])
    md.bullets(f"{row['row']}: {row['label']}" for row in r["rows"])
    return str(md).rstrip("\n")
