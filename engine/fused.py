"""The fused CUDA kernels (`kernels/`) for the engine's types: each op runs its kernel on CUDA tensors where the
kernels can run (`kernels.available()`), else its torch twin, with one contract and one result type on every
device, so that code tested on CPU runs unchanged on a GPU.

- `build_condition_fused`: raster buffers + neural textures -> the half-precision conditioning image; twin:
  `engine.conditioning.build_condition` (on float32 copies of the texels, rounded to half).
- `to_pixels_fused`: decoder output -> uint8 RGB; twin: `engine.frame.to_pixels`.

A fast path's module, not the reference's: the reference path never imports it. Inference-only (no autograd).
"""

from __future__ import annotations

import warnings

import torch

import kernels
from kernels.loader import INSTALL_HINT

from .conditioning import NeuralTextures, PackedTextures, build_condition, coordinate_range
from .config import ConditioningConfig
from .errors import InputError
from .frame import to_pixels

_RASTER_FIELDS = ("mask", "depth", "canonical", "normals")


def _use_kernel(device: torch.device) -> bool:
    """The kernel on CUDA where it can run; the twin elsewhere, with a warning on CUDA (it is much slower)."""
    if device.type != "cuda":
        return False
    if kernels.available():
        return True
    warnings.warn(
        f"fused CUDA kernels unavailable (cuda-python or NVRTC missing), using the torch reference; to enable "
        f"them: {INSTALL_HINT}",
        stacklevel=3,
    )
    return False


def build_condition_fused(
    raster,
    textures: NeuralTextures | PackedTextures,
    config: ConditioningConfig,
    out: torch.Tensor | None = None,
    channels_last: bool = True,
) -> torch.Tensor:
    """The conditioning image of `engine.conditioning.build_condition`, in half precision (one kernel on CUDA).

    raster: `mask`, `depth` `[B, H, W, 1]`, `canonical` `[B, H, W, D]` (D = config.canonical_dims), `normals`
        `[B, H, W, 3]`: float32, contiguous, one device (e.g. `engine.raster.RasterBuffers`; its rasterisers
        return depth and canonical as views: pass `.contiguous()` copies).
    textures: `planes` `[3, C, R, R]` and `ambient` `[C, R, R]` (iff D = 5, else None), float32, float16 or
        bfloat16, any non-negative strides (`engine.conditioning.pack_textures` gives the fastest), on the
        raster's device; C and R as in `config`.
    out: optional preallocated result (shape, dtype and layout as returned), written in place and returned.
    Returns float16 `[B, config.channels, H, W]` on the raster's device, channels in
    `config.channel_layout()` order; channels-last strides (memory `[B, H, W, Ctot]`) when `channels_last`,
    else contiguous NCHW. Values: the twin's float32 result on the texels' values, rounded to half (the kernel
    agrees up to float32 rounding).
    """
    buffers = tuple(getattr(raster, name, None) for name in _RASTER_FIELDS)
    for name, t in zip(_RASTER_FIELDS, buffers, strict=True):
        if not isinstance(t, torch.Tensor):
            raise InputError(
                f"`raster.{name}` must be a tensor, got {type(t).__name__}; pass engine.raster.RasterBuffers"
            )
    planes, ambient = getattr(textures, "planes", None), getattr(textures, "ambient", None)
    lo, hi = coordinate_range(config)
    layout = dict(
        canonical_dims=config.canonical_dims, texture_channels=config.texture_channels,
        texture_resolution=config.texture_resolution, depth_max=config.depth_max, coord_min=lo, coord_max=hi,
    )  # fmt: skip
    if _use_kernel(buffers[0].device):
        return kernels.fused_condition(*buffers, planes, ambient, **layout, out=out, channels_last=channels_last)
    kernels.check_condition_args(*buffers, planes, ambient, **layout, out=out, channels_last=channels_last)
    # The kernel reads the texels in their dtype and computes in float32: the twin runs on float32 copies.
    texels = PackedTextures(planes.float(), None if ambient is None else ambient.float())
    with torch.no_grad():
        ref = build_condition(raster, texels, config).to(torch.float16)
    if out is not None:
        return out.copy_(ref)
    return ref.contiguous(memory_format=torch.channels_last) if channels_last else ref


def to_pixels_fused(image: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decoder output to 8-bit RGB (one kernel on CUDA): `engine.frame.to_pixels`'s result, bit for bit.

    image: `[B, 3, H, W]` float32, float16 or bfloat16, contiguous NCHW, values in [-1, 1] (others clamp).
    out: optional preallocated uint8 `[B, H, W, 3]` contiguous tensor on the image's device.
    Returns uint8 `[B, H, W, 3]` contiguous on the image's device: ((x / 2 + 0.5).clamp(0, 1) * 255).round()
    computed in float32.
    """
    if isinstance(image, torch.Tensor) and _use_kernel(image.device):
        return kernels.fused_pixels(image, out)
    kernels.check_pixels_args(image, out)
    with torch.no_grad():
        ref = to_pixels(image)
    return out.copy_(ref) if out is not None else ref.contiguous()
