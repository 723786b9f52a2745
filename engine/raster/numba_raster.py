"""The `numba` CPU rasteriser: the reference's four passes (`torch_raster`) as two compiled loops.

Why: at the demo's 128 px the head's 17k triangles mostly cover a pixel or two, so the vectorised reference spends
its 10-13 ms a frame gathering per-triangle values for ~50k candidate pixels, not on arithmetic. A loop over the
faces tests each face's pixel-centre bounding box directly, and a loop over the covered pixels interpolates the
winner's attributes (its time per frame: `benchmarks/results/demo-cpu-stages.md`, "rasterise"). numba ships as
wheels (numba, llvmlite), so nothing needs a compiler at install time; the loops compile on first use (a few
seconds) and numba caches them beside this file for later processes.

The arithmetic is the reference's, operation for operation: the projection (`Camera.world_to_clip`, by torch in
float64), the edge functions with endpoints in the same fixed order (shared edges stay watertight), the inclusive
test at pixel centres, the perspective-correct depth packed with the face index into the same int64 key and the
nearest fragment kept (equal depths: the lower face index), then the winner's perspective-correct weights (float64,
rounded to float32) on its vertices' float32 attributes. On the demo's head the buffers equal the reference's bit
for bit; the stated contract (tests/test_raster_numba.py) is the reference's up to edge pixels (a compiler may round
a sum differently there) and float32 rounding of the interpolated values.

CPU only. `RasterWorkspace` keeps the per-pixel and per-face arrays between frames (one per thread).
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch

from ..errors import BackendError
from ..geometry import Camera, Mesh
from .torch_raster import W_EPS

try:
    import numba
except ImportError:  # the backend says what to install when chosen
    numba = None

_INVALID = np.iinfo(np.int64).max


def _kernel(sx, sy, w, faces, width, height, znear, zfar, best, abc):
    """Passes 1-3 of `torch_raster` for every face: `best` [H*W] int64 <- min over covering fragments of
    (float32 bits of Z) << 32 | face (`_INVALID` where none); `abc` [F, 9] <- each kept face's edge coefficients
    a (3), b (3), c (3) as `torch_raster._edge_coefficients` computes them (pass 4 needs them)."""
    best[:] = _INVALID
    ia, ib = (1, 2, 0), (2, 0, 1)
    X, Y, Z = np.empty(3), np.empty(3), np.empty(3)
    e = np.empty(3)
    for f in range(faces.shape[0]):
        for k in range(3):
            v = faces[f, k]
            X[k], Y[k], Z[k] = sx[v], sy[v], w[v]
        if min(Z[0], Z[1], Z[2]) <= W_EPS or max(Z[0], Z[1], Z[2]) < znear or min(Z[0], Z[1], Z[2]) > zfar:
            continue
        area2 = (X[1] - X[0]) * (Y[2] - Y[0]) - (Y[1] - Y[0]) * (X[2] - X[0])
        xmin, xmax = min(X[0], X[1], X[2]), max(X[0], X[1], X[2])
        ymin, ymax = min(Y[0], Y[1], Y[2]), max(Y[0], Y[1], Y[2])
        if abs(area2) <= 1e-12 or xmax < 0 or xmin > width - 1 or ymax < 0 or ymin > height - 1:
            continue
        flip = -1.0 if area2 < 0 else 1.0
        for k in range(3):
            ax, ay, bx, by = X[ia[k]], Y[ia[k]], X[ib[k]], Y[ib[k]]
            sign = flip
            if ax > bx or (ax == bx and ay > by):  # fixed endpoint order: shared edges evaluate identically
                ax, bx, ay, by = bx, ax, by, ay
                sign = -flip
            abc[f, k] = -(by - ay) * sign
            abc[f, 3 + k] = (bx - ax) * sign
            abc[f, 6 + k] = ((by - ay) * ax - (bx - ax) * ay) * sign
        x0, x1 = min(max(math.ceil(xmin), 0), width - 1), min(max(math.floor(xmax), 0), width - 1)
        y0, y1 = min(max(math.ceil(ymin), 0), height - 1), min(max(math.floor(ymax), 0), height - 1)
        for py in range(y0, y1 + 1):
            for px in range(x0, x1 + 1):
                for k in range(3):
                    e[k] = abc[f, k] * px + abc[f, 3 + k] * py + abc[f, 6 + k]
                if e[0] < 0 or e[1] < 0 or e[2] < 0:
                    continue
                s = e[0] + e[1] + e[2]
                depth = 1.0 / (e[0] / s / Z[0] + e[1] / s / Z[1] + e[2] / s / Z[2])
                if depth < znear or depth > zfar:
                    continue
                key = (np.int64(np.float32(depth).view(np.int32)) << 32) | f
                p = py * width + px
                if key < best[p]:
                    best[p] = key


def _interpolate_kernel(best, abc, faces, w, attrs, width, out):
    """Pass 4 of `torch_raster`: for each pixel with a winning face (`best` from `_kernel`), its screen-space
    barycentrics at the pixel centre, made perspective-correct (float64, then float32 like the reference), weight
    the face's vertex attributes `attrs` [V, A] float32 -> `out` [H*W, A] float32 (0 where no face)."""
    out[:] = 0
    pc = np.empty(3)
    for p in range(best.shape[0]):
        if best[p] == _INVALID:
            continue
        f = best[p] & 0xFFFFFFFF
        px, py = p % width, p // width
        e0 = abc[f, 0] * px + abc[f, 3] * py + abc[f, 6]
        e1 = abc[f, 1] * px + abc[f, 4] * py + abc[f, 7]
        e2 = abc[f, 2] * px + abc[f, 5] * py + abc[f, 8]
        s = e0 + e1 + e2
        pc[0], pc[1], pc[2] = e0 / s / w[faces[f, 0]], e1 / s / w[faces[f, 1]], e2 / s / w[faces[f, 2]]
        t = pc[0] + pc[1] + pc[2]
        q0, q1, q2 = np.float32(pc[0] / t), np.float32(pc[1] / t), np.float32(pc[2] / t)
        a0, a1, a2 = attrs[faces[f, 0]], attrs[faces[f, 1]], attrs[faces[f, 2]]
        for k in range(attrs.shape[1]):
            out[p, k] = q0 * a0[k] + q1 * a1[k] + q2 * a2[k]


