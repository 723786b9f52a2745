"""Image metrics for evaluation: PSNR (optionally over a mask), SSIM and sharpness (variance of the Laplacian).

Inputs are float images in [0, data_range] (tensors or numpy arrays), either a batch `[B, C, H, W]`, one image
`[H, W, C]` or one grey image `[H, W]`. A batch gives one value per image (`[B]` float64 tensor), a single image a
0-d tensor. Computation is in float64 on the inputs' device, so results do not depend on the input dtype.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError

# SSIM constants (Wang et al. 2004): K1, K2 and the Gaussian window.
SSIM_K1 = 0.01
SSIM_K2 = 0.03
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


def _to_nchw(x: Any, name: str) -> tuple[torch.Tensor, bool]:
    """`x` as a float64 [B, C, H, W] tensor, and whether it was a batch."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a torch tensor or numpy array, got {type(x).__name__}")
    x = x.detach().to(torch.float64)
    if x.ndim == 4:
        return x, True
    if x.ndim == 3:
        return x.permute(2, 0, 1)[None], False
    if x.ndim == 2:
        return x[None, None], False
    raise InputError(f"{name} must be [B, C, H, W], [H, W, C] or [H, W], got shape {list(x.shape)}")


def _pair(pred: Any, target: Any) -> tuple[torch.Tensor, torch.Tensor, bool]:
    p, batched = _to_nchw(pred, "pred")
    t, batched_t = _to_nchw(target, "target")
    if p.shape != t.shape or batched != batched_t:
        raise InputError(f"pred and target must have the same shape, got {list(pred.shape)} and {list(target.shape)}")
    if not (bool(torch.isfinite(p).all()) and bool(torch.isfinite(t).all())):
        raise InputError("pred or target holds NaN or Inf values; metrics need finite images")
    return p, t.to(p.device), batched


def _check_range(data_range: float) -> None:
    if not (isinstance(data_range, (int, float)) and math.isfinite(data_range) and data_range > 0):
        raise InputError(f"data_range must be a positive number (1.0 for images in [0, 1]), got {data_range!r}")


def psnr(pred: Any, target: Any, mask: Any = None, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, 10 log10(data_range^2 / MSE), per image; +inf where the images are equal.

    `mask` (optional): weights in [0, 1] broadcastable to one channel of the images: `[B, 1, H, W]` or `[B, H, W]`
    for a batch, `[H, W]` or `[H, W, 1]` for one image. The MSE is then the mask-weighted mean over the masked pixels
    and all channels (sum(m (p - t)^2) / (C sum(m))), i.e. PSNR over the head only. An image whose mask is empty
    raises InputError.
    """
    _check_range(data_range)
    p, t, batched = _pair(pred, target)
    B, C, H, W = p.shape
    sq = (p - t) ** 2
    if mask is None:
        mse = sq.mean(dim=(1, 2, 3))
    else:
        m = mask
        if isinstance(m, np.ndarray):
            m = torch.from_numpy(np.ascontiguousarray(m))
        if not isinstance(m, torch.Tensor):
            raise InputError(f"mask must be a torch tensor or numpy array, got {type(m).__name__}")
        m = m.detach().to(device=p.device, dtype=torch.float64)
        if batched and m.ndim == 3:
            m = m[:, None]
        elif not batched:
            m = m[..., 0] if m.ndim == 3 and m.shape[-1] == 1 else m
            m = m[None, None] if m.ndim == 2 else m
        if m.shape != (B, 1, H, W):
            raise InputError(f"mask must cover the images' pixels with one channel ([{B}, 1, {H}, {W}] for this "
                             f"batch, or [H, W] for one image), got shape {list(mask.shape)}")
        weight = m.sum(dim=(1, 2, 3))
        if bool((weight <= 0).any()):
            empty = [i for i, w in enumerate(weight.tolist()) if w <= 0]
            raise InputError(f"the mask of image(s) {empty} is empty; masked PSNR needs at least one masked pixel")
        mse = (sq * m).sum(dim=(1, 2, 3)) / (weight * C)
    out = 10.0 * torch.log10(data_range ** 2 / mse)  # mse == 0 -> +inf
    return out if batched else out[0]


def gaussian_window(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    """[size] float64: a normalised 1-D Gaussian centred on the middle tap."""
    x = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(pred: Any, target: Any, data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004), per image, in [-1, 1]; 1 for identical images.

    Local statistics use an 11-tap Gaussian window (sigma 1.5) applied separably over the valid region only (no
    padding: the output map is (H - 10) x (W - 10)), population (not sample) covariances, constants
    C1 = (0.01 L)^2, C2 = (0.03 L)^2 with L = data_range; the SSIM map is averaged over pixels and channels. This
    matches scikit-image's `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=L)`. Images must be at least 11 x 11.
    """
    _check_range(data_range)
    p, t, batched = _pair(pred, target)
    B, C, H, W = p.shape
    if H < SSIM_WINDOW or W < SSIM_WINDOW:
        raise InputError(f"SSIM needs images of at least {SSIM_WINDOW} x {SSIM_WINDOW} pixels, got {H} x {W}")
    g = gaussian_window(SSIM_WINDOW, SSIM_SIGMA, p.device)
    kx = g.view(1, 1, 1, -1).expand(C, 1, 1, SSIM_WINDOW)
    ky = g.view(1, 1, -1, 1).expand(C, 1, SSIM_WINDOW, 1)

    def blur(x: torch.Tensor) -> torch.Tensor:  # per-channel separable Gaussian, valid region
        return F.conv2d(F.conv2d(x, kx, groups=C), ky, groups=C)

    mu_p, mu_t = blur(p), blur(t)
    var_p = blur(p * p) - mu_p ** 2
    var_t = blur(t * t) - mu_t ** 2
    cov = blur(p * t) - mu_p * mu_t
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    s = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p ** 2 + mu_t ** 2 + c1) * (var_p + var_t + c2))
    out = s.mean(dim=(1, 2, 3))
    return out if batched else out[0]


