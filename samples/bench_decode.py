"""Batch-1 (LLM decode) linear: bf16 F.linear vs diffq w8 weight-only (int8 decode kernel),
same inputs, one run, median of repeated calls.

    python samples/bench_decode.py [--size 4096] [--rows 1]
"""
import argparse

import torch
from torch import nn

from diffq.core.recipe import WeightSpec
from diffq.integrations.bench import median_seconds
from diffq.nn import QLinear


def median_ms(fn, repeats: int = 50) -> float:
    return median_seconds(fn, repeats, warmup=1) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=1)
    a = ap.parse_args()
    torch.manual_seed(0)
    lin = nn.Linear(a.size, a.size)
    q = QLinear(lin, WeightSpec("int8", "per_channel"), None).to(torch.bfloat16)
    bf16 = lin.to(torch.bfloat16)
    x = torch.randn(a.rows, a.size, dtype=torch.bfloat16)
    t_bf16, t_q = median_ms(lambda: bf16(x)), median_ms(lambda: q(x))
    print(f"{a.rows}x{a.size}x{a.size}: bf16 {t_bf16:.3f} ms, w8 weight-only {t_q:.3f} ms, "
          f"{t_bf16 / t_q:.2f}x; weight bytes {q.weight_nbytes:,} vs {a.size * a.size * 2:,}")


if __name__ == "__main__":
    main()
