"""Write evaluation reports: report.json, report.md and grid.png."""
from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image

from diffq.eval.grid import image_grid


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


def write_eval_report(out: Path, report: dict, fp_images: list[Image.Image],
                      q_images: list[Image.Image], max_cols: int = 8) -> None:
    """report.json (machine), report.md (people) and grid.png (row 1: FP, row 2: quantized)."""
    (out / "report.json").write_text(json.dumps(_json_safe(report), indent=1), encoding="utf-8")
    n = min(max_cols, len(fp_images))
    grid = image_grid([fp_images[:n], q_images[:n]], ["FP", report["scheme"]])
    grid.save(out / "grid.png")
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
        "![FP (top) vs quantized (bottom), same prompts and seeds](grid.png)",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")
