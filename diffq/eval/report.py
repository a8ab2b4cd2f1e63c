"""Write evaluation reports: report.json, report.md and grid.png."""
from __future__ import annotations

import math
from pathlib import Path

from PIL import Image

from diffq.eval.grid import difference, image_grid
from diffq.eval.metrics import psnr_per_image
from diffq.eval.shapes import to_tensor
from diffq.io import write_json, write_text
from diffq.markdown import Markdown, cell


def json_safe(v):
    """v with infinite floats as "inf" (JSON has none; PSNR of identical images), in dicts and
    lists too."""
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, list):
        return [json_safe(x) for x in v]
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
    write_json(out / "report.json", json_safe(report))
    eval_grid(fp_images, q_images, report["scheme"], prompts, max_cols).save(out / "grid.png")
    m = report["metrics"]
    md = Markdown(f"diffq eval: {report['scheme']}").text(
        f"{report['num_images']} images, {report['steps']} steps, guidance {report['guidance']}, "
        f"seeds {report['seeds'][0]}..{report['seeds'][-1]}; model `{report['model']}`.",
        f"Features: {report['features']}.")
    md.table(["metric", "FP", "quantized"], [
        ("weight bytes", report["weight_bytes_fp"],
         f"{report['weight_bytes']:,} ({report['weight_bytes'] / report['weight_bytes_fp']:.3f}x)"),
        ("CLIP score", m["clip_score_fp"], m["clip_score"]),
        ("FID vs real", m["fid_fp"], m["fid"]),
        ("paired PSNR vs FP (dB), whole batch", "-", m["psnr_db"]),
        ("paired PSNR per image: median / worst (its seed)", "-",
         f"{cell(m['psnr_db_median'])} / {cell(m['psnr_db_min'])}"
         + ("" if math.isinf(m["psnr_db_min"]) else f" (seed {report['seeds'][m['worst_image']]})")),
        ("paired SSIM vs FP", "-", m["ssim"]),
    ])
    md.image("grid.png", "FP, quantized and their difference x4, same prompts and seeds: the worst "
             "images by PSNR first")
    write_text(out / "report.md", str(md))
