"""`Camera` and `Mesh`: the geometry a frame is rendered from, and the projection maths (model.md "Projection").

Conventions
-----------
- World: metres, **+y up**; a head faces **+z** (toward a camera placed on the +z axis).
- `Camera` pose is OpenCV's: `x_cam = R @ x_world + t`, camera axes x right, y down, z forward; intrinsics
  `fx, fy, cx, cy` in pixels with the centre of pixel column 0 at u = 0 (of row 0 at v = 0).
- Projection (the release's): the OpenCV pose is turned into an OpenGL view (y and z negated), and an OpenGL
  projection is built from the intrinsics with y flipped so that image row 0 is the top. With (X, Y, Z) the
  OpenCV camera coordinates, u = fx X/Z + cx and v = fy Y/Z + cy:

      clip = (x, y, z, w),  w = Z,
      NDC_x = x / w = 2 (u + 0.5) / W - 1,  NDC_y = y / w = 2 (v + 0.5) / H - 1,
      z = (f + n) / (f - n) Z - 2 f n / (f - n)   (-n at Z = n, f at Z = f; the "depth" channel).

  NDC -1 lies on the image's pixel edge, half a pixel from OpenCV's first pixel centre. Output image row r
  covers NDC_y in [2r/H - 1, 2(r+1)/H - 1] (nvdiffrast's convention), so row r's centre is v = r, and
  likewise column c's centre is u = c.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .errors import FormatError, InputError
from .files import atomic_path, read_npz
from .schema import is_finite_number

MESH_FORMAT_VERSION = 1

# OpenCV camera axes -> OpenGL camera axes (y up, looking down -z).
_CV_TO_GL = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))


def _as_tensor(value: Any, name: str, dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
    """`value` (tensor, ndarray or nested list of real numbers) as a tensor of `dtype`; keeps a tensor's device
    unless given one."""
    try:
        t = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
        if not t.is_complex():
            return t.to(dtype=dtype, device=device if device is not None else t.device)
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise InputError(f"{name} must be a tensor, array or list of numbers ({e})") from e
    raise InputError(f"{name} must hold real numbers, got {t.dtype} values")


def _check_finite(t: torch.Tensor, name: str, fix: str) -> None:
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(bad.sum()) - n_nan
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise InputError(f"{name} holds {n_nan} NaN and {n_inf} Inf values (first at index {first}); {fix}")


def _scalar(v: Any) -> Any:
    """A one-element tensor or array, or a numpy scalar, as a Python number; anything else unchanged."""
    return v.item() if isinstance(v, (torch.Tensor, np.ndarray, np.generic)) and math.prod(v.shape) == 1 else v


def _check_clip_range(znear: float, zfar: float) -> None:
    if not (math.isfinite(znear) and math.isfinite(zfar) and 0 < znear < zfar):
        raise InputError(f"need finite 0 < znear < zfar, got znear={znear}, zfar={zfar}; e.g. znear=0.1, zfar=2.0")


@dataclass(frozen=True, eq=False)
class Camera:
    """A pinhole camera, OpenCV convention (see the module docstring).

    Fields: `R` [3, 3] float32 CPU tensor (world -> camera rotation), `t` [3] float32 CPU tensor (world -> camera
    translation), `fx, fy, cx, cy` (pixels; pixel centres at integers), `width, height` (pixels). Numpy arrays and
    lists are accepted and converted.
    """

    R: torch.Tensor
    t: torch.Tensor
    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    def __post_init__(self):
        R = _as_tensor(self.R, "Camera.R", torch.float32, "cpu")
        t = _as_tensor(self.t, "Camera.t", torch.float32, "cpu")
        if R.shape != (3, 3):
            raise InputError(f"Camera.R must have shape [3, 3], got {list(R.shape)}; pass the world->camera rotation")
        if t.shape == (3, 1):
            t = t[:, 0]
        if t.shape != (3,):
            raise InputError(f"Camera.t must have shape [3], got {list(t.shape)}; pass the world->camera translation")
        _check_finite(R, "Camera.R", "pass a finite rotation")
        _check_finite(t, "Camera.t", "pass a finite translation")
        Rd = R.double()
        ortho_err = float((Rd @ Rd.T - torch.eye(3, dtype=torch.float64)).abs().max())
        if ortho_err > 1e-4:
            raise InputError(f"Camera.R is not a rotation (|R R^T - I| = {ortho_err:.2e} > 1e-4); pass an orthonormal "
                             "matrix (e.g. from Rodrigues or Camera.look_at), not a scaled or sheared one")
        det = float(torch.linalg.det(Rd))
        if det < 0:
            raise InputError(f"Camera.R has determinant {det:.3f} (a reflection); negate one axis so that det(R) = +1 "
                             "(OpenCV axes: x right, y down, z forward)")
        values = {"R": R, "t": t}
        for name in ("fx", "fy", "cx", "cy"):
            v = _scalar(getattr(self, name))
            if not is_finite_number(v):
                raise InputError(f"Camera.{name} must be a finite number of pixels, got {v!r}")
            values[name] = float(v)
        if values["fx"] <= 0 or values["fy"] <= 0:
            raise InputError(f"Camera focal lengths must be > 0 pixels, got fx={values['fx']}, fy={values['fy']}")
        for name in ("width", "height"):
            v = _scalar(getattr(self, name))
            if not is_finite_number(v) or not float(v).is_integer() or v <= 0:
                raise InputError(f"Camera.{name} must be a positive integer number of pixels, got {v!r}")
            values[name] = int(v)
        for name, v in values.items():
            object.__setattr__(self, name, v)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def look_at(
        cls, eye: Sequence[float] = (0.0, 0.0, 1.0), target: Sequence[float] = (0.0, 0.0, 0.0),
        up: Sequence[float] = (0.0, 1.0, 0.0), *, width: int = 512, height: int = 512, fov_deg: float = 20.0,
        fx: float | None = None, fy: float | None = None, cx: float | None = None, cy: float | None = None,
    ) -> "Camera":
        """A camera at `eye` (world, metres) looking at `target`, with world `up` (default +y) up in the image.

        Focal length: `fx` in pixels if given, else from `fov_deg`, the horizontal field of view; `fy` defaults to
        `fx` (square pixels); the principal point defaults to the image centre, cx = (W - 1) / 2, cy = (H - 1) / 2.
        The default, a camera at (0, 0, 1) looking at the origin, sees the face of a head facing +z.
        """
        eye_t = _as_tensor(eye, "eye", torch.float64, "cpu").reshape(-1)
        tgt_t = _as_tensor(target, "target", torch.float64, "cpu").reshape(-1)
        up_t = _as_tensor(up, "up", torch.float64, "cpu").reshape(-1)
        if eye_t.shape != (3,) or tgt_t.shape != (3,) or up_t.shape != (3,):
            raise InputError("look_at: eye, target and up must each have 3 values")
        forward = tgt_t - eye_t
        if float(forward.norm()) < 1e-9:
            raise InputError("look_at: eye and target coincide; put the camera somewhere else than its target")
        z = forward / forward.norm()
        down = -(up_t - (up_t @ z) * z)
        if float(down.norm()) < 1e-6 * max(float(up_t.norm()), 1e-30):
            raise InputError("look_at: `up` is parallel to the viewing direction; pick another up vector")
        y = down / down.norm()
        x = torch.linalg.cross(y, z)
        R = torch.stack([x, y, z])
        t = -R @ eye_t
        if fx is None:
            if not 0 < fov_deg < 180:
                raise InputError(f"look_at: fov_deg must be in (0, 180), got {fov_deg}")
            fx = 0.5 * width / math.tan(math.radians(fov_deg) / 2)
        return cls(R=R, t=t, fx=fx, fy=fx if fy is None else fy, cx=(width - 1) / 2 if cx is None else cx,
                   cy=(height - 1) / 2 if cy is None else cy, width=width, height=height)

    def scaled(self, width: int, height: int) -> "Camera":
        """The same camera rendering a `width` x `height` image (intrinsics scaled, pixel edges kept aligned)."""
        sx, sy = width / self.width, height / self.height
        return Camera(R=self.R, t=self.t, fx=self.fx * sx, fy=self.fy * sy, cx=(self.cx + 0.5) * sx - 0.5,
                      cy=(self.cy + 0.5) * sy - 0.5, width=width, height=height)

    # -- JSON ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: lists and plain numbers."""
        return {"R": self.R.tolist(), "t": self.t.tolist(), "fx": self.fx, "fy": self.fy, "cx": self.cx,
                "cy": self.cy, "width": self.width, "height": self.height}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Camera":
        if not isinstance(d, dict):
            raise FormatError(f"a camera must be a JSON object, got {type(d).__name__}")
        keys = ("R", "t", "fx", "fy", "cx", "cy", "width", "height")
        missing = [k for k in keys if k not in d]
        if missing:
            raise FormatError(f"camera is missing {missing}; a camera holds {list(keys)}")
        unknown = sorted(str(k) for k in set(d) - set(keys))
        if unknown:
            raise FormatError(f"camera has unknown key(s) {unknown}; a camera holds {list(keys)}")
        return cls(**{k: d[k] for k in keys})

    # -- maths -----------------------------------------------------------------------------------
    @property
    def center(self) -> torch.Tensor:
        """[3] float32: the camera's position in the world, -R^T t."""
        return -(self.R.T @ self.t)

    def view_matrix(self) -> torch.Tensor:
        """[4, 4] float64 CPU: the OpenGL world -> camera transform (OpenCV pose with y and z negated)."""
        M = torch.eye(4, dtype=torch.float64)
        M[:3, :3] = self.R.double()
        M[:3, 3] = self.t.double()
        return _CV_TO_GL @ M

    def projection(self, znear: float = 0.1, zfar: float = 2.0) -> torch.Tensor:
        """[4, 4] float64 CPU: the OpenGL projection (acting on OpenGL camera coordinates) of the module docstring."""
        _check_clip_range(znear, zfar)
        n, f, W, H = znear, zfar, self.width, self.height
        P = torch.zeros(4, 4, dtype=torch.float64)
        P[0, 0] = 2 * self.fx / W
        P[0, 2] = 1 - 2 * (self.cx + 0.5) / W
        # y flipped: image row 0 (the top) is NDC y = -1.
        P[1, 1] = -2 * self.fy / H
        P[1, 2] = 1 - 2 * (self.cy + 0.5) / H
        P[2, 2] = -(f + n) / (f - n)
        P[2, 3] = -2 * f * n / (f - n)
        P[3, 2] = -1.0
        return P

    def world_to_clip(self, points: torch.Tensor, znear: float = 0.1, zfar: float = 2.0) -> torch.Tensor:
        """Clip coordinates [V, 4] (x, y, z, w) of world points [V, 3], on the points' device.

        dtype: float64 for float64 points, else float32 (computed in float32).
        """
        if points.ndim != 2 or points.shape[-1] != 3:
            raise InputError(f"world_to_clip expects points of shape [V, 3], got {list(points.shape)}")
        dtype = torch.float64 if points.dtype == torch.float64 else torch.float32
        M = (self.projection(znear, zfar) @ self.view_matrix()).to(device=points.device, dtype=dtype)
        return points.to(dtype) @ M[:, :3].T + M[:, 3]

    def world_to_camera(self, points: torch.Tensor) -> torch.Tensor:
        """OpenCV camera coordinates [V, 3] of world points [V, 3] (same dtype as the points, float32 at least)."""
        dtype = torch.float64 if points.dtype == torch.float64 else torch.float32
        R = self.R.to(points.device, dtype)
        return points.to(dtype) @ R.T + self.t.to(points.device, dtype)

    def project(self, points: torch.Tensor) -> torch.Tensor:
        """OpenCV pixel coordinates (u, v) [V, 2] of world points [V, 3] (pixel centres at integers)."""
        X = self.world_to_camera(points)
        u = self.fx * X[:, 0] / X[:, 2] + self.cx
        v = self.fy * X[:, 1] / X[:, 2] + self.cy
        return torch.stack([u, v], dim=-1)

    def __repr__(self) -> str:
        c = [round(float(x), 4) for x in self.center]
        return (f"Camera(center={c}, fx={self.fx:.2f}, fy={self.fy:.2f}, cx={self.cx:.2f}, cy={self.cy:.2f}, "
                f"size={self.width}x{self.height})")


