"""Where do quantized samples leave the FP trajectory? Per-image PSNR over the eval prompts,
then, for the worst image, the relative latent error after every denoising step.

    python samples/divergence.py --quantized out/tiny-sd-w8a8 [--num-images 64]
"""
import argparse

import torch

from diffq.eval import metrics, shapes
from diffq.integrations.pipeline import (
    SAMPLES_DIR,
    apply_quantized,
    default_model_dir,
    generate,
    load_pipeline,
)
from diffq.io import read_prompts


def latents_per_step(pipe, prompt: str, seed: int, steps: int, guidance: float) -> list:
    seen = []

    def grab(_pipe, i, t, kw):
        seen.append((int(t), kw["latents"].clone()))
        return kw

    pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
         generator=torch.Generator().manual_seed(seed), callback_on_step_end=grab)
    return seen


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quantized", required=True)
    ap.add_argument("--num-images", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=5.0)
    a = ap.parse_args()
    prompts = read_prompts(SAMPLES_DIR / "prompts" / "shapes-eval.txt")[: a.num_images]
    seeds = list(range(len(prompts)))
    fp = load_pipeline(default_model_dir(), progress=False)
    q = load_pipeline(default_model_dir(), progress=False)
    apply_quantized(q, a.quantized)
    kw = dict(steps=a.steps, guidance=a.guidance, progress=False)
    per = metrics.psnr_per_image(shapes.to_tensor(generate(q, prompts, seeds, **kw)),
                                 shapes.to_tensor(generate(fp, prompts, seeds, **kw)))
    order = per.argsort()
    worst5 = ", ".join(f"#{int(i)} {float(per[i]):.1f}" for i in order[:5])
    print(f"per-image PSNR dB: median {float(per.median()):.2f}, worst five {worst5}")
    print(f"images below 25 dB: {int((per < 25).sum())} of {len(per)}")
    worst = int(order[0])
    print(f"worst image #{worst}: {prompts[worst]!r}")
    with torch.inference_mode():
        ref = latents_per_step(fp, prompts[worst], seeds[worst], a.steps, a.guidance)
        got = latents_per_step(q, prompts[worst], seeds[worst], a.steps, a.guidance)
    print("step  timestep  relative latent error")
    for i, ((t, x), (_, y)) in enumerate(zip(ref, got, strict=True)):
        print(f"{i:4d}  {t:8d}  {float((y - x).norm() / x.norm()):.4f}")


if __name__ == "__main__":
    main()
