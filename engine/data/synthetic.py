"""The synthetic head: a procedural, rigged, textured head that stands in for NPHM + real video.

`SyntheticHead` is a `HeadModel` (`load_head_model("synthetic")`): `posed_mesh(code)` poses the rest mesh of
`synthetic_mesh.head_geometry()` with an 8-D expression rig named after ARKit blendshapes (`ARKIT8`, the `tiny`
preset's code, so any ARKit tracker drives it), and `render(camera, code)` gives its ground-truth picture
(`synthetic_look`). The avatar pipeline sees only what it would see with real data: a mesh whose canonical
coordinates stay fixed while its vertices move (a forward deformation), rasterised from a camera.

The rig (codes in [0, 1]; each a smooth displacement field of the rest position, zero outside its region):
- jawOpen: the chin, lower lip, the mouth pocket's floor and the lower teeth rotate 17 deg about a jaw axis
  near the ears, with weights that fall to 0 at the mouth corners and on the neck;
- mouthSmileLeft / Right: that mouth corner up, out and back, the cheek above it a little up;
- browInnerUp: the inner ends of both brows up;
- eyeBlinkLeft / Right: that upper eyelid slides down over the eye until its edge passes the lower lid's;
- mouthPucker: the lips forward and toward the middle;
- cheekPuff: both cheeks outward.
Left/right are the subject's: the left eye is on +x (the image's right in a frontal view).

Cameras (`engine.orbit.orbit_camera`, all looking at the head centre, the origin): `default_camera(size)` (frontal,
1 m, 16 deg field of view: the head and neck fill most of the frame) and `default_rig_cameras(n, size)` (a fixed
spread over yaw +-45 deg, pitch +-20 deg).

`SYNTHETIC_VERSION` changes whenever the generator's output does; data and avatars record it, and
`check_synthetic_version` refuses a mismatch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from ..config import ARKIT8
from ..errors import ConfigError, InputError
from ..geometry import Camera, Mesh, vertex_normals
from ..orbit import DEFAULT_FOV_DEG, orbit_camera
from .synthetic_look import DetailField, render_mesh
from .synthetic_mesh import CAVITY, EYE_CENTRES, LID_TOP, SKIN, TEETH, Y_MOUTH, _smoothstep, head_geometry, lid_edges

SYNTHETIC_VERSION = 1
JAW_ANGLE = math.radians(17.0)
JAW_PIVOT = (0.0, 0.005, -0.02)


def _region(p: np.ndarray, centre, radii, core: float = 0.35) -> np.ndarray:
    """Smooth weight [N]: 1 within `core` of the ellipsoid (centre, radii), falling to exactly 0 at its surface."""
    r = np.linalg.norm((p - np.asarray(centre)) / np.asarray(radii), axis=1)
    return _smoothstep(1.0, core, r)


@dataclass(frozen=True)
class _Rig:
    rest: Mesh  # the rest pose (vertices [V, 3], faces, canonical [V, 5]), validated once
    linear: torch.Tensor  # [8, V, 3] float32: displacement at code 1 of the linear dimensions (0 for the others)
    jaw_weight: torch.Tensor  # [V] float32
    lids: tuple  # per eye: (vertex index [L], azimuth [L], elevation [L], radius [L], edge [L], closed edge [L])


@lru_cache(maxsize=1)
def _rig() -> _Rig:
    g = head_geometry()
    p, part = g.vertices, g.part
    x, y, z = p.T
    soft = (part == SKIN) | (part == CAVITY)
    xc = g.mouth_half_width
    lip_front = float(p[(np.abs(y - Y_MOUTH) < 1e-9) & (np.abs(x) < 1e-9) & (z > 0), 2].max())
    corner_z = float(p[(np.abs(y - Y_MOUTH) < 1e-9) & (np.abs(np.abs(x) - xc) < 1e-6) & (z > 0), 2].max())
    linear = np.zeros((len(ARKIT8), len(p), 3))
    for k, s in ((1, 1.0), (2, -1.0)):  # mouthSmileLeft / Right
        w = _region(p, (s * xc, Y_MOUTH, corner_z), (0.024, 0.022, 0.026))
        cheek = _region(p, (s * 0.04, -0.015, corner_z - 0.01), (0.02, 0.018, 0.025))
        linear[k] = w[:, None] * [s * 0.004, 0.0065, -0.004] + cheek[:, None] * [0.0, 0.003, 0.0015]
    for s in (1.0, -1.0):  # browInnerUp
        linear[3] += _region(p, (s * 0.018, 0.044, 0.08), (0.022, 0.016, 0.04))[:, None] * [0.0, 0.0065, 0.0]
    w = _region(p, (0.0, Y_MOUTH, lip_front), (0.036, 0.024, 0.03), core=0.45)  # mouthPucker
    linear[6] = w[:, None] * np.stack([-0.4 * x, 0.0 * x, np.full_like(x, 0.009)], 1)
    for s in (1.0, -1.0):  # cheekPuff
        out = np.array([s * 0.9, 0.0, 0.45]) / math.hypot(0.9, 0.45)
        linear[7] += _region(p, (s * 0.045, -0.03, 0.045), (0.03, 0.03, 0.04), core=0.0)[:, None] * out * 0.011
    linear *= soft[None, :, None]
    # Jaw weights: full on the chin; at the lip line only between the corners; none on the neck or skull.
    middle = _smoothstep(xc, 0.55 * xc, np.abs(x)) * _smoothstep(0.03, 0.06, z)
    wide = _smoothstep(-0.035, 0.015, z) * _smoothstep(0.08, 0.05, np.abs(x))
    # below the jaw line (chin bottom back to the jaw angle under the ear) the skin only stretches
    neck = _smoothstep(-0.015, 0.005, y - (-0.077 - 0.293 * (z - 0.05)))
    jaw = np.where(g.jaw_side & (part == SKIN),
                   (middle + (wide - middle) * _smoothstep(0.0, 0.02, Y_MOUTH - y)) * neck, 0.0)
    on_pocket = part == CAVITY
    jaw[on_pocket] = middle[on_pocket] * _smoothstep(0.3, 0.7, g.pocket_t[on_pocket])
    lower_teeth = (part == TEETH) & g.jaw_side
    jaw[lower_teeth] = middle[lower_teeth]
    lids = []
    for i, centre in enumerate(EYE_CENTRES):
        idx = np.nonzero((g.lid_eye == i) & g.lid_upper)[0]
        a, e = g.lid_angles[idx].T
        up, lo = lid_edges(a, float(np.sign(centre[0])))
        radius = np.linalg.norm(p[idx] - centre, axis=1)
        lids.append(tuple(torch.tensor(t) for t in (idx, a, e, radius, up, lo - 0.06)))
    f32 = torch.float32
    rest = Mesh(torch.tensor(p, dtype=f32), torch.tensor(g.faces), torch.tensor(g.canonical, dtype=f32))
    return _Rig(rest, torch.tensor(linear, dtype=f32), torch.tensor(jaw, dtype=f32), tuple(lids))


def _blink(lid: tuple, amount: torch.Tensor, centre: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(vertex index, new position [L, 3]) of one upper lid: its elevations remapped so the edge moves from the
    open position toward the closed one by `amount` while the lid's top stays put."""
    idx, a, e, radius, edge, closed = lid
    target = edge + amount.double() * (closed - edge)
    e_new = LID_TOP - (LID_TOP - e) * (LID_TOP - target) / (LID_TOP - edge)
    d = torch.stack([torch.cos(e_new) * torch.sin(a), torch.sin(e_new), torch.cos(e_new) * torch.cos(a)], 1)
    return idx, (torch.as_tensor(centre) + radius[:, None] * d).float()


