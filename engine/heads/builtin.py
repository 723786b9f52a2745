"""`builtin_head_mesh()`: a deterministic, head-shaped closed mesh generated from formulas (no files).

A subdivided icosahedron (uniform triangles, closed, counter-clockwise from outside) whose unit directions d are
mapped onto a skull-like ellipsoid with smooth radial bumps (nose, brow, cheeks, chin, ears), shallow eye
sockets and a neck stub. World space, metres, +y up, the face toward +z; about 0.20 m tall (y in about
[-0.105, 0.10]), 0.16 m wide, 0.21 m deep, centred near the origin, so `Camera.look_at(eye=(0, 0, 1))` sees the
face and the whole head lies well inside a camera's [0.1, 2] m depth range at 1 m.

Canonical coordinates (5-D): xyz = 4 * position (the NPHM scale: meshes in metres are NPHM space / 4), inside
model.md's normalisation box (-1, -1, -1.5)..(1, 1, 0.5); ambient = 0.15 * sin(...) of the direction, smooth,
non-constant, inside (-0.2, 0.2).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from ..errors import InputError
from ..geometry import Mesh

CANONICAL_SCALE = 4.0
NECK_RADIUS = 0.045


def _icosphere(subdivisions: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit-sphere vertices [V, 3] float64 and faces [F, 3] int64 (counter-clockwise from outside)."""
    p = (1 + 5**0.5) / 2
    v = np.array(
        [[-1, p, 0], [1, p, 0], [-1, -p, 0], [1, -p, 0], [0, -1, p], [0, 1, p],
         [0, -1, -p], [0, 1, -p], [p, 0, -1], [p, 0, 1], [-p, 0, -1], [-p, 0, 1]],
        dtype=np.float64,
    )
    f = np.array(
        [[0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11], [1, 5, 9], [5, 11, 4], [11, 10, 2],
         [10, 7, 6], [7, 1, 8], [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8], [3, 8, 9], [4, 9, 5], [2, 4, 11],
         [6, 2, 10], [8, 6, 7], [9, 8, 1]],
        dtype=np.int64,
    )
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    for _ in range(subdivisions):
        # One new vertex per unique edge, then split each face into 4 (orientation kept).
        e = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])  # [3F, 2]
        uniq, inv = np.unique(np.sort(e, axis=1), axis=0, return_inverse=True)
        mid = v[uniq[:, 0]] + v[uniq[:, 1]]
        mid /= np.linalg.norm(mid, axis=1, keepdims=True)
        m = inv.reshape(3, -1) + len(v)  # m[0]: edge (0,1), m[1]: (1,2), m[2]: (2,0) of each face
        a, b, c = f[:, 0], f[:, 1], f[:, 2]
        f = np.concatenate(
            [np.stack(t, 1) for t in ((a, m[0], m[2]), (b, m[1], m[0]), (c, m[2], m[1]), (m[0], m[1], m[2]))]
        )
        v = np.concatenate([v, mid])
    return v, f


def _bump(d: np.ndarray, centre, width: float, scale=(1.0, 1.0, 1.0)) -> np.ndarray:
    """A smooth Gaussian bump on the unit sphere around direction `centre` (anisotropic through `scale`)."""
    c = np.asarray(centre, dtype=np.float64)
    c /= np.linalg.norm(c)
    diff = (d - c) / np.asarray(scale)
    return np.exp(-(diff**2).sum(1) / (2 * width**2))


def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


@lru_cache(maxsize=4)
def _head_arrays(subdivisions: int):
    d, faces = _icosphere(subdivisions)
    x, y, z = d[:, 0], d[:, 1], d[:, 2]
    # Radial displacement (metres) of the skull ellipsoid.
    disp = (
        0.024 * _bump(d, (0, -0.05, 1), 0.09, (1.6, 0.7, 1))  # nose (narrow, longer than wide)
        + 0.007 * _bump(d, (0, 0.32, 1), 0.16, (0.45, 1.6, 1))  # brow ridge
        + 0.006 * _bump(d, (0.55, -0.2, 0.8), 0.15) + 0.006 * _bump(d, (-0.55, -0.2, 0.8), 0.15)  # cheeks
        + 0.010 * _bump(d, (0, -0.62, 0.78), 0.14, (1.3, 1, 1))  # chin
        + 0.004 * _bump(d, (0, -0.33, 1), 0.06, (2.2, 0.6, 1))  # lips
        - 0.008 * _bump(d, (0.33, 0.1, 0.94), 0.09) - 0.008 * _bump(d, (-0.33, 0.1, 0.94), 0.09)  # eye sockets
        + 0.012 * _bump(d, (1, 0.0, -0.1), 0.10, (1, 1.3, 0.6)) + 0.012 * _bump(d, (-1, 0.0, -0.1), 0.10, (1, 1.3, 0.6))
    )
    semi = np.array([0.074, 0.088, 0.092])  # skull ellipsoid semi-axes (x width, y height, z depth)
    pos = d * semi + d * disp[:, None]
    # Neck stub: below the jaw each ring of constant d_y blends into a ring of a cylinder (radius NECK_RADIUS)
    # that ends in a flat disc. y stays monotonic in d_y and each ring star-shaped, so nothing folds over.
    s = _smoothstep(-0.55, -0.8, y)[:, None]
    rho = np.sqrt(np.clip(1 - y**2, 0, None))
    unit = np.stack([x, z], 1) / np.maximum(rho, 1e-12)[:, None]
    r = NECK_RADIUS * np.sqrt(np.clip(rho / 0.45, 0, 1))
    neck = np.stack(
        [r * unit[:, 0], -0.06 - 0.05 * _smoothstep(-0.7, -0.9, y), 0.9 * r * unit[:, 1] - 0.015], 1
    )
    pos = (1 - s) * pos + s * neck
    pos[:, 1] += 0.012  # centre the bounding box near the origin
    canonical = np.concatenate(
        [
            CANONICAL_SCALE * pos,
            0.15 * np.sin(np.stack([2.5 * x + 0.8 * z, 2.5 * y - 1.2 * z + 0.3], 1)),
        ],
        axis=1,
    )
    return pos.astype(np.float32), faces, canonical.astype(np.float32)


def builtin_head_mesh(subdivisions: int = 4) -> Mesh:
    """The built-in head (see the module docstring): 20 * 4**subdivisions triangles (5,120 by default), 5-D
    canonical coordinates, vertex normals precomputed. Deterministic; CPU tensors."""
    if not isinstance(subdivisions, int) or not 0 <= subdivisions <= 7:
        raise InputError(f"subdivisions must be an integer in [0, 7], got {subdivisions!r}")
    pos, faces, canonical = _head_arrays(subdivisions)
    mesh = Mesh(torch.from_numpy(pos.copy()), torch.from_numpy(faces.copy()), torch.from_numpy(canonical.copy()))
    return Mesh(mesh.vertices, mesh.faces, mesh.canonical, normals=mesh.vertex_normals())
