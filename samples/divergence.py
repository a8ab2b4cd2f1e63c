"""Where do quantized samples leave the FP trajectory? Per-image PSNR over the eval prompts,
then, for the worst image: the relative latent error after every denoising step, which static
activation ranges clip its activations (layer, timestep), and how much of the PSNR comes back
when one of those layers alone runs with float activations.

    python samples/divergence.py --quantized out/tiny-sd-w8a8 [--num-images 64]
"""
import argparse
import sys
from collections import defaultdict

import torch

from diffq.assets import shipped
from diffq.errors import DiffqError
from diffq.eval import metrics, shapes
from diffq.integrations.pipeline import apply_quantized, generate, load_pipeline
from diffq.io import read_prompts
from diffq.nn.base import QuantizedLayer


def latents_per_step(pipe, prompt: str, seed: int, steps: int, guidance: float) -> list:
    seen = []

    def grab(_pipe, i, t, kw):
        seen.append((int(t), kw["latents"].clone()))
        return kw

    pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
         generator=torch.Generator().manual_seed(seed), callback_on_step_end=grab)
    return seen


def static_layers(unet) -> dict[str, QuantizedLayer]:
    return {n: m for n, m in unet.named_modules() if isinstance(m, QuantizedLayer)
            and m.input_quant is not None and m.input_quant.spec.mode == "static"}


def clipping(pipe, prompt: str, seed: int, steps: int, guidance: float) -> dict:
    """(layer, timestep or "all") -> (fraction of inputs beyond the static range, clipped energy / energy)."""
    seen: dict = defaultdict(lambda: [0.0, 0.0, 0.0, 0])

    def hook(name):
        def pre(m, args):
            aq = m.input_quant
            x = m.scale_input(args[0]).float()
            if aq.spec.float_prefix and x.dim() == 3:
                x = x[:, aq.spec.float_prefix:]
            p = aq.params()
            shape = [1] * x.dim()
            shape[p.feature_axis] = -1
            limit = (p.scale.float() * p.fmt.qmax).reshape(shape)
            over = (x.abs() - limit).clamp(min=0)
            # one timestep group (K = 1): no clock; the range is the same at every step
            r = seen[(name, "all" if aq.clock is None else int(aq.clock.value))]
            r[0] += float((over > 0).float().mean())
            r[1] += float(over.pow(2).sum())
            r[2] += float(x.pow(2).sum())
            r[3] += 1
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in static_layers(pipe.unet).items()]
    try:
        pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
             generator=torch.Generator().manual_seed(seed))
    finally:
        for h in handles:
            h.remove()
    return {k: (f / n, e / max(tot, 1e-30)) for k, (f, e, tot, n) in seen.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quantized", required=True)
    ap.add_argument("--num-images", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--top", type=int, default=10, help="(layer, timestep) pairs to list")
    a = ap.parse_args()
    prompts = read_prompts(shipped("prompts") / "shapes-eval.txt")[: a.num_images]
    seeds = list(range(len(prompts)))
    fp = load_pipeline(shipped("tiny-sd"), progress=False)
    q = load_pipeline(shipped("tiny-sd"), progress=False)
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

    with torch.inference_mode():
        clip = clipping(q, prompts[worst], seeds[worst], a.steps, a.guidance)
    top = sorted(clip.items(), key=lambda kv: -kv[1][1])[: a.top]
    print(f"\nlargest clipped energy (input beyond the static range), worst image, top {a.top}:")
    print("layer  timestep  clipped fraction  clipped energy / energy")
    for (name, t), (frac, energy) in top:
        print(f"{name}  {t}  {frac:.2e}  {energy:.2e}")

    # Attribution: the worst image again with one layer's activations in float.
    fp_img = shapes.to_tensor(generate(fp, [prompts[worst]], [seeds[worst]], **kw))
    layers = static_layers(q.unet)
    print("\nworst image PSNR with one layer's activations in float (the others as quantized):")
    for name in dict.fromkeys(n for (n, _), _ in top):
        aq, layers[name].input_quant = layers[name].input_quant, None
        img = shapes.to_tensor(generate(q, [prompts[worst]], [seeds[worst]], **kw))
        layers[name].input_quant = aq
        print(f"{name}: {float(per[worst]):.2f} -> {float(metrics.psnr_per_image(img, fp_img)[0]):.2f} dB")


if __name__ == "__main__":
    try:
        main()
    except DiffqError as e:  # a missing or foreign --quantized directory: one line, exit 2
        print(f"divergence.py: error: {e}", file=sys.stderr)
        sys.exit(2)