_compiled = None


def _compiled_kernels():
    """`_kernel` compiled (once per process; numba's cache beside this file makes later processes fast)."""
    global _compiled
    if _compiled is not None:
        return _compiled
    if numba is None:
        raise BackendError("the numba raster backend needs numba: pip install numba (a wheel, no compiler needed); "
                           "or use raster backend 'torch'")
    jit = numba.njit(cache=True, nogil=True, error_model="numpy")
    _compiled = jit(_kernel), jit(_interpolate_kernel)
    return _compiled


class RasterWorkspace:
    """The per-pixel key buffer and per-face edge coefficients for meshes of F faces at one image size, reused
    frame after frame (every frame overwrites what it reads: nothing carries over between meshes)."""

    def __init__(self, faces: int, width: int, height: int):
        self.best = np.empty(width * height, dtype=np.int64)
        self.abc = np.zeros((faces, 9), dtype=np.float64)


_THREAD = threading.local()  # the kernels release the GIL: each thread has its own workspaces


def workspace(faces: int, width: int, height: int) -> RasterWorkspace:
    """This thread's workspace for a face count and image size (a few kept: new sizes do not grow memory)."""
    spaces = _THREAD.__dict__.setdefault("workspaces", {})
    key = (faces, width, height)
    space = spaces.get(key)
    if space is None:
        if len(spaces) >= 8:
            spaces.clear()
        space = spaces[key] = RasterWorkspace(faces, width, height)
    return space


@torch.no_grad()
def rasterize_numba(mesh: Mesh, camera: Camera, znear: float = 0.1, zfar: float = 2.0):
    """The `numba` backend of `engine.raster.rasterize` (CPU meshes): the reference's buffers, see the docstring."""
    from . import RasterBuffers

    if mesh.device.type != "cpu":
        raise BackendError(f"the numba raster backend runs on the CPU, the mesh is on {mesh.device}; use raster "
                           "backend 'torch' or 'nvdiffrast' there")
    nearest, interpolate = _compiled_kernels()
    H, W = camera.height, camera.width
    clip = camera.world_to_clip(mesh.vertices.to(torch.float64), znear, zfar)
    w = clip[:, 3]
    ws = torch.where(w > W_EPS, w, torch.ones_like(w))
    sx = (clip[:, 0] / ws + 1) * (W / 2) - 0.5
    sy = (clip[:, 1] / ws + 1) * (H / 2) - 0.5
    space = workspace(mesh.num_faces, W, H)
    faces = mesh.faces.contiguous().numpy()
    nearest(sx.numpy(), sy.numpy(), w.numpy(), faces, W, H, znear, zfar, space.best, space.abc)
    D = mesh.canonical_dims
    attrs = torch.cat([clip[:, 2:3].float(), mesh.canonical, mesh.vertex_normals()], dim=1)  # [V, 1 + D + 3]
    out = torch.empty(1, H, W, attrs.shape[1])
    interpolate(space.best, space.abc, faces, w.numpy(), attrs.numpy(), W, out.numpy().reshape(H * W, -1))
    mask = torch.from_numpy(space.best != _INVALID).view(1, H, W, 1).float()
    normals = torch.nn.functional.normalize(out[..., 1 + D :], dim=-1, eps=1e-12)
    return RasterBuffers(mask=mask, depth=out[..., :1], canonical=out[..., 1 : 1 + D], normals=normals)