def _as_code(expression: Any) -> torch.Tensor:
    n = len(ARKIT8)
    if expression is None:
        return torch.zeros(n)
    try:
        code = torch.as_tensor(np.asarray(expression.detach().cpu() if isinstance(expression, torch.Tensor)
                                          else expression, dtype=np.float64), dtype=torch.float32).reshape(-1)
    except (TypeError, ValueError) as e:
        raise InputError(f"the synthetic head's expression must be {n} numbers ({', '.join(ARKIT8)}): {e}") from e
    if code.numel() != n:
        raise InputError(f"the synthetic head's expression has {n} values ({', '.join(ARKIT8)}), got "
                         f"{code.numel()}; pass one value in [0, 1] per ARKit blendshape")
    if not bool(torch.isfinite(code).all()):
        raise InputError("the synthetic head's expression holds NaN or Inf; pass finite values in [0, 1]")
    return code.clamp(0, 1)


class SyntheticHead:
    """The procedural head as a `HeadModel` (see the module docstring). Cheap to construct: the rest mesh and
    rig fields are computed once per process and shared."""

    name = "synthetic"
    version = SYNTHETIC_VERSION
    expression_names = ARKIT8
    expression_dim = len(ARKIT8)
    code_range = (0.0, 1.0)  # `posed_mesh` clamps to it (the renderer clamps the tokens' code the same way)

    def __init__(self):
        self._rig = _rig()

    def neutral_mesh(self) -> Mesh:
        """The rest pose (code all zero)."""
        return self.posed_mesh(None)

    def posed_mesh(self, expression: torch.Tensor | None = None) -> Mesh:
        """The head posed by `expression` ([8] float32 in [0, 1], ARKIT8 order; values outside are clamped;
        None = neutral) -> `Mesh` (CPU; vertices [V, 3] metres, canonical [V, 5] constant, normals computed)."""
        rig, code = self._rig, _as_code(expression)
        rest = rig.rest.vertices
        v = rest + torch.einsum("k,kvc->vc", code, rig.linear)
        if code[0] > 0:
            angle = JAW_ANGLE * code[0] * rig.jaw_weight
            q = rest - torch.tensor(JAW_PIVOT)
            c, s = torch.cos(angle) - 1, torch.sin(angle)
            # rotation about +x by `angle` (positive moves the chin down), as a displacement
            v = v + torch.stack([torch.zeros_like(c), c * q[:, 1] - s * q[:, 2], s * q[:, 1] + c * q[:, 2]], 1)
        for k, lid, centre in ((4, rig.lids[0], EYE_CENTRES[0]), (5, rig.lids[1], EYE_CENTRES[1])):
            if code[k] > 0:
                idx, pos = _blink(lid, code[k], centre)
                v[idx] = pos + (v[idx] - rest[idx])
        return rig.rest.with_vertices(v, vertex_normals(v, rig.rest.faces))

    def render(self, camera: Camera, expression: torch.Tensor | None = None, supersample: int = 2,
               detail: DetailField | None = None, psf: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Ground truth: rgb [H, W, 3] float32 in [0, 1] over a white background and alpha [H, W] float32 in
        [0, 1] (CPU) at the camera's resolution, anti-aliased by rendering `supersample` x larger; `detail`: the
        frame's fine texture (`synthetic_look.DetailField`), none by default; `psf`: the standard deviation in
        pixels of a Gaussian point-spread blurring rgb, as a camera's optics do (0: none)."""
        if not isinstance(camera, Camera):
            raise InputError(f"render needs an engine.geometry.Camera, got {type(camera).__name__}")
        if not isinstance(supersample, int) or not 1 <= supersample <= 8:
            raise InputError(f"supersample must be an integer in [1, 8], got {supersample!r}")
        if detail is not None and not isinstance(detail, DetailField):
            raise InputError(f"detail must be an engine.data.synthetic_look.DetailField, got {type(detail).__name__}")
        return render_mesh(self.posed_mesh(expression), camera, supersample, detail, check_psf(psf))

    def __repr__(self) -> str:
        rest = self._rig.rest
        return f"SyntheticHead(version={self.version}, V={rest.num_vertices}, F={rest.num_faces})"


def check_psf(psf: Any) -> float:
    """A point-spread's standard deviation in pixels, checked: a number in [0, 8]."""
    if isinstance(psf, bool) or not isinstance(psf, (int, float)) or not 0 <= psf <= 8:
        raise InputError(f"psf must be a blur in pixels in [0, 8], got {psf!r}")
    return float(psf)


def check_synthetic_version(found: Any, source: str) -> None:
    """Raise ConfigError unless `found` (from `source`, e.g. a dataset or avatar config) is SYNTHETIC_VERSION."""
    try:
        ok = int(found) == SYNTHETIC_VERSION and float(found) == int(found)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"{source} was made with synthetic head version {found!r}, but this engine's generator is "
                          f"version {SYNTHETIC_VERSION}; regenerate the data / retrain the avatar with this version, "
                          f"or use the engine release that has version {found!r}")


