"""`diffq compare`: several schemes on the same prompts and seeds, one table and one grid.

Activation statistics are collected once on the FP denoiser (skip-concat halves kept apart)
and shared by every scheme, so schemes differ only in how they turn statistics into scales.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from diffq.api import ALL, calibrate, convert, load_recipe, plan, plan_mixed, verifiable, weight_bytes
from diffq.assets import shipped
from diffq.commands.evaluate import EvalSettings, check_settings, real_images, score, scorers
from diffq.errors import DiffqError, InputError
from diffq.eval.grid import image_grid
from diffq.eval.report import json_safe
from diffq.integrations.pipeline import (
    VERIFY_BATCH,
    calibration_pass,
    denoiser,
    denoiser_calls,
    denoiser_name,
    denoiser_structure,
    generate,
    load_pipeline,
)
from diffq.integrations.unet import check_groups
from diffq.io import check_at_least, read_prompts, write_text, writing_directory
from diffq.markdown import Markdown

DEFAULT_SCHEMES = ["fp", "q8_0", "naive-w8a8", "w8a8-static", "w8a8"]


@dataclass
class CompareSettings(EvalSettings):
    schemes: list[str] = field(default_factory=lambda: list(DEFAULT_SCHEMES))
    calib_prompts: Path = field(default_factory=lambda: shipped("prompts") / "shapes-calib.txt")
    # as many as `diffq calibrate` uses: with 32, per-timestep-group ranges missed some eval
    # prompts' activations and a few images left the FP trajectory (samples/divergence.py)
    num_prompts: int = 128
    out: Path = Path("out/compare")


def _shared_stats(pipe, recipes, s: CompareSettings, structure, progress: bool) -> tuple[dict, list]:
    """One collection on the FP denoiser covering every static layer of every recipe (an input is
    split by channel segment where any recipe splits it; `convert` unsplits for the others),
    and the calls of the prompt batch that `diffq calibrate` holds back for verification."""
    den = denoiser(pipe)
    plans = [p for p in (plan(den, r, structure=structure) for r in recipes) if p.static]
    if not plans:
        return {}, []
    verifying = any(verifiable(p) for p in plans) and s.num_prompts > s.batch_size
    with calibrate(den, plans, inputs=False) as cal:
        cal.run(_calibration_pass(pipe, s, lambda k: not verifying or k != VERIFY_BATCH), progress)
    if not verifying:
        return cal.activation_stats, []
    with calibrate(den, plans, inputs=False, holdout=ALL) as held:
        held.run(_calibration_pass(pipe, s, lambda k: k == VERIFY_BATCH))
    return cal.activation_stats, held.held


def _calibration_pass(pipe, s: CompareSettings, batches=None):
    """A callable sampling the calibration prompts with whatever denoiser `pipe` holds, with the
    seeds `diffq calibrate --seed SEED` uses, so its statistics are the same."""
    prompts = read_prompts(s.calib_prompts)[: s.num_prompts]
    return calibration_pass(pipe, prompts, s.seed, s.steps, s.guidance, s.batch_size, batches=batches)


def run_compare(s: CompareSettings, progress: bool = True) -> list[dict]:
    prompts = check_settings(s)
    check_at_least("--num-prompts", s.num_prompts)
    if not s.schemes:
        raise InputError("--schemes names no scheme; e.g. --schemes fp,w8a8")
    recipes = {name: load_recipe(name) for name in s.schemes if name != "fp"}
    for r in recipes.values():
        check_groups(r, s.steps)
    seeds = [s.seed + i for i in range(s.num_images)]
    pipe = load_pipeline(s.model, progress=progress, call=s.size)
    fp_den = denoiser(pipe)
    clip_fn, fid_fn, features = scorers(s)
    kw = dict(steps=s.steps, guidance=s.guidance, batch_size=s.batch_size, progress=progress)
    t0 = time.perf_counter()
    fp_imgs = generate(pipe, prompts, seeds, desc="fp", **kw)
    fp_seconds = (time.perf_counter() - t0) / len(prompts)
    real, real_desc = real_images(s, fp_imgs[0].size[0])
    structure = denoiser_structure(pipe, prompts[0], s.seed, s.steps, s.guidance)
    stats, held = _shared_stats(pipe, recipes.values(), s, structure, progress)
    fp_bytes = weight_bytes(fp_den)
    rows, grid_rows = [], []
    for name in s.schemes:
        if name == "fp":
            imgs, secs, wbytes = fp_imgs, fp_seconds, fp_bytes
        else:
            try:
                imgs, secs, wbytes = _scheme_images(pipe, recipes[name], name, s, structure, stats, held,
                                                    prompts, seeds, kw)
            except DiffqError as e:  # this scheme cannot be made for this model: say why, go on
                rows.append({"scheme": name, "error": str(e)})
                continue
        m = score(fp_imgs, imgs, prompts, clip_fn, fid_fn, real)
        rows.append({"scheme": name, **m, "weight_bytes": wbytes,
                     "weight_ratio_bf16": wbytes / fp_bytes, "seconds_per_image": secs})
        grid_rows.append(imgs[:8])
    with writing_directory(s.out, s.overwrite) as tmp:
        meta = {"model": str(s.model), "prompts": str(s.prompts), "num_images": s.num_images,
                "steps": s.steps, "guidance": s.guidance, "seeds": [seeds[0], seeds[-1]],
                "calibration_prompts": s.num_prompts, "features": f"{features}; FID reference: {real_desc}"}
        (tmp / "compare.json").write_text(json.dumps(json_safe({**meta, "rows": rows}), indent=1))
        done = [r["scheme"] for r in rows if "error" not in r]
        image_grid(grid_rows, done, scale=2, captions=prompts[:8]).save(tmp / "grid.png")
        write_text(tmp / "compare.md", str(format_table(rows, meta).image(
            "grid.png", "same prompts and seeds, one row per scheme")))
    return rows


def _scheme_images(pipe, recipe, name: str, s: CompareSettings, structure, stats: dict, held: list,
                   prompts: list[str], seeds: list[int], kw: dict) -> tuple[list, float, int]:
    """Quantize a copy of the denoiser with `recipe` (mixed widths measured on the calibration
    prompts, as calibrate does), sample the prompts with it; (images, seconds per image,
    weight bytes). The pipeline gets its float denoiser back whatever happens."""
    name_den = denoiser_name(pipe)
    fp_den = getattr(pipe, name_den)
    den = copy.deepcopy(fp_den)
    setattr(pipe, name_den, den)  # GPTQ / AWQ read its layer inputs while the pipeline samples
    try:
        if recipe.mixed is not None:
            calls = denoiser_calls(pipe, read_prompts(s.calib_prompts)[: recipe.mixed.prompts], s.steps,
                                   s.guidance, s.seed, recipe.mixed.timesteps)
            recipe = plan_mixed(den, recipe, calls, progress=kw["progress"]).recipe
        p = plan(den, recipe, structure=structure)
        inputs = {}
        if p.needs:
            with calibrate(den, p, activations=False) as cal:
                cal.run(_calibration_pass(pipe, s))
            inputs = cal.input_stats
        convert(den, p, stats, inputs, verify=held if verifiable(p) else None)
        t0 = time.perf_counter()
        imgs = generate(pipe, prompts, seeds, desc=name, **kw)
        return imgs, (time.perf_counter() - t0) / len(prompts), weight_bytes(den)
    finally:
        setattr(pipe, name_den, fp_den)


def format_table(rows: list[dict], meta: dict) -> Markdown:
    md = Markdown().text(f"{meta['num_images']} images, {meta['steps']} steps, guidance {meta['guidance']}, "
                         f"seeds {meta['seeds'][0]}..{meta['seeds'][1]}; features: {meta['features']}")
    return md.table(
        ["scheme", "PSNR dB", "PSNR median / worst (its seed)", "SSIM", "CLIP", "FID",
         "weight bytes (x bf16)", "s / image"],
        [(r["scheme"], f"not run: {r['error']}", *["-"] * 6) if "error" in r else
         (r["scheme"], f"{r['psnr_db']:.2f}", f"{r['psnr_db_median']:.2f} / {r['psnr_db_min']:.2f}"
          + ("" if math.isinf(r["psnr_db_min"]) else f" (seed {meta['seeds'][0] + r['worst_image']})"),
          f"{r['ssim']:.4f}", f"{r['clip_score']:.2f}", f"{r['fid']:.3f}",
          f"{r['weight_bytes']:,} ({r['weight_ratio_bf16']:.3f})", f"{r['seconds_per_image']:.3f}")
         for r in rows])
