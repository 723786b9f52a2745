"""Metrics on known inputs: PSNR of exact offsets (plain and masked), SSIM against an independent numpy SSIM."""

import math

import numpy as np
import pytest
import torch

from engine.errors import InputError
from engine.metrics import psnr, ssim


def _reference_ssim(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> float:
    """SSIM of two [H, W, C] images written straight from Wang et al.'s formula: for every 11 x 11 window fully
    inside the image, Gaussian-weighted (sigma 1.5) means, variances and covariance; mean over windows, channels."""
    r = np.arange(11) - 5.0
    g = np.exp(-(r ** 2) / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for c in range(x.shape[2]):
        wx = np.lib.stride_tricks.sliding_window_view(x[..., c], (11, 11))  # [H-10, W-10, 11, 11]
        wy = np.lib.stride_tricks.sliding_window_view(y[..., c], (11, 11))
        mx, my = (wx * w).sum((-1, -2)), (wy * w).sum((-1, -2))
        vx = (w * (wx - mx[..., None, None]) ** 2).sum((-1, -2))
        vy = (w * (wy - my[..., None, None]) ** 2).sum((-1, -2))
        cxy = (w * (wx - mx[..., None, None]) * (wy - my[..., None, None])).sum((-1, -2))
        vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_psnr_identical_is_inf_and_constant_offset_is_exact():
    rng = np.random.default_rng(0)
    img = rng.uniform(0.2, 0.8, size=(2, 3, 16, 16))
    assert torch.isinf(psnr(img, img)).all()
    # A constant offset of 0.1 gives MSE 0.01 -> exactly 20 dB; with data_range 2, 10 log10(4 / 0.01).
    out = psnr(img + 0.1, img)
    assert out.shape == (2,) and torch.allclose(out, torch.full((2,), 20.0, dtype=torch.float64))
    one = img[0].transpose(1, 2, 0)  # [H, W, C], a tensor against an array
    assert math.isclose(float(psnr(torch.tensor(one + 0.1), one, data_range=2.0)), 10 * math.log10(4 / 0.01),
                        rel_tol=1e-12)


def test_psnr_masked_counts_only_masked_pixels():
    target = np.zeros((8, 8, 3))
    pred = target.copy()
    pred[:4] = 0.5  # error only in the top half
    mask = np.zeros((8, 8))
    mask[4:] = 1.0  # ... which the mask excludes
    assert math.isinf(float(psnr(pred, target, mask=mask)))
    mask[:] = 0.0
    mask[:4, :4] = 1.0  # only erroneous pixels: MSE 0.25 -> 10 log10(4) dB
    assert math.isclose(float(psnr(pred, target, mask=mask)), 10 * math.log10(4.0), rel_tol=1e-12)
    # Unmasked over the whole image: MSE 0.125.
    assert math.isclose(float(psnr(pred, target)), 10 * math.log10(8.0), rel_tol=1e-12)
    # Batched masks, [B, 1, H, W] and [B, H, W].
    pb = torch.tensor(pred).permute(2, 0, 1)[None].repeat(2, 1, 1, 1)
    tb = torch.zeros_like(pb)
    mb = torch.tensor(mask)[None, None].repeat(2, 1, 1, 1)
    assert torch.allclose(psnr(pb, tb, mask=mb), torch.full((2,), 10 * math.log10(4.0), dtype=torch.float64))
    assert torch.allclose(psnr(pb, tb, mask=mb[:, 0]), psnr(pb, tb, mask=mb))


def test_psnr_rejects_bad_input():
    a = np.zeros((8, 8, 3))
    with pytest.raises(InputError, match="empty"):
        psnr(a + 0.1, a, mask=np.zeros((8, 8)))
    with pytest.raises(InputError, match="same shape"):
        psnr(a, np.zeros((8, 9, 3)))
    with pytest.raises(InputError, match="NaN"):
        psnr(a * np.nan, a)
    with pytest.raises(InputError, match="mask"):
        psnr(a, a, mask=np.ones((4, 4)))


def test_ssim_identity_and_reference_values():
    rng = np.random.default_rng(1)
    ref = rng.uniform(0, 1, size=(24, 20, 3))
    ref = (ref + np.roll(ref, 1, 0) + np.roll(ref, 1, 1)) / 3  # some local structure
    assert math.isclose(float(ssim(ref, ref)), 1.0, rel_tol=1e-12)
    noisy = np.clip(ref + rng.normal(0, 0.1, size=ref.shape), 0, 1)
    got = float(ssim(noisy, ref))
    assert 0.0 < got < 0.99
    assert math.isclose(got, _reference_ssim(noisy, ref), rel_tol=1e-9, abs_tol=1e-12)
    # [B, C, H, W] gives the per-image values; float32 input gives the same (float64 inside).
    batch = torch.tensor(np.stack([noisy, ref]).transpose(0, 3, 1, 2), dtype=torch.float32)
    out = ssim(batch, torch.tensor(np.stack([ref, ref]).transpose(0, 3, 1, 2), dtype=torch.float32))
    assert out.shape == (2,) and math.isclose(float(out[1]), 1.0, rel_tol=1e-6)
    assert math.isclose(float(out[0]), got, rel_tol=1e-5)
    # A constant image against a shifted constant: only the luminance term, (2 a b + c1) / (a^2 + b^2 + c1).
    a, b, c1 = 0.3, 0.5, 0.01 ** 2
    s = float(ssim(np.full((16, 16), a), np.full((16, 16), b)))
    assert math.isclose(s, (2 * a * b + c1) / (a * a + b * b + c1), rel_tol=1e-9)


def test_ssim_rejects_small_images():
    with pytest.raises(InputError, match="11"):
        ssim(np.zeros((8, 8, 3)), np.zeros((8, 8, 3)))
