"""Batch-1 (LLM decode) linear: bf16 F.linear vs diffq weight-only int8 (int8 decode kernel) or
int4 per group (int4 decode kernel), same inputs, one run, median of repeated calls.

    python samples/bench_decode.py [--size 4096] [--rows 1] [--weights int8|int4] [--group 128]
"""
import argparse

import torch
from torch import nn

from diffq.commands.bench import median_seconds
from diffq.core.recipe import WeightSpec
from diffq.nn import QLinear


def median_ms(fn, repeats: int = 50) -> float:
    return median_seconds(fn, repeats, warmup=1) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--weights", choices=("int8", "int4"), default="int8")
    ap.add_argument("--group", type=int, default=128, help="int4 group size")
    a = ap.parse_args()
    torch.manual_seed(0)
    lin = nn.Linear(a.size, a.size)
    spec = (WeightSpec("int8", "per_channel") if a.weights == "int8"
            else WeightSpec("int4", "per_group", group_size=a.group))
    q = QLinear(lin, spec, None).to(torch.bfloat16)
    bf16 = lin.to(torch.bfloat16)
    x = torch.randn(a.rows, a.size, dtype=torch.bfloat16)
    t_bf16, t_q = median_ms(lambda: bf16(x)), median_ms(lambda: q(x))
    print(f"{a.rows}x{a.size}x{a.size}: bf16 {t_bf16:.3f} ms, {a.weights} weight-only {t_q:.3f} ms, "
          f"{t_bf16 / t_q:.2f}x; weight bytes {q.weight_nbytes:,} vs {a.size * a.size * 2:,}")


if __name__ == "__main__":
    main()
