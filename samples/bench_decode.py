"""Few-row (LLM decode) linear: fp32 and bf16 F.linear against one diffq layer, same inputs,
one run, median of repeated calls, and the kernel the layer ran.

    python samples/bench_decode.py [--in-features 4096] [--out-features N] [--rows 1]
        [--weights int8|int4 [--group 128] | --recipe NAME_OR_YAML] [--threads T]

`--weights`: weight-only int8 per channel or int4 per group (the decode kernels, bf16 rows).
`--recipe`: the weight format and run-time activation quantization of any weight-only or
dynamic-activation recipe (llm-w8a8-smoothquant, llm-w7a8-smoothquant, w8, llm-w4a16-gptq ...),
on fp32 rows. Calibration algorithms (SmoothQuant's smoothing, GPTQ, AWQ) are not run: the
codes are round-to-nearest, the kernel the same.
"""
import argparse
import copy
import sys

import torch
from torch import nn

from diffq.api import load_recipe
from diffq.commands.bench import median_seconds
from diffq.core.recipe import WeightSpec
from diffq.errors import DiffqError
from diffq.nn import QLinear


def median_ms(fn, repeats: int = 50) -> float:
    return median_seconds(fn, repeats, warmup=1) * 1e3


def top_ops(fn, count: int = 3) -> str:
    """The ops a call spends most of its own time in (the profiler's view: which kernel ran)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return ", ".join(e.key for e in events[:count])


def layer_for(lin: nn.Linear, a: argparse.Namespace) -> tuple[QLinear, torch.dtype, str]:
    """(the quantized layer, the dtype of the rows it is timed on, its label)."""
    if a.recipe is None:
        spec = (WeightSpec("int8", "per_channel") if a.weights == "int8"
                else WeightSpec("int4", "per_group", group_size=a.group))
        return QLinear(lin, spec, None).to(torch.bfloat16), torch.bfloat16, f"{a.weights} weight-only"
    r = load_recipe(a.recipe)
    if r.activations is not None and r.activations.mode != "dynamic":
        raise DiffqError(f"recipe {r.name!r} has static activations, which need calibration: time "
                         f"it on a whole model with `diffq bench --schemes {r.name}`")
    return QLinear(lin, r.weights, r.activations), torch.float32, r.name


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--in-features", "--size", type=int, default=4096, dest="k")
    ap.add_argument("--out-features", type=int, default=None, dest="n", help="default: in-features")
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--weights", choices=("int8", "int4"), default="int8")
    ap.add_argument("--group", type=int, default=128, help="int4 group size")
    ap.add_argument("--recipe", default=None, help="a weight-only or dynamic-activation recipe")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    k, n = a.k, a.n or a.k
    torch.manual_seed(0)
    lin = nn.Linear(k, n)
    try:
        q, dtype, label = layer_for(lin, a)
    except DiffqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    x = torch.randn(a.rows, k)
    bf16, xb = copy.deepcopy(lin).to(torch.bfloat16), x.bfloat16()
    xq = x.to(dtype)
    with torch.inference_mode():
        t_fp32, t_bf16 = median_ms(lambda: lin(x)), median_ms(lambda: bf16(xb))
        t_q = median_ms(lambda: q(xq))
        kernels = top_ops(lambda: q(xq))
    faster = min(t_fp32, t_bf16)
    print(f"{a.rows}x{k}x{n}, {torch.get_num_threads()} threads: fp32 {t_fp32:.3f} ms, bf16 "
          f"{t_bf16:.3f} ms, {label} {t_q:.3f} ms on {str(dtype).removeprefix('torch.')} rows "
          f"({faster / t_q:.2f}x the faster float); weight bytes {q.weight_nbytes:,} vs "
          f"{k * n * 2:,} bf16; most time in: {kernels}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
