"""Write evaluation reports: report.json, report.md and grid.png."""
from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image

from diffq.eval.grid import difference, image_grid
from diffq.eval.metrics import psnr_per_image
from diffq.eval.shapes import to_tensor


def _fmt(v) -> str:
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.4g}"
    return str(v)


def _json_safe(v):
    if isinstance(v, float) and math.isinf(v):
        return "inf"  # JSON has no infinity; PSNR of identical images
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    return v


def eval_grid(fp_images: list[Image.Image], q_images: list[Image.Image], scheme: str,
              prompts: list[str], max_cols: int = 8) -> Image.Image:
    """FP, quantized and their amplified difference for the worst images by PSNR, then the first
    ones; each column captioned with its index, PSNR and prompt."""
    per_image = psnr_per_image(to_tensor(q_images), to_tensor(fp_images))
    worst = per_image.argsort()[: max_cols // 2].tolist()
    cols = (worst + [i for i in range(len(fp_images)) if i not in worst])[:max_cols]
    captions = [f"#{i} {per_image[i]:.1f} dB: {prompts[i]}" for i in cols]
    rows = [[fp_images[i] for i in cols], [q_images[i] for i in cols],
            [difference(fp_images[i], q_images[i]) for i in cols]]
    return image_grid(rows, ["FP", scheme, "|FP - quantized| x4"], scale=2, captions=captions)


def write_eval_report(out: Path, report: dict, fp_images: list[Image.Image],
                      q_images: list[Image.Image], prompts: list[str], max_cols: int = 8) -> None:
    """report.json (machine), report.md (people) and grid.png (`eval_grid`)."""
    (out / "report.json").write_text(json.dumps(_json_safe(report), indent=1), encoding="utf-8")
    eval_grid(fp_images, q_images, report["scheme"], prompts, max_cols).save(out / "grid.png")
    m = report["metrics"]
    lines = [
        f"# diffq eval: {report['scheme']}",
        "",
        f"{report['num_images']} images, {report['steps']} steps, guidance {report['guidance']}, "
        f"seeds {report['seeds'][0]}..{report['seeds'][-1]}; model `{report['model']}`.",
        f"Features: {report['features']}.",
        "",
        "| metric | FP | quantized |",
        "|---|---|---|",
        f"| weight bytes | {report['weight_bytes_fp']:,} | {report['weight_bytes']:,} "
        f"({report['weight_bytes'] / report['weight_bytes_fp']:.3f}x) |",
        f"| CLIP score | {_fmt(m['clip_score_fp'])} | {_fmt(m['clip_score'])} |",
        f"| FID vs real | {_fmt(m['fid_fp'])} | {_fmt(m['fid'])} |",
        f"| paired PSNR vs FP (dB), whole batch | - | {_fmt(m['psnr_db'])} |",
        f"| paired PSNR per image: median / worst | - | {_fmt(m['psnr_db_median'])} / "
        f"{_fmt(m['psnr_db_min'])} |",
        f"| paired SSIM vs FP | - | {_fmt(m['ssim'])} |",
        "",
        "![FP, quantized and their difference x4, same prompts and seeds: the worst images by "
        "PSNR first](grid.png)",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")
