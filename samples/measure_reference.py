"""Measure the reference world: evaluator accuracy and a reference pipeline's sample quality
(tiny-sd, or the tiny DiT with --pipeline samples/tiny-dit).

    python samples/measure_reference.py --n 256 --grid /tmp/tiny-sd-grid.png

Prints a markdown table (copied into samples/REFERENCE.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import tiny_dit_parts
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from tiny_sd_parts import assemble, build_text_encoder, build_unet, build_vae, eval_set

from diffq.eval.evaluator import TinyClip
from diffq.eval.grid import image_grid
from diffq.eval.metrics import caption_retrieval_top1, clip_score, fid
from diffq.eval.shapes import render, sample_scenes, to_tensor
from diffq.integrations.pipeline import sampling_kwargs

HERE = Path(__file__).parent


def generate(pipe: DiffusionPipeline, prompts: list[str], steps: int, guidance: float,
             batch: int) -> torch.Tensor:
    """Float images [N, 3, 64, 64] in [0, 1]; prompt i is sampled with seed i."""
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        gens = [torch.Generator().manual_seed(i + j) for j in range(len(chunk))]
        imgs = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
                    generator=gens, output_type="np", **sampling_kwargs(pipe)).images
        out.append(torch.from_numpy(np.asarray(imgs)).permute(0, 3, 1, 2).float())
    return torch.cat(out)


def untrained_like(pipe: DiffusionPipeline, seed: int) -> DiffusionPipeline:
    """Same architecture, tokenizer and scheduler, freshly initialized weights."""
    torch.manual_seed(seed)
    if getattr(pipe, "transformer", None) is not None:
        return tiny_dit_parts.assemble(build_vae(), tiny_dit_parts.build_text_encoder(len(pipe.tokenizer)),
                                       pipe.tokenizer, tiny_dit_parts.build_transformer())
    return assemble(build_vae(), build_text_encoder(len(pipe.tokenizer)), pipe.tokenizer, build_unet())


def to_pil(image: torch.Tensor) -> Image.Image:
    """PIL image of a float image [3, H, W] in [0, 1]."""
    return Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", default=str(HERE / "tiny-sd"))
    p.add_argument("--evaluator", default=str(HERE / "tiny-clip"))
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--skip-untrained", action="store_true")
    p.add_argument("--grid", help="write a PNG grid of real vs generated samples here")
    args = p.parse_args()
    torch.set_num_threads(2)

    real, prompts = eval_set(args.n)
    listed = (HERE / "prompts" / "shapes-eval.txt").read_text().splitlines()[: args.n]
    if listed != prompts:
        raise RuntimeError("shapes-eval.txt is stale; rerun samples/make_shape_prompts.py")
    evaluator = TinyClip.from_pretrained(args.evaluator)
    pipe = DiffusionPipeline.from_pretrained(args.pipeline, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)

    rows = [("evaluator top-1, real eval images", caption_retrieval_top1(evaluator, real, prompts))]
    rows.append(("CLIP score, real eval images", clip_score(evaluator, real, prompts)))
    other = to_tensor([render(s) for s in sample_scenes("eval", args.n, seed=1)]).float() / 255
    rows.append(("FID real vs other real eval images (floor)", fid(evaluator, real, other)))

    t0 = time.perf_counter()
    fake = generate(pipe, prompts, args.steps, args.guidance, args.batch)
    per_image = (time.perf_counter() - t0) / args.n
    rows += [
        ("FP pipeline caption-retrieval top-1", caption_retrieval_top1(evaluator, fake, prompts)),
        ("FP pipeline CLIP score", clip_score(evaluator, fake, prompts)),
        ("FID FP samples vs real eval images", fid(evaluator, real, fake)),
        (f"sampling time per image (s, batch {args.batch}, CFG)", per_image),
    ]
    t0 = time.perf_counter()
    generate(pipe, prompts[:1], args.steps, args.guidance, 1)
    rows.append(("sampling time, one image alone (s)", time.perf_counter() - t0))
    if not args.skip_untrained:
        rand = untrained_like(pipe, seed=0)
        rand.set_progress_bar_config(disable=True)
        noise = generate(rand, prompts, args.steps, args.guidance, args.batch).nan_to_num(0.5)
        rows.append(("FID untrained pipeline vs real eval images", fid(evaluator, real, noise)))
        rows.append(("untrained pipeline caption-retrieval top-1",
                     caption_retrieval_top1(evaluator, noise, prompts)))
    rows.append(("pipeline folder size (MB)", folder_mb(Path(args.pipeline))))

    print(f"n={args.n}, steps={args.steps}, guidance={args.guidance}, seeds 0..{args.n - 1}\n")
    print("| metric | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.4g} |")
    if args.grid:
        k = 12
        image_grid([[to_pil(x) for x in real[:k]], [to_pil(x) for x in fake[:k]],
                    [to_pil(x) for x in real[k : 2 * k]], [to_pil(x) for x in fake[k : 2 * k]]],
                   labels=["real", "generated", "real", "generated"], scale=2).save(args.grid)


if __name__ == "__main__":
    main()
