"""The nvdiffrast backend: NVIDIA's CUDA rasteriser (`nvdiffrast.torch`), same outputs as the torch reference.

Install: `pip install diffrp-nvdiffrast` (it ships nvdiffrast's sources and JIT-builds them with the CUDA
toolkit and ninja on first use, then caches the build). Imported lazily: nothing here is needed on CPU.
Differences from the reference: nvdiffrast clips triangles that cross the near plane (the reference drops
triangles with a vertex behind the camera) and uses its own edge rule and fixed-point vertex snapping, so pixels
whose centre lies on or very near a triangle edge may differ.
"""

from __future__ import annotations

import sys
import threading

import torch

from ..errors import BackendError
from ..geometry import Camera, Mesh

_CONTEXTS: dict[torch.device, object] = {}
_LOCK = threading.Lock()

INSTALL_HINT = (
    "install it with `pip install diffrp-nvdiffrast` (or the cuda extra: `pip install -e '.[cuda]'`); it builds "
    "its CUDA sources on first use, so it needs nvcc and ninja; or use backend='torch'"
)


def _import_nvdiffrast():
    try:
        import nvdiffrast.torch as dr
    except ImportError as e:
        raise BackendError(
            f"the nvdiffrast raster backend needs nvdiffrast, which is not importable ({e}); {INSTALL_HINT}"
        ) from e
    return dr


def get_context(device: torch.device):
    """The `RasterizeCudaContext` of `device`, created once and cached (a constant handle, style rule 7)."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with _LOCK:
        ctx = _CONTEXTS.get(device)
        if ctx is None:
            dr = _import_nvdiffrast()
            try:
                try:
                    ctx = dr.RasterizeCudaContext(device=device)  # JIT-builds the plugin on first use
                except ModuleNotFoundError as e:
                    # Recent torch's `cpp_extension.load` builds and loads the plugin without putting its build
                    # folder on sys.path, and nvdiffrast (<= 0.3.3) then re-imports it by name: add the folder.
                    if not (e.name or "").startswith("nvdiffrast_plugin"):
                        raise
                    from torch.utils.cpp_extension import _get_build_directory

                    sys.path.append(_get_build_directory(e.name, False))
                    ctx = dr.RasterizeCudaContext(device=device)
            except Exception as e:  # build or driver failures surface here
                raise BackendError(
                    f"could not create nvdiffrast's CUDA context on {device} ({e}); {INSTALL_HINT}"
                ) from e
            _CONTEXTS[device] = ctx
    return ctx


def rasterize_nvdiffrast(mesh: Mesh, camera: Camera, znear: float = 0.1, zfar: float = 2.0):
    """The nvdiffrast backend of `engine.raster.rasterize` (same arguments and outputs)."""
    from . import RasterBuffers

    if mesh.device.type != "cuda":
        raise BackendError(
            f"the nvdiffrast raster backend needs the mesh on a CUDA device, it is on {mesh.device}; "
            "call mesh.to('cuda') first, or use backend='torch'"
        )
    dr = _import_nvdiffrast()
    ctx = get_context(mesh.device)
    H, W = camera.height, camera.width
    D = mesh.canonical_dims
    clip = camera.world_to_clip(mesh.vertices, znear, zfar).float().contiguous()  # [V, 4]
    tri = mesh.faces.to(torch.int32).contiguous()
    rast, _ = dr.rasterize(ctx, clip[None], tri, resolution=(H, W))  # [1, H, W, 4]: (u, v, z/w, face id + 1)
    attrs = torch.cat([clip[:, 2:3], mesh.canonical, mesh.vertex_normals()], dim=1)[None].contiguous()
    out, _ = dr.interpolate(attrs, rast, tri)  # [1, H, W, 1 + D + 3], perspective-correct, 0 off the mesh
    mask = (rast[..., 3:4] > 0).float()
    out = out * mask
    normals = torch.nn.functional.normalize(out[..., 1 + D :], dim=-1, eps=1e-12)
    return RasterBuffers(mask=mask, depth=out[..., :1], canonical=out[..., 1 : 1 + D], normals=normals)
