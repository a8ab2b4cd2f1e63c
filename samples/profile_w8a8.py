"""Where a quantized model's time goes on this CPU: an op-level torch.profiler table for the
bf16 model and its quantized twin (float ops in bf16), on the same call as `diffq bench`.

    python samples/profile_w8a8.py --model tiny-sd --scheme w8a8 --threads 2
    python samples/profile_w8a8.py --model bert --scheme llm-w8a8-smoothquant
"""
from __future__ import annotations

import argparse
import copy

import torch
from torch.profiler import ProfilerActivity, profile

from diffq import quantize
from diffq.commands.bench_models import DEFAULT_BATCH, WORKLOADS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-sd", choices=list(WORKLOADS))
    p.add_argument("--scheme", default=None, help="recipe (default: the row's first)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=14)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    wl = WORKLOADS[args.model]
    built = wl.build(args.batch or DEFAULT_BATCH.get(args.model, 2))
    scheme = args.scheme or wl.schemes[0]
    q = quantize(copy.deepcopy(built.model), scheme, calibration=built.calibration)
    bf16 = copy.deepcopy(built.model)
    for name, model in (("bf16", bf16), (scheme, q)):
        model = model.to(torch.bfloat16).to(memory_format=torch.channels_last)
        fn = built.run(model, torch.bfloat16)
        with torch.inference_mode():
            for _ in range(2):
                fn()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    fn()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / 3 / 1e3
        print(f"\n## {name}: {total:.1f} ms self CPU time per call\n")
        print("| op | calls | self ms / call | share |\n|---|---|---|---|")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.rows]:
            ms = e.self_cpu_time_total / 3 / 1e3
            print(f"| `{e.key}` | {e.count // 3} | {ms:.2f} | {ms / total:.0%} |")


if __name__ == "__main__":
    main()