def synthetic_head(argument: str = "") -> SyntheticHead:
    """The head model of a `synthetic[:<version>]` spec (the registry's factory); a version other than
    SYNTHETIC_VERSION raises ConfigError."""
    if argument.strip():
        check_synthetic_version(argument.strip(), "the avatar (head model 'synthetic:" + argument.strip() + "')")
    return SyntheticHead()


# -- cameras ---------------------------------------------------------------------------------------------
def default_camera(size: int = 128, distance: float = 1.0, fov_deg: float = DEFAULT_FOV_DEG) -> Camera:
    """The frontal camera (on +z, looking at the head centre)."""
    return orbit_camera(size=size, distance=distance, fov_deg=fov_deg)


def default_rig_cameras(n: int = 12, size: int = 128, distance: float = 1.0, fov_deg: float = DEFAULT_FOV_DEG,
                        max_yaw_deg: float = 45.0, max_pitch_deg: float = 20.0) -> list[Camera]:
    """`n` fixed cameras spread over a sphere cap (yaw within +-max_yaw_deg, pitch within +-max_pitch_deg),
    all looking at the head centre. Deterministic: the first is frontal, the others a Fibonacci lattice (yaw
    evenly spaced, pitch by the golden ratio) so that any n covers the cap evenly."""
    if not isinstance(n, int) or n < 1:
        raise InputError(f"default_rig_cameras needs n >= 1 cameras, got {n!r}")
    cams = [default_camera(size, distance, fov_deg)]
    for j in range(n - 1):
        u, v = (j + 0.5) / (n - 1), (0.5 + j * 0.6180339887498949) % 1.0
        cams.append(orbit_camera((2 * u - 1) * max_yaw_deg, (2 * v - 1) * max_pitch_deg, size=size, distance=distance,
                                 fov_deg=fov_deg))
    return cams


__all__ = ["SYNTHETIC_VERSION", "SyntheticHead", "check_synthetic_version", "default_camera",
           "default_rig_cameras", "synthetic_head"]
