"""Where a W8A8 UNet step spends its time on this CPU: an op-level torch.profiler table for the
fp32 UNet and its W8A8 twin (float ops in fp32), same inputs. Backs the kernel issue's note on
why W8A8 is not faster than float here.

    python samples/profile_w8a8.py --model tiny-sd --batch 16 --threads 2
"""
from __future__ import annotations

import argparse
import copy

import torch
from torch.profiler import ProfilerActivity, profile

from diffq import quantize
from diffq.commands.bench import BenchSettings, _calls, _unet_and_inputs
from diffq.integrations.unet import skip_concat_segments


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-sd", help="tiny-sd, sd15 (random weights) or a pipeline dir")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=12)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    unet, x, ctx = _unet_and_inputs(BenchSettings(model=args.model, batch=args.batch))
    q = quantize(copy.deepcopy(unet), "w8a8", calibration=_calls(x, ctx),
                 segments=skip_concat_segments(unet))
    t = torch.tensor(500.0)
    for name, model in (("fp32", unet), ("w8a8", q)):
        model = model.to(memory_format=torch.channels_last)
        xi = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            for _ in range(2):
                model(xi, t, ctx)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    model(xi, t, ctx)
        total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 3 / 1e3
        print(f"\n## {name}: {total:.1f} ms self CPU time per step\n")
        print("| op | self ms / step | share |\n|---|---|---|")
        for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[: args.rows]:
            ms = e.self_cpu_time_total / 3 / 1e3
            print(f"| `{e.key}` | {ms:.2f} | {ms / total:.0%} |")


if __name__ == "__main__":
    main()
