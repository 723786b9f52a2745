"""The fused CUDA ops, with their torch twins as fallbacks.

- `build_condition_fused`: raster buffers + neural textures -> the half-precision conditioning image in one
  kernel (`condition.cu`); twin: `engine.conditioning.build_condition`.
- `to_pixels_fused`: decoder output -> uint8 RGB in one kernel (`pixels.cu`); twin: `engine.renderer.to_pixels`.

On CUDA tensors with cuda-python installed the kernels run; on CPU tensors, or without cuda-python, the twins
run and the result is converted to the same dtype and layout. Both ops are inference-only (no autograd). With
a preallocated `out` and after `preload()`, the CUDA path allocates nothing and never synchronises, so it can
be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, NamedTuple

import torch

from engine.config import ConditioningConfig
from engine.errors import InputError

from . import loader

_BLOCK = 256
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # the .cu files' DTYPE_* values


class PackedTextures(NamedTuple):
    """Neural textures in the fused kernel's fastest storage (see `pack_textures`); usable by the reference too.

    `planes`: `[3, C, R, R]` with channels-last strides (a texel's C features adjacent in memory);
    `ambient`: `[C, R, R]` likewise (`[R, R, C]` in memory), or None. Same dtype and device for both.
    """

    planes: torch.Tensor
    ambient: torch.Tensor | None

    def lookup(self, coords01: torch.Tensor) -> torch.Tensor:
        """The reference's bilinear wrapping lookup (`NeuralTextures.lookup`) on these tensors."""
        from engine.conditioning import NeuralTextures

        return NeuralTextures.lookup(self, coords01)


@functools.cache
def _nvrtc_loads() -> bool:
    try:
        _, nvrtc = loader.bindings()
        return nvrtc.nvrtcVersion()[0] == nvrtc.nvrtcResult.NVRTC_SUCCESS
    except Exception:  # cuda-python raises its own error types when the NVRTC library is missing
        return False


def available() -> bool:
    """Whether the fused kernels can run here: a CUDA device, cuda-python and the NVRTC library."""
    return torch.cuda.is_available() and loader.has_cuda_python() and _nvrtc_loads()


def preload(device: torch.device | str | int | None = None) -> None:
    """Compile and load both kernels on a CUDA `device` now (default: the current one), e.g. before capturing
    a CUDA graph, so that the first call does no compiling or module loading. Raises `BackendError` when the
    kernels cannot run (see `available()`)."""
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else device
    loader.get_function("condition", "build_condition", device)
    loader.get_function("pixels", "to_pixels", device)


def _use_kernel(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    if available():
        return True
    warnings.warn(
        f"fused CUDA kernels unavailable (cuda-python or NVRTC missing), using the torch reference; to enable "
        f"them: {loader.INSTALL_HINT}",
        stacklevel=3,
    )
    return False


def pack_textures(textures: Any, dtype: torch.dtype = torch.float16) -> PackedTextures:
    """A copy of `textures` (`planes` `[3, C, R, R]`, `ambient` `[C, R, R]` or None) in `dtype` with each
    texel's features adjacent in memory: a bilinear tap then reads one 32-byte sector (C = 16, half) instead
    of C scattered values. Build once per avatar, not per frame. Same device as the input."""
    if dtype not in _DTYPE_CODES:
        raise InputError(f"textures can be packed as {sorted(map(str, _DTYPE_CODES))}, not {dtype}")
    planes = textures.planes.detach().to(dtype).contiguous(memory_format=torch.channels_last)
    ambient = textures.ambient
    if ambient is not None:
        ambient = ambient.detach().to(dtype).permute(1, 2, 0).contiguous().permute(2, 0, 1)
    return PackedTextures(planes, ambient)


def _as_float32(textures: Any) -> Any:
    """The textures as the reference should see them for a fallback: the kernel reads texels of any dtype
    and computes in float32, so the twin runs on float32 copies."""
    if textures.planes.dtype == torch.float32:
        return textures
    ambient = None if textures.ambient is None else textures.ambient.float()
    return PackedTextures(textures.planes.float(), ambient)


def _check_tensor(t: Any, name: str, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...], device) -> None:
    if not isinstance(t, torch.Tensor):
        raise InputError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise InputError(f"`{name}` must have shape {list(shape)}, got {list(t.shape)}")
    if t.dtype not in dtypes:
        raise InputError(f"`{name}` must be {' or '.join(map(str, dtypes))}, got {t.dtype}; convert it with .to()")
    if t.device != device:
        raise InputError(f"`{name}` is on {t.device}, expected {device}; move all inputs to one device")


def _check_contiguous(t: torch.Tensor, name: str) -> None:
    if not t.is_contiguous():
        raise InputError(f"`{name}` must be contiguous; pass `{name}.contiguous()`")


def _check_out(out: torch.Tensor, shape, dtype, device, channels_last: bool) -> None:
    _check_tensor(out, "out", shape, (dtype,), device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if not out.is_contiguous(memory_format=fmt):
        raise InputError(
            f"`out` must be {'channels_last' if channels_last else 'contiguous NCHW'}; allocate it with "
            f"torch.empty({list(shape)}, dtype={dtype}, device=...)"
            + (".contiguous(memory_format=torch.channels_last)" if channels_last else "")
        )


def _texture_strides(t: torch.Tensor, name: str) -> tuple[int, ...]:
    if any(s < 0 for s in t.stride()):
        raise InputError(f"`{name}` has negative strides; pass `{name}.contiguous()`")
    return t.stride()


def build_condition_fused(
    raster: Any,
    textures: Any,
    config: ConditioningConfig,
    out: torch.Tensor | None = None,
    channels_last: bool = True,
) -> torch.Tensor:
    """The conditioning image of `engine.conditioning.build_condition`, in half precision, in one kernel.

    raster: `mask`, `depth` `[B, H, W, 1]`, `canonical` `[B, H, W, D]` (D = config.canonical_dims), `normals`
        `[B, H, W, 3]`: float32, contiguous, one device (e.g. `engine.raster.RasterBuffers`).
    textures: `planes` `[3, C, R, R]` and `ambient` `[C, R, R]` (needed iff D = 5; ignored otherwise), float32,
        float16 or bfloat16, any non-negative strides (`pack_textures` gives the fastest), on the raster's
        device; C and R as in `config`. `engine.conditioning.NeuralTextures` or `PackedTextures`.
    out: optional preallocated result (shape, dtype and layout as returned), written in place and returned.
    Returns float16 `[B, config.channels, H, W]` on the raster's device, channels in
    `config.channel_layout()` order; channels-last strides (memory `[B, H, W, Ctot]`) when `channels_last`,
    else contiguous NCHW. Values equal the twin's float32 result rounded to half (up to float32 rounding).
    """
    mask = getattr(raster, "mask", None)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise InputError("`raster.mask` must be a [B, H, W, 1] tensor; pass engine.raster.RasterBuffers")
    b, h, w = mask.shape[:3]
    device = mask.device
    for name, n in (("mask", 1), ("depth", 1), ("canonical", config.canonical_dims), ("normals", 3)):
        t = getattr(raster, name, None)
        _check_tensor(t, f"raster.{name}", (b, h, w, n), (torch.float32,), device)
        _check_contiguous(t, f"raster.{name}")
    c, r = config.texture_channels, config.texture_resolution
    tex_dtypes = tuple(_DTYPE_CODES)
    _check_tensor(getattr(textures, "planes", None), "textures.planes", (3, c, r, r), tex_dtypes, device)
    plane_strides = _texture_strides(textures.planes, "textures.planes")
    ambient = getattr(textures, "ambient", None) if config.has_ambient else None
    if config.has_ambient:
        if ambient is None:
            raise InputError(
                "config.canonical_dims is 5 but the textures have no ambient map; build the textures from the "
                "same ConditioningConfig"
            )
        _check_tensor(ambient, "textures.ambient", (c, r, r), (textures.planes.dtype,), device)
        ambient_strides = _texture_strides(ambient, "textures.ambient")
    else:
        ambient_strides = (0, 0, 0)
    shape = (b, config.channels, h, w)
    if out is not None:
        _check_out(out, shape, torch.float16, device, channels_last)

    if not _use_kernel(device):
        from engine.conditioning import build_condition

        with torch.no_grad():
            ref = build_condition(raster, _as_float32(textures), config).to(torch.float16)
        if out is not None:
            return out.copy_(ref)
        return ref.contiguous(memory_format=torch.channels_last) if channels_last else ref

    if out is None:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty(shape, dtype=torch.float16, device=device, memory_format=fmt)
    npix = b * h * w
    if npix == 0:
        return out
    lo, hi, alo, ahi = config.canonical_min, config.canonical_max, config.ambient_min, config.ambient_max
    args = [
        loader.ptr(raster.mask), loader.ptr(raster.depth), loader.ptr(raster.canonical),
        loader.ptr(raster.normals), loader.ptr(textures.planes), loader.ptr(ambient), loader.ptr(out),
        loader.i32(b), loader.i32(h * w), loader.i32(config.canonical_dims), loader.i32(c), loader.i32(r),
        loader.i32(_DTYPE_CODES[textures.planes.dtype]),
        *(loader.i64(s) for s in plane_strides), *(loader.i64(s) for s in ambient_strides),
        loader.i32(1 if channels_last else 0), loader.f32(config.depth_max),
        *(loader.f32(v) for v in (*lo, *hi, *alo, *ahi)),
    ]  # fmt: skip
    kernel = loader.get_function("condition", "build_condition", device)
    kernel.launch(grid=(npix + _BLOCK - 1) // _BLOCK, block=_BLOCK, args=args)
    return out


def to_pixels_fused(image: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decoder output to 8-bit RGB in one kernel: `engine.renderer.to_pixels`'s result, bit for bit.

    image: `[B, 3, H, W]` float32, float16 or bfloat16, contiguous NCHW, values in [-1, 1] (others clamp).
    out: optional preallocated uint8 `[B, H, W, 3]` contiguous tensor on the image's device.
    Returns uint8 `[B, H, W, 3]` contiguous on the image's device: ((x / 2 + 0.5).clamp(0, 1) * 255).round()
    computed in float32.
    """
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[1] != 3:
        got = list(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise InputError(f"`image` must be a [B, 3, H, W] RGB tensor, got {got}")
    b, _, h, w = image.shape
    _check_tensor(image, "image", (b, 3, h, w), tuple(_DTYPE_CODES), image.device)
    _check_contiguous(image, "image")
    if out is not None:
        _check_tensor(out, "out", (b, h, w, 3), (torch.uint8,), image.device)
        _check_contiguous(out, "out")

    if not _use_kernel(image.device):
        from engine.renderer import to_pixels

        with torch.no_grad():
            ref = to_pixels(image)
        return out.copy_(ref) if out is not None else ref.contiguous()

    if out is None:
        out = torch.empty((b, h, w, 3), dtype=torch.uint8, device=image.device)
    npix = b * h * w
    if npix == 0:
        return out
    args = [loader.ptr(image), loader.ptr(out), loader.i32(_DTYPE_CODES[image.dtype]), loader.i32(b), loader.i32(h * w)]
    kernel = loader.get_function("pixels", "to_pixels", image.device)
    kernel.launch(grid=(npix + _BLOCK - 1) // _BLOCK, block=_BLOCK, args=args)
    return out
