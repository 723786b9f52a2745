"""The fused CUDA ops' entry points: plain tensors and layout numbers in, one kernel launch out.

- `fused_condition`: raster buffers + neural-texture planes -> the half-precision conditioning image in one
  kernel (`condition.cu`).
- `fused_pixels`: decoder output -> uint8 RGB in one kernel (`pixels.cu`).

They run on CUDA tensors only and know no models. The engine-facing wrappers, which take the engine's types
and run the ops' torch twins where the kernels cannot run, are `engine.fused.build_condition_fused` and
`engine.fused.to_pixels_fused`. `check_condition_args` / `check_pixels_args` are each op's contract, on any
device. Both ops are inference-only (no autograd). With a preallocated `out` and after `preload()`, they
allocate nothing and never synchronise, so they can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from engine.errors import InputError

from . import loader

_BLOCK = 256
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # the .cu files' DTYPE_* values


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


def _check_tensor(t, name: str, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...], device) -> None:
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


def _check_strides(t: torch.Tensor, name: str) -> None:
    if any(s < 0 for s in t.stride()):
        raise InputError(f"`{name}` has negative strides; pass `{name}.contiguous()`")


def _require_cuda(device: torch.device, op: str) -> None:
    if device.type != "cuda":
        raise InputError(
            f"`{op}` launches a CUDA kernel but its inputs are on {device}; move them to a CUDA device, or call "
            "the op's torch twin (engine.fused picks the kernel or the twin by device)"
        )


def check_condition_args(
    mask: torch.Tensor,
    depth: torch.Tensor,
    canonical: torch.Tensor,
    normals: torch.Tensor,
    planes: torch.Tensor,
    ambient: torch.Tensor | None,
    *,
    canonical_dims: int,
    texture_channels: int,
    texture_resolution: int,
    depth_max: float,
    coord_min: Sequence[float],
    coord_max: Sequence[float],
    out: torch.Tensor | None = None,
    channels_last: bool = True,
) -> tuple[int, int, int, int]:
    """`fused_condition`'s contract (see there), checked on any device: `InputError` naming the argument and the
    fix when it is broken. Returns the output shape `[B, Ctot, H, W]`."""
    if canonical_dims not in (3, 5):
        raise InputError(f"`canonical_dims` must be 3 (xyz) or 5 (xyz + 2 ambient), got {canonical_dims}")
    if texture_channels < 1 or texture_resolution < 1:
        raise InputError(
            f"`texture_channels` and `texture_resolution` must be positive, got {texture_channels} and "
            f"{texture_resolution}"
        )
    if not (math.isfinite(depth_max) and depth_max > 0):
        raise InputError(f"`depth_max` must be a positive finite depth, got {depth_max}")
    lo, hi = tuple(map(float, coord_min)), tuple(map(float, coord_max))
    box_ok = len(lo) == len(hi) == canonical_dims and all(map(math.isfinite, lo + hi))
    if not box_ok or not all(a < b for a, b in zip(lo, hi, strict=True)):
        raise InputError(
            f"`coord_min` and `coord_max` must hold canonical_dims = {canonical_dims} finite floats each, min < max "
            f"(the normalisation box of the raster coordinates), got {lo} and {hi}"
        )
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        got = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise InputError(f"`mask` must be a [B, H, W, 1] float32 tensor, got {got}")
    b, h, w = mask.shape[:3]
    device = mask.device
    for name, t, n in (("mask", mask, 1), ("depth", depth, 1), ("canonical", canonical, canonical_dims),
                       ("normals", normals, 3)):  # fmt: skip
        _check_tensor(t, name, (b, h, w, n), (torch.float32,), device)
        _check_contiguous(t, name)
    c, r = texture_channels, texture_resolution
    _check_tensor(planes, "planes", (3, c, r, r), tuple(_DTYPE_CODES), device)
    _check_strides(planes, "planes")
    if canonical_dims == 5:
        if ambient is None:
            raise InputError(
                "`ambient` is None but canonical_dims is 5: pass the ambient map [C, R, R] (textures built for "
                "xyz + 2 ambient coordinates have one)"
            )
        _check_tensor(ambient, "ambient", (c, r, r), (planes.dtype,), device)
        _check_strides(ambient, "ambient")
    elif ambient is not None:
        raise InputError("`ambient` must be None when canonical_dims is 3: no ambient coordinates address it")
    shape = (b, 7 + 3 * c + (2 + c if canonical_dims == 5 else 0), h, w)
    if out is not None:
        _check_out(out, shape, torch.float16, device, channels_last)
    return shape


def fused_condition(
    mask: torch.Tensor,
    depth: torch.Tensor,
    canonical: torch.Tensor,
    normals: torch.Tensor,
    planes: torch.Tensor,
    ambient: torch.Tensor | None,
    *,
    canonical_dims: int,
    texture_channels: int,
    texture_resolution: int,
    depth_max: float,
    coord_min: Sequence[float],
    coord_max: Sequence[float],
    out: torch.Tensor | None = None,
    channels_last: bool = True,
) -> torch.Tensor:
    """The conditioning image in half precision, in one kernel (`condition.cu`).

    mask, depth: `[B, H, W, 1]`; canonical: `[B, H, W, D]`, D = `canonical_dims` (3: xyz, 5: xyz + 2 ambient);
        normals: `[B, H, W, 3]`. float32, contiguous, on one CUDA device. A pixel is on the mesh where
        mask > 0.5.
    planes: `[3, C, R, R]` (C = `texture_channels`, R = `texture_resolution`), the planes for the coordinate
        pairs (x,y), (x,z), (y,z), texel (row v, column u) = `planes[p, :, v, u]`; ambient: `[C, R, R]` when
        D = 5, else None. float32, float16 or bfloat16 (the same for both), any non-negative strides (a
        texel's C features adjacent in memory is fastest), on the raster's device.
    depth_max: depth in [0, depth_max] maps to [-1, 1]. coord_min, coord_max: D floats each, the box that
        maps the coordinates to [0, 1] (xyz, then the 2 ambient values).
    out: optional preallocated result (shape, dtype and layout as returned), written in place and returned.
    Returns float16 `[B, Ctot, H, W]` on the raster's device, Ctot = 7 + 3C (+ 2 + C when D = 5), channels:
    depth, xyz, normals, [ambient 2], plane features (x,y), (x,z), (y,z), [ambient-map features]; off the
    mesh -1 for depth, xyz and ambient, 0 otherwise. Texture lookups are bilinear with wrap addressing, texel
    centres at (i + 0.5) / R, computed in float32 and rounded to half once. Channels-last strides (memory
    `[B, H, W, Ctot]`) when `channels_last`, else contiguous NCHW.
    """
    shape = check_condition_args(
        mask, depth, canonical, normals, planes, ambient, canonical_dims=canonical_dims,
        texture_channels=texture_channels, texture_resolution=texture_resolution, depth_max=depth_max,
        coord_min=coord_min, coord_max=coord_max, out=out, channels_last=channels_last,
    )  # fmt: skip
    device = mask.device
    _require_cuda(device, "fused_condition")
    if out is None:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty(shape, dtype=torch.float16, device=device, memory_format=fmt)
    b, _, h, w = shape
    npix = b * h * w
    if npix == 0:
        return out
    lo, hi = tuple(coord_min), tuple(coord_max)
    # Without ambient coordinates the kernel reads neither the ambient map nor its range: placeholders.
    amb_lo, amb_hi = (lo[3:5], hi[3:5]) if canonical_dims == 5 else ((0.0, 0.0), (1.0, 1.0))
    ambient_strides = ambient.stride() if ambient is not None else (0, 0, 0)
    args = [
        loader.ptr(mask), loader.ptr(depth), loader.ptr(canonical), loader.ptr(normals), loader.ptr(planes),
        loader.ptr(ambient), loader.ptr(out),
        loader.i32(b), loader.i32(h * w), loader.i32(canonical_dims), loader.i32(texture_channels),
        loader.i32(texture_resolution), loader.i32(_DTYPE_CODES[planes.dtype]),
        *(loader.i64(s) for s in planes.stride()), *(loader.i64(s) for s in ambient_strides),
        loader.i32(1 if channels_last else 0), loader.f32(depth_max),
        *(loader.f32(v) for v in (*lo[:3], *hi[:3], *amb_lo, *amb_hi)),
    ]  # fmt: skip
    kernel = loader.get_function("condition", "build_condition", device)
    kernel.launch(grid=(npix + _BLOCK - 1) // _BLOCK, block=_BLOCK, args=args)
    return out


def check_pixels_args(image: torch.Tensor, out: torch.Tensor | None = None) -> tuple[int, int, int]:
    """`fused_pixels`' contract (see there), checked on any device: `InputError` naming the argument and the fix
    when it is broken. Returns `(B, H, W)`."""
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[1] != 3:
        got = list(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise InputError(f"`image` must be a [B, 3, H, W] RGB tensor, got {got}")
    b, _, h, w = image.shape
    _check_tensor(image, "image", (b, 3, h, w), tuple(_DTYPE_CODES), image.device)
    _check_contiguous(image, "image")
    if out is not None:
        _check_tensor(out, "out", (b, h, w, 3), (torch.uint8,), image.device)
        _check_contiguous(out, "out")
    return b, h, w


def fused_pixels(image: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decoder output to 8-bit RGB in one kernel (`pixels.cu`).

    image: `[B, 3, H, W]` float32, float16 or bfloat16, contiguous NCHW, on a CUDA device, values in [-1, 1]
        (others clamp).
    out: optional preallocated uint8 `[B, H, W, 3]` contiguous tensor on the image's device.
    Returns uint8 `[B, H, W, 3]` contiguous on the image's device: ((x / 2 + 0.5).clamp(0, 1) * 255).round()
    computed in float32, rounding half to even.
    """
    b, h, w = check_pixels_args(image, out)
    _require_cuda(image.device, "fused_pixels")
    if out is None:
        out = torch.empty((b, h, w, 3), dtype=torch.uint8, device=image.device)
    npix = b * h * w
    if npix == 0:
        return out
    args = [loader.ptr(image), loader.ptr(out), loader.i32(_DTYPE_CODES[image.dtype]), loader.i32(b), loader.i32(h * w)]
    kernel = loader.get_function("pixels", "to_pixels", image.device)
    kernel.launch(grid=(npix + _BLOCK - 1) // _BLOCK, block=_BLOCK, args=args)
    return out
