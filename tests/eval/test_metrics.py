import math

import numpy as np
import pytest
import torch
from scipy.ndimage import correlate1d

from diffq.eval.metrics import fid, psnr, ssim
from diffq.eval.shapes import make_dataset


def _pair(seed: int = 0, sigma: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    images, _, _ = make_dataset("eval", 4, seed=seed)
    ref = images.float() / 255
    noisy = (ref + sigma * torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed))).clamp(0, 1)
    return noisy, ref


def _ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Gaussian SSIM (11 taps, sigma 1.5) over reflect-padded images, float64."""
    x = np.arange(11) - 5
    g = np.exp(-(x**2) / (2 * 1.5**2))
    g /= g.sum()

    def blur(img: np.ndarray) -> np.ndarray:
        # scipy's "mirror" is torch's "reflect" padding (edge pixel not repeated).
        return correlate1d(correlate1d(img, g, axis=-1, mode="mirror"), g, axis=-2, mode="mirror")

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def test_psnr_of_identical_images_is_inf():
    _, ref = _pair()
    assert psnr(ref, ref.clone()) == math.inf


def test_psnr_matches_float64_formula():
    noisy, ref = _pair()
    mse = np.mean((noisy.numpy().astype(np.float64) - ref.numpy().astype(np.float64)) ** 2)
    assert psnr(noisy, ref) == pytest.approx(10 * np.log10(1 / mse), abs=1e-6)


def test_psnr_accepts_uint8():
    _, ref = _pair()
    assert psnr((ref * 255).round().to(torch.uint8), ref) > 50


def test_ssim_matches_float64_formula():
    noisy, ref = _pair(sigma=0.1)
    expected = _ssim_reference(noisy.numpy().astype(np.float64), ref.numpy().astype(np.float64))
    assert ssim(noisy, ref) == pytest.approx(expected, abs=1e-4)
    assert ssim(ref, ref) == pytest.approx(1.0, abs=1e-3)  # float32 cancellation


def test_paired_metrics_reject_mismatched_shapes():
    noisy, ref = _pair()
    with pytest.raises(ValueError):
        psnr(noisy[:2], ref)


def test_fid_of_a_set_against_itself_is_zero(evaluator):
    images, _, _ = make_dataset("eval", 192, seed=0)
    assert abs(fid(evaluator, images, images)) < 1e-2
    other, _, _ = make_dataset("train", 192, seed=0)
    noise = torch.rand(192, 3, 64, 64)
    assert fid(evaluator, images, noise) > fid(evaluator, images, other)
