"""The error of int8 attention alone (SageAttention numerics, `attention: {format: int8}`) on a
reference pipeline: the float denoiser with only its attention swapped, against the float
pipeline, same prompts and seeds. One run; paired PSNR over the eval prompts.

    python samples/int8_attention_error.py --model samples/tiny-dit [--n 64]
"""
import argparse

from diffq.assets import shipped
from diffq.core.recipe import AttentionSpec
from diffq.eval.metrics import psnr, psnr_per_image
from diffq.eval.shapes import to_tensor
from diffq.integrations.pipeline import denoiser, generate, load_pipeline
from diffq.io import read_prompts
from diffq.nn.attention import attach_attention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(shipped("tiny-sd")))
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--block-q", type=int, default=128)
    ap.add_argument("--block-k", type=int, default=64)
    a = ap.parse_args()
    pipe = load_pipeline(a.model, progress=False)
    prompts = read_prompts(shipped("prompts") / "shapes-eval.txt")[: a.n]
    kw = dict(steps=a.steps, guidance=a.guidance, batch_size=16, progress=False)
    fp = to_tensor(generate(pipe, prompts, list(range(a.n)), **kw))
    mode = attach_attention(denoiser(pipe), AttentionSpec(block_q=a.block_q, block_k=a.block_k))
    if mode is None:
        raise SystemExit(f"{a.model}: the denoiser has no diffusers attention processor")
    q = to_tensor(generate(pipe, prompts, list(range(a.n)), **kw))
    per = psnr_per_image(q, fp)
    print(f"{a.model}: int8 attention (block_q {a.block_q}, block_k {a.block_k}) alone vs FP, {a.n} images, "
          f"{a.steps} steps: PSNR {psnr(q, fp):.2f} dB, median {float(per.median()):.2f}, worst "
          f"{float(per.min()):.2f}; SDPA calls int8 {mode.calls}, float (masked) {mode.float_calls}")


if __name__ == "__main__":
    main()