# The 3 x 3 Laplacian (4-neighbour): sharpness = its response's variance.
_LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))


def sharpness(image: Any, mask: Any = None) -> torch.Tensor:
    """Variance of the Laplacian of the image's luma (mean of its channels), per image: the high-frequency
    content a blurry mean loses. Computed over the valid region (H - 2) x (W - 2); `mask` (optional, `[B, 1, H, W]`,
    `[B, H, W]` or `[H, W]`, weights in [0, 1]) restricts it to where the mask is, as a weighted variance.
    """
    x, batched = _to_nchw(image, "image")
    if not bool(torch.isfinite(x).all()):
        raise InputError("image holds NaN or Inf values; sharpness needs a finite image")
    if x.shape[-1] < 3 or x.shape[-2] < 3:
        raise InputError(f"sharpness needs images of at least 3 x 3 pixels, got {x.shape[-2]} x {x.shape[-1]}")
    kernel = torch.tensor(_LAPLACIAN, dtype=torch.float64, device=x.device).view(1, 1, 3, 3)
    response = F.conv2d(x.mean(1, keepdim=True), kernel)
    if mask is None:
        weight = torch.ones_like(response)
    else:
        m = mask if isinstance(mask, torch.Tensor) else torch.as_tensor(np.asarray(mask))
        shape = list(m.shape)
        m = m.to(x.device, x.dtype)
        m = m[None, None] if m.ndim == 2 else m[:, None] if m.ndim == 3 else m
        if m.ndim != 4 or m.shape[1] != 1 or m.shape[-2:] != x.shape[-2:]:
            raise InputError(f"mask must be [B, 1, H, W], [B, H, W] or [H, W] with H x W = {x.shape[-2]} x "
                             f"{x.shape[-1]} like the image, got shape {shape}")
        weight = m[..., 1:-1, 1:-1].expand_as(response)
    total = weight.sum(dim=(1, 2, 3))
    if bool((total <= 0).any()):
        raise InputError("mask is empty inside the image's border: sharpness needs at least one pixel")
    mean = (weight * response).sum(dim=(1, 2, 3)) / total
    out = (weight * (response - mean.view(-1, 1, 1, 1)) ** 2).sum(dim=(1, 2, 3)) / total
    return out if batched else out[0]
