"""Rasterisation: mesh + camera -> `RasterBuffers` (per-pixel mask, depth, canonical coordinates, normals).

`rasterize(mesh, camera, backend="torch")` picks a backend by name from `BACKENDS`:
- `"torch"` (`torch_raster.py`): the reference, pure PyTorch, any device, exact z-buffer.
- `"numba"` (`numba_raster.py`): the reference's arithmetic as compiled loops, for CPU meshes (numba, a wheel);
  the same buffers up to edge pixels, 6-8x faster on the demo's head.
- `"nvdiffrast"` (`nvdiffrast_raster.py`): NVIDIA's CUDA rasteriser; needs `pip install diffrp-nvdiffrast` and a
  mesh on a CUDA device.
All follow the projection of `engine.geometry` (model.md "Projection") and give the same buffers up to triangle
edges (each rasteriser has its own edge rule) and float rounding. `default_backend(device)` is the one place that
picks a backend where the caller names none ("auto").
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..errors import ConfigError, InputError
from ..geometry import Camera, Mesh


@dataclass
class RasterBuffers:
    """Per-pixel G-buffers, NHWC float32, all on one device. Row 0 is the image's top.

    - `mask` [B, H, W, 1]: 1.0 where a triangle covers the pixel centre, 0.0 on the background.
    - `depth` [B, H, W, 1]: clip-space z before the divide by w (-znear at Z = znear ... zfar at Z = zfar; see
      `engine.geometry`), 0 off the mesh.
    - `canonical` [B, H, W, D], D = 3 or 5: perspective-correct interpolated canonical coordinates (xyz, + 2 ambient
      when D = 5), 0 off the mesh.
    - `normals` [B, H, W, 3]: world-space vertex normals interpolated, then renormalised to unit length; 0 off the
      mesh.
    """

    mask: torch.Tensor
    depth: torch.Tensor
    canonical: torch.Tensor
    normals: torch.Tensor

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    @property
    def height(self) -> int:
        return self.mask.shape[1]

    @property
    def width(self) -> int:
        return self.mask.shape[2]

    @property
    def device(self) -> torch.device:
        return self.mask.device

    @property
    def canonical_dims(self) -> int:
        return self.canonical.shape[-1]

    @property
    def xyz(self) -> torch.Tensor:
        """[B, H, W, 3] canonical xyz."""
        return self.canonical[..., :3]

    @property
    def ambient(self) -> torch.Tensor | None:
        """[B, H, W, 2] ambient coordinates, or None for 3-D canonical coordinates."""
        return self.canonical[..., 3:5] if self.canonical_dims == 5 else None

    def to(self, device: torch.device | str) -> "RasterBuffers":
        return RasterBuffers(*(getattr(self, k).to(device) for k in ("mask", "depth", "canonical", "normals")))

    @classmethod
    def cat(cls, buffers: Sequence["RasterBuffers"]) -> "RasterBuffers":
        """Concatenate along the batch axis; every entry must have the same H, W, D and device."""
        buffers = list(buffers)
        if not buffers:
            raise InputError("RasterBuffers.cat needs at least one RasterBuffers")
        first = buffers[0]
        for i, b in enumerate(buffers[1:], 1):
            if (b.height, b.width, b.canonical_dims) != (first.height, first.width, first.canonical_dims):
                raise InputError(
                    f"RasterBuffers.cat: entry {i} is {b.height}x{b.width} with D={b.canonical_dims}, entry 0 is "
                    f"{first.height}x{first.width} with D={first.canonical_dims}; rasterize all at one size"
                )
            if b.device != first.device:
                raise InputError(f"RasterBuffers.cat: entry {i} is on {b.device}, entry 0 on {first.device}")
        return cls(*(torch.cat([getattr(b, k) for b in buffers]) for k in ("mask", "depth", "canonical", "normals")))


def _torch_backend(mesh: Mesh, camera: Camera, znear: float, zfar: float) -> RasterBuffers:
    from .torch_raster import rasterize_torch

    return rasterize_torch(mesh, camera, znear, zfar)


def _numba_backend(mesh: Mesh, camera: Camera, znear: float, zfar: float) -> RasterBuffers:
    from .numba_raster import rasterize_numba

    return rasterize_numba(mesh, camera, znear, zfar)


def _nvdiffrast_backend(mesh: Mesh, camera: Camera, znear: float, zfar: float) -> RasterBuffers:
    from .nvdiffrast_raster import rasterize_nvdiffrast

    return rasterize_nvdiffrast(mesh, camera, znear, zfar)


# The one registry of backends: name -> fn(mesh, camera, znear, zfar) -> RasterBuffers.
BACKENDS: dict[str, Callable[[Mesh, Camera, float, float], RasterBuffers]] = {
    "torch": _torch_backend,
    "numba": _numba_backend,
    "nvdiffrast": _nvdiffrast_backend,
}
CHOICES = ("auto", *BACKENDS)  # what a `--raster` option or `Renderer(raster_backend=...)` accepts


def default_backend(device: torch.device | str) -> str:
    """The rasteriser for "auto": `numba` on the CPU where numba is installed (the reference's buffers up to edge
    pixels, 6-8x faster), else the `torch` reference (nvdiffrast needs a CUDA build step, so it is never implied)."""
    if torch.device(device).type == "cpu" and importlib.util.find_spec("numba") is not None:
        return "numba"
    return "torch"


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """A backend name, with "auto" replaced by `default_backend(device)`; an unknown name is a ConfigError."""
    if backend == "auto":
        return default_backend(device)
    if backend not in BACKENDS:
        raise ConfigError(f"unknown raster backend {backend!r}; choose one of {list(CHOICES)}")
    return backend


def rasterize(
    mesh: Mesh, camera: Camera, backend: str = "torch", znear: float = 0.1, zfar: float = 2.0
) -> RasterBuffers:
    """Rasterise `mesh` as seen by `camera` into `camera.height` x `camera.width` buffers (B = 1) on the mesh's
    device with `backend` (a name in `BACKENDS`, or "auto": `default_backend`). Fragments with camera depth Z outside
    [znear, zfar] are discarded; there is no back-face culling."""
    backend = resolve_backend(backend, mesh.device if isinstance(mesh, Mesh) else "cpu")
    if not isinstance(mesh, Mesh) or not isinstance(camera, Camera):
        raise InputError(
            f"rasterize expects (Mesh, Camera), got ({type(mesh).__name__}, {type(camera).__name__})"
        )
    from ..geometry import _check_clip_range

    _check_clip_range(float(znear), float(zfar))
    return BACKENDS[backend](mesh, camera, float(znear), float(zfar))


class MeshUploader:
    """Meshes onto `device` with their topology (faces, canonical coordinates) copied once: a head model's posed
    meshes share those tensors (`Mesh.with_vertices`), so each frame copies only its vertices (and normals, if
    given). Holds the last topology seen; a mesh already on the device is returned as it is."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._source: tuple[torch.Tensor, torch.Tensor] | None = None  # the topology's host tensors
        self._topology: Mesh | None = None  # a mesh on the device holding them

    def __call__(self, mesh: Mesh) -> Mesh:
        if mesh.device == self.device:
            return mesh
        if self._source is None or self._source[0] is not mesh.faces or self._source[1] is not mesh.canonical:
            self._source, self._topology = (mesh.faces, mesh.canonical), mesh.to(self.device)
        normals = None if mesh.normals is None else mesh.normals.to(self.device)
        return self._topology.with_vertices(mesh.vertices.to(self.device), normals)


__all__ = ["RasterBuffers", "rasterize", "BACKENDS", "CHOICES", "MeshUploader", "default_backend", "resolve_backend"]
