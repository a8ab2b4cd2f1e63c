"""Image metrics for comparing a quantized pipeline with its float reference.

Images are float tensors [B, 3, H, W] in [0, 1] (uint8 [0, 255] is accepted and rescaled).
Paired metrics compare image i of one batch with image i of the other.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance

from diffq.eval.evaluator import FeatureExtractor, TinyClip

_CHUNK = 256


def as_float_images(images: torch.Tensor) -> torch.Tensor:
    """float32 [B, 3, H, W] in [0, 1] from float or uint8 images."""
    if images.dtype == torch.uint8:
        return images.float() / 255
    return images.float()


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"paired metrics need two [B, C, H, W] batches of one shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB over the whole batch (one MSE over all pixels), data range 1.

    Identical batches give float('inf'): there is no noise to measure, and a finite cap
    would hide the difference between "bit-exact" and "very close".
    """
    a, b = as_float_images(images).double(), as_float_images(reference).double()
    _check_pair(a, b)
    mse = torch.mean((a - b) ** 2).item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def psnr_per_image(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each pair [B] (inf where identical). Diffusion samples occasionally take
    another trajectory; the batch PSNR is dominated by those, the median shows the typical pair."""
    a, b = as_float_images(images).double(), as_float_images(reference).double()
    _check_pair(a, b)
    mse = ((a - b) ** 2).flatten(1).mean(1)
    return torch.where(mse > 0, 10 * torch.log10(1.0 / mse), torch.full_like(mse, float("inf")))


def ssim(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean SSIM (Gaussian window 11, sigma 1.5, data range 1), averaged over the batch."""
    a, b = as_float_images(images), as_float_images(reference)
    _check_pair(a, b)
    return float(structural_similarity_index_measure(a, b, data_range=1.0))


@torch.no_grad()
def _image_embeddings(evaluator: TinyClip, images: torch.Tensor) -> torch.Tensor:
    imgs = as_float_images(images)
    return torch.cat([evaluator.encode_image(imgs[i : i + _CHUNK]) for i in range(0, len(imgs), _CHUNK)])


@torch.no_grad()
def _text_embeddings(evaluator: TinyClip, prompts: list[str]) -> torch.Tensor:
    return torch.cat([evaluator.encode_text(prompts[i : i + _CHUNK])
                      for i in range(0, len(prompts), _CHUNK)])


def clip_score(evaluator: TinyClip, images: torch.Tensor, prompts: list[str]) -> float:
    """Mean over pairs of 100 * max(cos(image_i, prompt_i), 0), as torchmetrics' CLIPScore."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    cos = (_image_embeddings(evaluator, images) * _text_embeddings(evaluator, prompts)).sum(-1)
    return float((100 * cos).clamp(min=0).mean())


def caption_retrieval_top1(evaluator: TinyClip, images: torch.Tensor, prompts: list[str]) -> float:
    """Fraction of images whose most similar caption, among all prompts given, is their own.

    A retrieved caption that equals the image's own string also counts, so repeated prompts
    are not penalized.
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    sims = _image_embeddings(evaluator, images) @ _text_embeddings(evaluator, prompts).T
    best = sims.argmax(dim=1).tolist()
    return sum(prompts[j] == prompts[i] for i, j in enumerate(best)) / len(prompts)


def fid(evaluator: TinyClip, real_images: torch.Tensor, fake_images: torch.Tensor) -> float:
    """Frechet distance between evaluator features of real and fake images."""
    # a copy: the metric casts its feature module, which must not change the caller's evaluator
    feature: nn.Module = FeatureExtractor(copy.deepcopy(evaluator)).eval()
    metric = FrechetInceptionDistance(feature=feature, normalize=True)
    metric.set_dtype(torch.float64)
    return _frechet(metric, real_images, fake_images)


def _frechet(metric: FrechetInceptionDistance, real_images: torch.Tensor,
             fake_images: torch.Tensor) -> float:
    with torch.no_grad():
        for imgs, real in ((real_images, True), (fake_images, False)):
            imgs = as_float_images(imgs)
            for i in range(0, len(imgs), _CHUNK):
                metric.update(imgs[i : i + _CHUNK], real=real)
        return float(metric.compute())


def hf_clip_score(model_dir, images: torch.Tensor, prompts: list[str]) -> float:
    """CLIP score with a local transformers CLIP directory (real-model evaluation)."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    metric = CLIPScore(model_name_or_path=str(model_dir))
    with torch.no_grad():
        for i in range(0, len(images), _CHUNK):
            metric.update(as_float_images(images[i:i + _CHUNK]), prompts[i:i + _CHUNK])
        return float(metric.compute())


def inception_fid(weights_path, real_images: torch.Tensor, fake_images: torch.Tensor) -> float:
    """Inception-v3 FID from local FID weights (torch-fidelity's pt_inception file)."""
    try:
        metric = FrechetInceptionDistance(feature=2048, normalize=True,
                                          feature_extractor_weights_path=str(weights_path))
    except ModuleNotFoundError as e:
        from diffq.errors import InputError

        raise InputError(f"Inception FID needs torch-fidelity: pip install 'diffq-toolkit[fid]' ({e})"
                         ) from None
    return _frechet(metric, real_images, fake_images)
