"""The reference pipeline's text encoder alone at W8A8 (the LLM path's targets for encoders):
embedding cosine vs FP on the eval prompts, and paired image PSNR when only the text encoder is
quantized (same prompts and seeds, 20 steps).

    python samples/text_encoder_w8a8.py --n 64
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import torch

import diffq
from diffq.core.recipe import load_recipe
from diffq.eval.metrics import psnr, psnr_per_image
from diffq.integrations.pipeline import generate, load_pipeline

HERE = Path(__file__).parent


def _ids(tok, prompts):
    return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", default=str(HERE / "tiny-sd"))
    p.add_argument("--recipe", default="w8a8")
    p.add_argument("--n", type=int, default=64)
    args = p.parse_args()
    pipe = load_pipeline(args.pipeline, progress=False)
    pipe.set_progress_bar_config(disable=True)
    calib = (HERE / "prompts" / "shapes-calib.txt").read_text().splitlines()[:128]
    prompts = (HERE / "prompts" / "shapes-eval.txt").read_text().splitlines()[: args.n]
    fp_te = pipe.text_encoder
    q_te = copy.deepcopy(fp_te)
    recipe = load_recipe(args.recipe)
    batches = [{"input_ids": _ids(pipe.tokenizer, calib[i:i + 16])} for i in range(0, len(calib), 16)]
    batches.append({"input_ids": _ids(pipe.tokenizer, [""])})
    diffq.quantize(q_te, recipe.for_text_encoder().with_name(recipe.name), calibration=batches)
    with torch.inference_mode():
        ids = _ids(pipe.tokenizer, prompts)
        a, b = fp_te(ids)[0], q_te(ids)[0]
    cos = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).double()
    seeds = list(range(args.n))
    to_t = lambda imgs: torch.from_numpy(np.stack([np.asarray(i) for i in imgs])).permute(0, 3, 1, 2)  # noqa: E731
    fp = to_t(generate(pipe, prompts, seeds, batch_size=16, progress=False))
    pipe.text_encoder = q_te
    q = to_t(generate(pipe, prompts, seeds, batch_size=16, progress=False))
    per = psnr_per_image(q, fp)
    print(f"recipe {args.recipe}, text encoder only, {args.n} eval prompts, seeds 0..{args.n - 1}")
    print(f"| embedding cosine vs FP (last hidden state, per prompt): mean {cos.mean():.5f}, "
          f"min {cos.min():.5f} |")
    print(f"| image PSNR vs FP: {psnr(q, fp):.2f} dB (median {per.median():.2f}, worst {per.min():.2f}) |")


if __name__ == "__main__":
    main()
