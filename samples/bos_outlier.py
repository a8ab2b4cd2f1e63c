"""The BOS row of the text states in cross-attention K/V, with and without
`activations.float_prefix: 1` (the row kept out of the static int8 range, multiplied in float).

In SD-class models CLIP's BOS state is the same for every prompt and tens of times larger than
the other tokens, so it alone sets the int8 step of every `attn2.to_k` / `attn2.to_v` input.
tiny-sd's BOS row is constant but not an outlier, so the script also runs a variant whose
text-encoder output has its BOS row scaled by --factor (both FP and quantized see the same
states; the FP images of that variant are the reference). One run, paired PSNR vs FP:

    python samples/bos_outlier.py [--n 32] [--factor 20] [--recipe w8a8]
"""
import argparse
import copy
from dataclasses import replace

import torch

from diffq import quantize
from diffq.assets import shipped
from diffq.core import sqnr_db
from diffq.core.recipe import Override, load_recipe
from diffq.eval.metrics import psnr, psnr_per_image
from diffq.eval.shapes import to_tensor
from diffq.integrations.pipeline import generate, load_pipeline
from diffq.io import read_prompts

KV = ["*attn2.to_k", "*attn2.to_v"]


def with_prefix(recipe, prefix: int):
    """The recipe with its cross-attention K/V inputs' first `prefix` tokens kept float."""
    base = recipe.plan_for("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k")
    act = replace(base.activations, float_prefix=prefix)
    return replace(recipe, name=f"{recipe.name}+prefix{prefix}",
                   overrides=[*recipe.overrides, Override(match=KV, weights=base.weights, activations=act)])


def scale_bos(text_encoder, factor: float):
    def hook(_m, _args, out):
        out[0][:, 0] *= factor
        return out
    return text_encoder.register_forward_hook(hook)


@torch.no_grad()
def kv_sqnr(fp_unet, q_unet, pipe, prompts: list[str]) -> dict:
    """SQNR of every attn2.to_k / to_v output, FP vs quantized, on the same text states (their
    only input, so this is exactly the layers' own error): all tokens, BOS row, the rest."""
    ids = pipe.tokenizer(prompts, padding="max_length", truncation=True,
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    states = pipe.text_encoder(ids)[0]  # BOS row already scaled by `factor` (scale_bos hook)
    names = [n for n, _ in fp_unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))]
    rows = {"all": [], "bos": [], "rest": []}
    for n in names:
        layer = q_unet.get_submodule(n)
        if layer.input_quant.clock is not None:  # text states do not change with t: any group
            layer.input_quant.clock.value = 500.0
        ref, q = fp_unet.get_submodule(n)(states), layer(states)
        for key, sl in (("all", slice(None)), ("bos", slice(0, 1)), ("rest", slice(1, None))):
            rows[key].append(sqnr_db(ref[:, sl], q[:, sl]))
    return {**{k: sum(v) / len(v) for k, v in rows.items()}, "layers": len(names)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--factor", type=float, default=20.0)
    ap.add_argument("--recipe", default="w8a8")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=7.0)
    a = ap.parse_args()
    pipe = load_pipeline(shipped("tiny-sd"), progress=False)
    prompts = read_prompts(shipped("prompts") / "shapes-eval.txt")[: a.n]
    calib = read_prompts(shipped("prompts") / "shapes-calib.txt")[: a.calib]
    seeds = list(range(a.n))
    kw = dict(steps=a.steps, guidance=a.guidance, batch_size=8, progress=False)
    with torch.no_grad():
        ids = pipe.tokenizer(prompts + [""], padding="max_length", truncation=True,
                             max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
        h = pipe.text_encoder(ids)[0]
    row_max = h.abs().amax(-1)
    print(f"tiny-sd text states: BOS row max|x| {float(row_max[:, 0].max()):.2f}, other tokens "
          f"{float(row_max[:, 1:].max()):.2f} (median row {float(row_max[:, 1:].median()):.2f}); "
          f"BOS row identical across prompts: {float((h[:, 0] - h[0, 0]).abs().max()) == 0}")
    fp_unet, recipe = pipe.unet, load_recipe(a.recipe)
    for factor in (1.0, a.factor):
        handle = scale_bos(pipe.text_encoder, factor) if factor != 1.0 else None
        fp = to_tensor(generate(pipe, prompts, seeds, **kw))
        for prefix in (0, 1):
            unet = copy.deepcopy(fp_unet)
            pipe.unet = unet

            def drive():
                gens = [torch.Generator().manual_seed(10_000 + k) for k in range(len(calib))]
                for i in range(0, len(calib), 8):
                    pipe(calib[i:i + 8], num_inference_steps=a.steps, guidance_scale=a.guidance,
                         generator=gens[i:i + 8], output_type="latent")
            quantize(unet, with_prefix(recipe, prefix), calibration=drive)  # skip segments traced
            q = to_tensor(generate(pipe, prompts, seeds, **kw))
            pipe.unet = fp_unet
            kv = kv_sqnr(fp_unet, unet, pipe, calib[:8])
            print(f"BOS x{factor:g}, {a.recipe}, float_prefix {prefix}: cross-attention K/V output "
                  f"SQNR {kv['all']:.2f} dB (BOS row {kv['bos']:.2f}, other tokens {kv['rest']:.2f}; "
                  f"mean of {kv['layers']} layers); images: PSNR vs FP {psnr(q, fp):.2f} dB, median "
                  f"{float(psnr_per_image(q, fp).median()):.2f} ({a.n} images, {a.steps} steps)", flush=True)
        if handle is not None:
            handle.remove()


if __name__ == "__main__":
    main()
