"""Does a LoRA adapter's effect survive diffq's W8A8 quantization of the tiny-sd UNet?

Loads the shipped tiny-sd pipeline twice, (a) in float and (b) with its UNet quantized by
`diffq.quantize(pipe.unet, "w8a8", calibration=drive)` (drive samples 16 prompts of
samples/prompts/shapes-calib.txt, seed 0 + i, 20 steps, guidance 5), then loads the
"circles become squares" adapter (samples/train_tiny_lora.py) on both. For N held-out prompts
(eval-split scenes with a circle, caption template 0; seed i for prompt i, 20 steps, guidance 5)
it samples four sets, FP, FP+LoRA, W8A8, W8A8+LoRA, and reports
- paired PSNR of W8A8+LoRA vs FP+LoRA and of W8A8 vs FP (mean / median / worst image);
- the concept rate of each set: the share of images the shipped tiny-clip evaluator matches
  better with the caption whose "circle" reads "square" than with the caption itself.

    python samples/lora_quality.py                       # ~1 min on 2 CPU cores
    python samples/lora_quality.py --lora DIR --out /tmp/lora-quality --n 32

Writes report.md (the table) and grid.png (rows FP, FP+LoRA, W8A8, W8A8+LoRA; first 8 prompts).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image, ImageDraw

import diffq
from diffq.assets import shipped
from diffq.eval.evaluator import TinyClip
from diffq.eval.metrics import psnr_per_image
from diffq.eval.shapes import caption, sample_scenes, to_tensor
from diffq.integrations.pipeline import calibration_pass, generate

HERE = Path(__file__).resolve().parent
ADAPTER = "squares"
SETS = ("FP", "FP+LoRA", "W8A8", "W8A8+LoRA")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(shipped("tiny-sd")))
    p.add_argument("--lora", default=str(HERE / "tiny-sd-lora-squares"))
    p.add_argument("--evaluator", default=str(shipped("tiny-clip")))
    p.add_argument("--calib-prompts", default=str(shipped("prompts") / "shapes-calib.txt"))
    p.add_argument("--n-calib", type=int, default=16)
    p.add_argument("--n", type=int, default=32, help="held-out prompts")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="/tmp/lora-quality")
    return p.parse_args()


def held_out_prompts(n: int) -> list[str]:
    """Captions (template 0) of the first n eval-split scenes that hold a circle."""
    scenes = [s for s in sample_scenes("eval", 20 * n, seed=0) if any(o.shape == "circle" for o in s.objects)]
    return [caption(s, 0) for s in scenes[:n]]


def load(model: str) -> DiffusionPipeline:
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, prompts: list[str], args: argparse.Namespace, desc: str) -> torch.Tensor:
    images = generate(pipe, prompts, list(range(len(prompts))), steps=args.steps, guidance=args.guidance,
                      progress=False, desc=desc)
    return to_tensor(images).float() / 255


@torch.no_grad()
def concept_rate(evaluator: TinyClip, images: torch.Tensor, prompts: list[str]) -> float:
    """Share of images closer to the caption with "circle" -> "square" than to the caption."""
    img = evaluator.encode_image(images)
    orig = (img * evaluator.encode_text(prompts)).sum(-1)
    swapped = (img * evaluator.encode_text([p.replace("circle", "square") for p in prompts])).sum(-1)
    return float((swapped > orig).float().mean())


def psnr_cells(images: torch.Tensor | None, reference: torch.Tensor | None) -> list[str]:
    if images is None or reference is None:
        return ["-", "-", "-"]
    v = psnr_per_image(images, reference)
    finite = v[torch.isfinite(v)]
    mean = f"{finite.mean():.2f}" if len(finite) else "inf"
    return [mean + ("" if len(finite) == len(v) else f" ({len(v) - len(finite)} identical)"),
            f"{v.median():.2f}", f"{v.min():.2f} (prompt {int(v.argmin())})"]


def grid(sets: dict[str, torch.Tensor | None], k: int, path: Path) -> None:
    """Rows = sets, columns = the first k prompts; a blank row for a set that was not sampled."""
    side, label = 64, 72
    img = Image.new("RGB", (label + k * side, len(sets) * side), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for r, (name, images) in enumerate(sets.items()):
        draw.text((4, r * side + side // 2 - 5), name, fill=(0, 0, 0))
        if images is None:
            continue
        for c in range(min(k, len(images))):
            arr = (images[c].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            img.paste(Image.fromarray(arr), (label + c * side, r * side))
    img.save(path)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    np.random.seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = held_out_prompts(args.n)
    t0 = time.time()
    sets: dict[str, torch.Tensor | None] = dict.fromkeys(SETS)

    fp = load(args.model)
    sets["FP"] = sample(fp, prompts, args, "FP")
    fp.load_lora_weights(args.lora, adapter_name=ADAPTER)
    sets["FP+LoRA"] = sample(fp, prompts, args, "FP+LoRA")
    print(f"float sets sampled, {time.time() - t0:.0f}s", flush=True)

    q = load(args.model)
    calib = [line.strip() for line in Path(args.calib_prompts).read_text().splitlines() if line.strip()]
    drive = calibration_pass(q, calib[:args.n_calib], seed=0, steps=args.steps, guidance=args.guidance,
                             batch_size=8)
    diffq.quantize(q.unet, "w8a8", calibration=drive)
    print(q.unet.diffq.report.summary(), flush=True)
    print(f"UNet quantized (w8a8, {args.n_calib} calibration prompts), {time.time() - t0:.0f}s", flush=True)
    sets["W8A8"] = sample(q, prompts, args, "W8A8")
    q.load_lora_weights(args.lora, adapter_name=ADAPTER)
    to_q = q.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    print(f"adapted layer: {type(to_q).__name__} over {type(to_q.base_layer).__name__}", flush=True)
    sets["W8A8+LoRA"] = sample(q, prompts, args, "W8A8+LoRA")
    print(f"quantized sets sampled, {time.time() - t0:.0f}s", flush=True)

    evaluator = TinyClip.from_pretrained(args.evaluator)
    rates = {name: (math.nan if imgs is None else concept_rate(evaluator, imgs, prompts))
             for name, imgs in sets.items()}
    lines = [
        f"LoRA `{args.lora}` on tiny-sd, {len(prompts)} held-out prompts (eval scenes with a circle, "
        f"template 0), seed i for prompt i, {args.steps} steps, guidance {args.guidance}; W8A8 = "
        f"diffq.quantize(unet, \"w8a8\") calibrated on {args.n_calib} prompts of shapes-calib.txt.",
        "",
        "| set | concept rate (evaluator prefers \"square\" caption) |",
        "|---|---|",
        *[f"| {name} | {'-' if math.isnan(r) else f'{r:.3f}'} |" for name, r in rates.items()],
        "",
        "| paired PSNR (dB) | mean | median | worst |",
        "|---|---|---|---|",
        "| W8A8+LoRA vs FP+LoRA | " + " | ".join(psnr_cells(sets["W8A8+LoRA"], sets["FP+LoRA"])) + " |",
        "| W8A8 vs FP | " + " | ".join(psnr_cells(sets["W8A8"], sets["FP"])) + " |",
        "| FP+LoRA vs FP (the adapter's own change) | "
        + " | ".join(psnr_cells(sets["FP+LoRA"], sets["FP"])) + " |",
    ]
    table = "\n".join(lines) + "\n"
    print(table, flush=True)
    (out / "report.md").write_text(table, encoding="utf-8")
    grid(sets, 8, out / "grid.png")
    print(f"wrote {out / 'report.md'} and {out / 'grid.png'} ({time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
