"""GPTQ vs round-to-nearest on the reference UNet (samples/tiny-sd): for every Linear / Conv2d,
the relative output error ‖(Ŵ − W) X‖² / ‖W X‖² of int4 weights in groups of 64, where X are the
layer inputs of real denoising calls. GPTQ gets Hessians from calibration prompts; the errors are
measured on the inputs of other (held-out) prompts and seeds, so GPTQ cannot win by overfitting.

    python samples/gptq_vs_rtn.py [--prompts 8] [--steps 10] [--clip mse] [--act-order] [--group-size 64]

Prints a Markdown table (one row per layer) and the fraction of layers where GPTQ wins.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from diffq.algos.gptq import gptq
from diffq.algos.hessian import hessian_error
from diffq.assets import shipped
from diffq.calib.hessian import InputCollector, InputStats, hessian_problem
from diffq.core.recipe import GPTQOptions, WeightSpec
from diffq.core.weights import quantize_weight
from diffq.integrations.pipeline import load_pipeline
from diffq.io import read_prompts


def collect(pipe, layers: dict[str, nn.Module], prompts: list[str], seed: int, steps: int,
            guidance: float) -> dict[str, InputStats]:
    """Hessians of every layer over one sampling run of `prompts` (all denoising steps)."""
    collector = InputCollector(layers, hessian=list(layers))
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    with torch.inference_mode(), collector:
        pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
             output_type="latent")
    return collector.stats()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8, help="prompts per set (calibration, held out)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--clip", choices=["none", "mse"], default="mse")
    ap.add_argument("--act-order", action="store_true")
    a = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()

    pipe = load_pipeline(shipped("tiny-sd"), progress=False)
    spec = WeightSpec("int4", "per_group", group_size=a.group_size, clip=a.clip, method="gptq",
                      gptq=GPTQOptions(act_order=a.act_order))
    all_layers = {n: m for n, m in pipe.unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    layers = {n: m for n, m in all_layers.items()
              if hessian_problem(m) is None and m.weight[0].numel() % a.group_size == 0}
    calib = read_prompts(shipped("prompts") / "shapes-calib.txt")[: a.prompts]
    held_out = read_prompts(shipped("prompts") / "shapes-eval.txt")[: a.prompts]
    h_cal = collect(pipe, layers, calib, 0, a.steps, a.guidance)
    h_eval = collect(pipe, layers, held_out, 1000, a.steps, a.guidance)
    t_collect = time.perf_counter() - t0

    rows, wins, wins_in_sample = [], 0, 0
    for name, m in layers.items():
        w = m.weight.detach().float().reshape(m.weight.shape[0], -1)
        h, he = h_cal[name].hessian, h_eval[name].hessian
        d_rtn = quantize_weight(w, spec).dequantize() - w
        d_gptq = gptq(w, h, spec, act_order=a.act_order).dequantize() - w
        ref = float(hessian_error(w, he))
        rtn, gq = float(hessian_error(d_rtn, he)) / ref, float(hessian_error(d_gptq, he)) / ref
        wins += gq < rtn
        wins_in_sample += float(hessian_error(d_gptq, h)) < float(hessian_error(d_rtn, h))
        rows.append((name, tuple(w.shape), rtn, gq))

    print(f"int4 g{a.group_size} (clip {a.clip}{', act_order' if a.act_order else ''}); Hessians from "
          f"{a.prompts} calibration prompts x {a.steps} steps (CFG {a.guidance}), errors on "
          f"{a.prompts} held-out prompts\n")
    print("| layer | O x K | RTN rel. error | GPTQ rel. error | GPTQ / RTN |")
    print("|---|---|---|---|---|")
    for name, (o, k), rtn, gq in rows:
        print(f"| `{name}` | {o} x {k} | {rtn:.2e} | {gq:.2e} | {gq / rtn:.3f} |")
    ratios = torch.tensor([gq / rtn for *_, rtn, gq in rows])
    skipped = sorted(set(all_layers) - set(layers))
    print(f"\nGPTQ wins on {wins} / {len(rows)} layers ({100 * wins / len(rows):.1f} %) held out, "
          f"{wins_in_sample} / {len(rows)} on the calibration inputs; GPTQ / RTN error ratio "
          f"median {ratios.median():.3f}, geometric mean {ratios.log().mean().exp():.3f}, "
          f"worst {ratios.max():.3f}.")
    dims = sorted({all_layers[n].weight[0].numel() for n in skipped})
    print(f"Not measured: {len(skipped)} layers whose reduction dim K ({', '.join(map(str, dims))}) "
          f"is not a multiple of {a.group_size}, e.g. {', '.join(skipped[:3])}.")
    print(f"Time: {t_collect:.0f} s collecting, {time.perf_counter() - t0 - t_collect:.0f} s quantizing.")


if __name__ == "__main__":
    main()
