"""`diffq eval`: FP pipeline vs quantized pipeline on the same prompts and seeds."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffq.api import weight_bytes
from diffq.assets import shipped
from diffq.checkpoint import read_meta
from diffq.commands.settings import SamplingSettings
from diffq.errors import InputError
from diffq.eval import metrics, shapes
from diffq.eval.report import write_eval_report
from diffq.integrations.pipeline import (
    apply_quantized,
    check_pipeline_dir,
    denoiser_name,
    generate,
    load_pipeline,
    quantized_components,
)
from diffq.io import (
    check_at_least,
    check_output,
    read_prompts,
    require_module,
    writing_directory,
)


@dataclass
class EvalSettings(SamplingSettings):
    quantized: Path | None = None
    prompts: Path = field(default_factory=lambda: shipped("prompts") / "shapes-eval.txt")
    num_images: int = 64
    out: Path = Path("out/eval")
    evaluator: Path = field(default_factory=lambda: shipped("tiny-clip"))
    real_images: Path | None = None
    clip_model: Path | None = None
    inception_weights: Path | None = None
    no_verify: bool = False  # skip the per-tensor digest check of the quantized checkpoint


def check_settings(s) -> list[str]:
    """Validate the options shared by eval and compare; returns N prompts (cycled)."""
    check_at_least("--num-images", s.num_images)
    s.check_sampling()
    check_output(s.out, s.overwrite, (s.model, s.quantized, s.prompts,
                                      getattr(s, "calib_prompts", None), s.evaluator, s.real_images,
                                      s.clip_model, s.inception_weights))
    for opt, p in (("--evaluator", s.evaluator), ("--clip-model", s.clip_model),
                   ("--real-images", s.real_images)):
        if p is not None and not Path(p).is_dir():
            raise InputError(f"{opt} directory {p} does not exist")
    check_pipeline_dir(s.model)
    quantized = getattr(s, "quantized", None)
    if quantized is not None:
        quantized_components(quantized)
    if (s.clip_model is None) != (s.inception_weights is None):
        raise InputError("real-model evaluation needs both --clip-model and --inception-weights")
    if s.inception_weights is not None and not Path(s.inception_weights).is_file():
        raise InputError(f"--inception-weights file {s.inception_weights} does not exist")
    if s.inception_weights is not None:
        require_module("torch_fidelity", "Inception FID (--inception-weights)", "fid")
    prompts = read_prompts(s.prompts)
    return [prompts[i % len(prompts)] for i in range(s.num_images)]


def real_images(s, size: int) -> tuple[torch.Tensor, str]:
    if s.real_images is not None:
        from PIL import Image

        files = sorted(p for p in Path(s.real_images).iterdir()
                       if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        if not files:
            raise InputError(f"--real-images {s.real_images} holds no png/jpg/webp images")
        imgs = [Image.open(f).convert("RGB").resize((size, size)) for f in files]
        return shapes.to_tensor(imgs), f"{len(imgs)} images from {s.real_images}"
    n = max(256, s.num_images)
    images, _, _ = shapes.make_dataset("eval", n, seed=1234, size=size)
    return images, f"{n} rendered shapes-eval images"


def scorers(s):
    """(clip_score(images, prompts), fid(real, fake), description)."""
    if s.clip_model is not None:  # with inception_weights: check_settings requires both
        return (lambda im, p: metrics.hf_clip_score(s.clip_model, im, p),
                lambda r, f: metrics.inception_fid(s.inception_weights, r, f),
                f"CLIP {s.clip_model}, Inception {s.inception_weights}")
    from diffq.eval.evaluator import TinyClip

    ev = TinyClip.from_pretrained(s.evaluator)
    return (lambda im, p: metrics.clip_score(ev, im, p), lambda r, f: metrics.fid(ev, r, f),
            f"shipped tiny-clip evaluator ({s.evaluator.name}; valid for the shapes domain only)")


def score(fp_imgs, q_imgs, prompts, clip_fn, fid_fn, real) -> dict:
    """Paired PSNR/SSIM against the FP images, CLIP score and FID of the quantized images; the
    PSNR of every image too (paired comparisons of two runs), and which one is the worst."""
    a, b = shapes.to_tensor(fp_imgs), shapes.to_tensor(q_imgs)
    per_image = metrics.psnr_per_image(b, a)
    return {"psnr_db": metrics.psnr(b, a), "psnr_db_median": float(per_image.median()),
            "psnr_db_min": float(per_image.min()), "worst_image": int(per_image.argmin()),
            "psnr_db_per_image": per_image.tolist(), "ssim": metrics.ssim(b, a),
            "clip_score": clip_fn(b, prompts), "fid": fid_fn(real, b)}


def run_eval(s: EvalSettings, progress: bool = True) -> dict:
    """Generate, score and write report.json / report.md / grid.png into `s.out` (atomic)."""
    prompts = check_settings(s)
    seeds = [s.seed + i for i in range(s.num_images)]
    fp = load_pipeline(s.model, progress=progress, call=s.size)
    qp = load_pipeline(s.model, progress=progress, call=s.size)
    scheme, comps = "fp", [denoiser_name(fp)]
    if s.quantized is not None:
        comps = apply_quantized(qp, s.quantized, verify_hashes=not s.no_verify)
        recipe = read_meta(quantized_components(s.quantized)[comps[0]]).get("recipe") or {}
        scheme = recipe.get("name", "quantized")
    clip_fn, fid_fn, features = scorers(s)
    t0 = time.perf_counter()
    kw = dict(steps=s.steps, guidance=s.guidance, batch_size=s.batch_size, progress=progress)
    fp_imgs = generate(fp, prompts, seeds, desc="FP images", **kw)
    q_imgs = generate(qp, prompts, seeds, desc=f"{scheme} images", **kw)
    gen_s = time.perf_counter() - t0
    a = shapes.to_tensor(fp_imgs)
    real, real_desc = real_images(s, a.shape[-1])
    report = {
        "scheme": scheme, "model": str(s.model), "quantized": str(s.quantized or ""),
        "num_images": s.num_images, "steps": s.steps, "guidance": s.guidance, "seeds": seeds,
        "components": comps,
        "weight_bytes": sum(weight_bytes(getattr(qp, c)) for c in comps),
        "weight_bytes_fp": sum(weight_bytes(getattr(fp, c)) for c in comps),
        "features": f"{features}; FID reference: {real_desc}",
        "generation_seconds": round(gen_s, 2),
        "metrics": {**score(fp_imgs, q_imgs, prompts, clip_fn, fid_fn, real),
                    "clip_score_fp": clip_fn(a, prompts), "fid_fp": fid_fn(real, a)},
    }
    with writing_directory(s.out, s.overwrite) as tmp:
        write_eval_report(tmp, report, fp_imgs, q_imgs, prompts)
    return report
