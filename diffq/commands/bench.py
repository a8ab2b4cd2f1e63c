"""`diffq bench`: FP32 vs bf16 vs quantized, per layer and per denoiser step, in one run.

Times are medians of repeated runs after warm-up, on the same inputs; ratios are against bf16
(the baseline a CPU user would pick). The quantized model keeps its float ops in bf16 and runs
W8A8 layers through the fastest available backend (oneDNN int8 on x86).
"""
from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from diffq.api import quantize, weight_bytes
from diffq.assets import shipped
from diffq.calib.hooks import input_hooks
from diffq.errors import InputError
from diffq.io import check_at_least, read_prompts
from diffq.markdown import Markdown
from diffq.nn.timestep import default_timestep_of, timestep_value

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)  # Stable Diffusion 1.5's published unet/config.json (860 M parameters)


@dataclass
class BenchSettings:
    model: str = "tiny-sd"      # a pipeline directory, "tiny-sd" or "sd15" (random weights)
    recipe: str = "w8a8"
    batch: int = 2              # classifier-free guidance doubles the batch
    repeats: int = 5
    warmup: int = 2
    threads: int | None = None
    out: Path | None = None
    layers: int = 4             # per-layer table: the N layers with the most MACs
    extra: dict = field(default_factory=dict)


def median_seconds(fn, repeats: int, warmup: int) -> float:
    """Median wall time of `fn()` over `repeats` calls after `warmup` calls (inference mode)."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _denoiser_and_calls(s: BenchSettings) -> tuple[nn.Module, list]:
    """The denoiser and 4 of its calls at evenly spaced timesteps: replayed from a pipeline
    sampling ceil(batch / 2) prompts with guidance (UNet or DiT alike), or synthetic for sd15."""
    if s.model == "sd15":
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SD15_UNET).eval()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(s.batch, 4, 64, 64, generator=g)
        ctx = torch.randn(s.batch, 77, 768, generator=g)
        steps = torch.linspace(999, 1, 4).round().tolist()
        return unet, [((torch.randn(x.shape, generator=g), torch.tensor(t)), {"encoder_hidden_states": ctx})
                      for t in steps]
    from diffq.integrations.pipeline import DENOISERS, denoiser, denoiser_calls, load_pipeline

    path = shipped("tiny-sd") if s.model == "tiny-sd" else Path(s.model)
    if not any((path / d / "config.json").is_file() for d in DENOISERS):
        raise InputError(f"{path} has no unet/ or transformer/ to benchmark")
    pipe = load_pipeline(path, progress=False)
    prompts = read_prompts(shipped("prompts") / "shapes-eval.txt")[: (s.batch + 1) // 2]
    calls = denoiser_calls(pipe, prompts, steps=20, guidance=5.0, seed=0, timesteps=4)
    return denoiser(pipe).float().eval(), calls


def _cast(call, dtype: torch.dtype):
    """A call with its activation tensors (2-d and up) in `dtype`, images channels-last;
    timesteps and ids as they were."""
    def one(v):
        if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.dim() < 2:
            return v
        v = v.to(dtype)
        return v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v
    args, kwargs = call
    return tuple(one(a) for a in args), {k: one(v) for k, v in kwargs.items()}


def _layer_inputs(model, call, top: int) -> dict[str, torch.Tensor]:
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


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


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


def run_bench(s: BenchSettings) -> dict:
    for option, value, minimum in (("--batch", s.batch, 1), ("--repeats", s.repeats, 1),
                                   ("--warmup", s.warmup, 0), ("--layers", s.layers, 0)):
        check_at_least(option, value, minimum)
    if s.threads is not None:
        check_at_least("--threads", s.threads)
    with torch_threads(s.threads):
        return _run_bench(s)


def _run_bench(s: BenchSettings) -> dict:
    model, calls = _denoiser_and_calls(s)
    call = calls[len(calls) // 2]
    t = timestep_value(default_timestep_of(*call))
    inputs = _layer_inputs(model, call, s.layers)
    rss0 = _rss()
    bf16 = copy.deepcopy(model).to(torch.bfloat16).to(memory_format=torch.channels_last)
    rss_bf16 = _rss() - rss0

    q = copy.deepcopy(model)
    rss1 = _rss()
    quantize(q, s.recipe, calibration=calls)
    rss_q = _rss() - rss1
    # float ops in fp32 too: on CPUs without AMX, fp32 beats bf16 and is the baseline to beat
    q32 = copy.deepcopy(q).to(memory_format=torch.channels_last)
    q = q.to(torch.bfloat16).to(memory_format=torch.channels_last)
    variants = {
        "fp32": (model, call),
        "bf16": (bf16, _cast(call, torch.bfloat16)),
        "quantized": (q, _cast(call, torch.bfloat16)),
        "quantized_fp32": (q32, _cast(call, torch.float32)),
    }
    step = {}
    for name, (m, (a, kw)) in variants.items():
        step[name] = median_seconds(lambda m=m, a=a, kw=kw: m(*a, **kw), s.repeats, s.warmup)
    layers = []
    for lname, inp in inputs.items():
        row = {"layer": lname, "input": list(inp.shape)}
        for name, (variant, _) in variants.items():
            m = variant.get_submodule(lname)
            dt = torch.float32 if name in ("fp32", "quantized_fp32") else torch.bfloat16
            xi = inp.to(dt)
            if xi.dim() == 4:
                xi = xi.contiguous(memory_format=torch.channels_last)
            clock = getattr(getattr(m, "input_quant", None), "clock", None)
            if clock is not None:
                clock.value = t
            row[name] = median_seconds(lambda: m(xi), s.repeats * 4, s.warmup)
        layers.append(row)
    result = {
        "model": s.model, "recipe": s.recipe, "batch": s.batch, "threads": torch.get_num_threads(),
        "step_seconds": step,
        "step_speedup_vs_bf16": {k: step["bf16"] / v for k, v in step.items()},
        "step_speedup_vs_fp32": {k: step["fp32"] / v for k, v in step.items()},
        "weight_bytes": {"fp32": weight_bytes(model, None), "bf16": weight_bytes(model),
                         "quantized": weight_bytes(q), "quantized_fp32": weight_bytes(q32)},
        "resident_bytes_added": {"bf16": rss_bf16, "quantized": rss_q},
        "layers": layers,
    }
    return result


def format_bench(r: dict) -> str:
    st, wb = r["step_seconds"], r["weight_bytes"]
    sb, sf = r["step_speedup_vs_bf16"], r["step_speedup_vs_fp32"]
    md = Markdown().text(
        f"model {r['model']}, recipe {r['recipe']}, batch {r['batch']}, {r['threads']} threads",
        "(quantized: W8A8 layers on int8 kernels, other ops in bf16; quantized_fp32: in fp32)")
    md.table(["denoiser step", "seconds", "vs bf16", "vs fp32", "weight bytes"],
             [(k, f"{st[k]:.4f}", f"{sb[k]:.2f}x", f"{sf[k]:.2f}x", wb[k]) for k in st])
    md.table(["layer", "input", "fp32 ms", "bf16 ms", "quantized ms", "quantized_fp32 ms"],
             [(row["layer"], row["input"], *(f"{row[k] * 1e3:.3f}" for k in ("fp32", "bf16", "quantized",
                                                                           "quantized_fp32")))
              for row in r["layers"]])
    return str(md).rstrip("\n")