@dataclass(frozen=True, eq=False)
class Mesh:
    """A triangle mesh with per-vertex canonical coordinates.

    Fields (tensors on one device; numpy arrays and lists are accepted and converted):
    - `vertices` [V, 3] float32, world space, metres.
    - `faces` [F, 3] int64, counter-clockwise seen from outside (so face normals point out).
    - `canonical` [V, 3] or [V, 5] float32: canonical xyz, plus 2 ambient coordinates when 5-D.
    - `normals` [V, 3] float32 or None: world-space unit vertex normals; `vertex_normals()` computes them if None.
    """

    vertices: torch.Tensor
    faces: torch.Tensor
    canonical: torch.Tensor
    normals: torch.Tensor | None = field(default=None)

    def __post_init__(self):
        v = _as_tensor(self.vertices, "Mesh.vertices", torch.float32)
        dev = v.device
        is_float = self.faces.dtype.is_floating_point if isinstance(self.faces, torch.Tensor) else (
            np.asarray(self.faces).dtype.kind == "f")
        f = _as_tensor(self.faces, "Mesh.faces", torch.float64 if is_float else torch.int64, dev)
        if is_float and not bool((f == f.round()).all()):
            raise InputError("Mesh.faces must hold integer vertex indices, got non-integer values")
        f = f.to(torch.int64)
        c = _as_tensor(self.canonical, "Mesh.canonical", torch.float32, dev)
        n = None if self.normals is None else _as_tensor(self.normals, "Mesh.normals", torch.float32, dev)
        if v.ndim != 2 or v.shape[1] != 3:
            raise InputError(f"Mesh.vertices must have shape [V, 3], got {list(v.shape)}")
        V = v.shape[0]
        if V < 3:
            raise InputError(f"a mesh needs at least 3 vertices, got {V}; pass a non-empty mesh")
        if f.ndim != 2 or f.shape[1] != 3:
            raise InputError(f"Mesh.faces must have shape [F, 3] (triangles), got {list(f.shape)}")
        if f.shape[0] < 1:
            raise InputError("the mesh has no faces; pass at least one triangle")
        fmax, fmin = int(f.max()), int(f.min())
        if fmax >= V:
            raise InputError(f"faces index vertex {fmax} but the mesh has {V} vertices; "
                             f"faces must be 0-based indices below {V}")
        if fmin < 0:
            raise InputError(f"faces hold a negative index ({fmin}); faces must be 0-based indices in [0, {V})")
        if c.ndim != 2 or c.shape[1] not in (3, 5):
            raise InputError(f"Mesh.canonical must have shape [V, 3] or [V, 5] (xyz, or xyz + 2 ambient), "
                             f"got {list(c.shape)}")
        if c.shape[0] != V:
            raise InputError(f"Mesh.canonical has {c.shape[0]} rows but the mesh has {V} vertices; give one per vertex")
        if n is not None and n.shape != (V, 3):
            raise InputError(f"Mesh.normals must have shape [{V}, 3], got {list(n.shape)}")
        _check_finite(v, "Mesh.vertices", "fix the mesh (e.g. a head model that diverged) before rendering it")
        _check_finite(c, "Mesh.canonical", "fix the canonical coordinates before rendering the mesh")
        if n is not None:
            _check_finite(n, "Mesh.normals", "pass finite normals or normals=None to compute them")
        for name, val in (("vertices", v), ("faces", f), ("canonical", c), ("normals", n)):
            object.__setattr__(self, name, val)

    @classmethod
    def _unchecked(cls, vertices, faces, canonical, normals=None) -> "Mesh":
        obj = object.__new__(cls)
        for name, val in (("vertices", vertices), ("faces", faces), ("canonical", canonical), ("normals", normals)):
            object.__setattr__(obj, name, val)
        return obj

    # -- properties ------------------------------------------------------------------------------
    @property
    def num_vertices(self) -> int:
        return self.vertices.shape[0]

    @property
    def num_faces(self) -> int:
        return self.faces.shape[0]

    @property
    def canonical_dims(self) -> int:
        return self.canonical.shape[1]

    @property
    def device(self) -> torch.device:
        return self.vertices.device

    def __repr__(self) -> str:
        return (f"Mesh(V={self.num_vertices}, F={self.num_faces}, canonical_dims={self.canonical_dims}, "
                f"normals={'given' if self.normals is not None else 'computed'}, device={self.device})")

    # -- geometry --------------------------------------------------------------------------------
    def vertex_normals(self) -> torch.Tensor:
        """[V, 3] float32 unit world-space normals: `normals` if given, else area-weighted face normals summed per
        vertex (outward for counter-clockwise faces). A vertex on no (non-degenerate) face gets (0, 0, 0)."""
        if self.normals is not None:
            return self.normals
        return vertex_normals(self.vertices, self.faces)

    def with_vertices(self, vertices: torch.Tensor, normals: torch.Tensor | None = None) -> "Mesh":
        """The same topology and canonical coordinates with new vertex positions (a posed frame).

        Only shapes are checked (no host sync): this is the per-frame path of head models.
        """
        if vertices.shape != self.vertices.shape:
            raise InputError(f"with_vertices: expected vertices {list(self.vertices.shape)}, "
                             f"got {list(vertices.shape)}")
        if normals is not None and normals.shape != self.vertices.shape:
            raise InputError(f"with_vertices: expected normals {list(self.vertices.shape)}, got {list(normals.shape)}")
        vertices = vertices.to(device=self.device, dtype=torch.float32)
        normals = None if normals is None else normals.to(device=self.device, dtype=torch.float32)
        return Mesh._unchecked(vertices, self.faces, self.canonical, normals)

    def to(self, device: torch.device | str) -> "Mesh":
        """This mesh with every tensor on `device`."""
        n = None if self.normals is None else self.normals.to(device)
        return Mesh._unchecked(self.vertices.to(device), self.faces.to(device), self.canonical.to(device), n)

    # -- files -----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write an `.npz` with keys `vertices` [V,3] f32, `faces` [F,3] i64, `canonical` [V,3|5] f32, optional
        `normals` [V,3] f32, and `version` (int). Written to a temporary file, then renamed into place."""
        path = Path(path)
        if path.suffix != ".npz":
            raise InputError(f"mesh files are .npz; got {path.name!r}, name it e.g. {path.stem}.npz")
        tensors = {"vertices": self.vertices, "faces": self.faces, "canonical": self.canonical, "normals": self.normals}
        arrays = {k: t.detach().cpu().numpy() for k, t in tensors.items() if t is not None}
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, version=np.int64(MESH_FORMAT_VERSION), **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> "Mesh":
        """Read a mesh written by `save` (or any `.npz` with `vertices`, `faces`, `canonical`)."""
        path = Path(path)
        data = read_npz(path, "pass a mesh file written by Mesh.save (vertices, faces, canonical)")
        missing = [k for k in ("vertices", "faces", "canonical") if k not in data]
        if missing:
            raise FormatError(f"mesh file {str(path)!r} lacks {missing} (has {sorted(data)}); a mesh .npz holds "
                              "vertices [V,3], faces [F,3] and canonical [V,3|5]")
        version = int(data["version"]) if "version" in data else MESH_FORMAT_VERSION
        if version > MESH_FORMAT_VERSION:
            raise FormatError(f"mesh file {str(path)!r} has format version {version}, newer than this engine's "
                              f"({MESH_FORMAT_VERSION}); upgrade the engine")
        try:
            mesh = cls(data["vertices"], data["faces"], data["canonical"], data.get("normals"))
        except InputError as e:
            raise FormatError(f"mesh file {str(path)!r} holds an invalid mesh: {e}") from e
        return mesh.to(device)


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """[V, 3] unit area-weighted vertex normals of a triangle mesh (vertices [V, 3], faces [F, 3] int64)."""
    v = vertices.float()
    v0, v1, v2 = v[faces[:, 0]], v[faces[:, 1]], v[faces[:, 2]]
    fn = torch.linalg.cross(v1 - v0, v2 - v0)  # length = 2 * area: area-weighted
    acc = torch.zeros_like(v)
    for k in range(3):
        acc.index_add_(0, faces[:, k], fn)
    return torch.nn.functional.normalize(acc, dim=-1, eps=1e-20)
