"""The neutral geometry of the synthetic head: a closed head shell with a mouth pocket, eyeballs, eyelids, teeth.

World space, metres, +y up, the face toward +z; about 0.24 m tall with the neck (y in [-0.12, 0.12]), centred
near the origin. Components, each a closed, consistently oriented triangle mesh (outward normals):
- skin shell: a latitude-longitude grid around a point behind the mouth, each vertex put on the outermost
  surface of a signed distance function (smooth union of ellipsoids: skull, face, chin, cheeks, brow, nose,
  lips, ears, a neck cut flat at the bottom; eye sockets carved out). The grid row through the ray origin is the
  mouth line: between the mouth corners its vertices are split into an upper-lip and a lower-lip edge joined by
  a pocket of extra rows that folds back into the head (the mouth cavity). At rest both lip edges coincide, so
  the mouth is closed; opening the jaw parts them and shows the pocket and the teeth inside it.
- two eyeballs (spheres) set into spherical pits in the sockets.
- four eyelids: thin closed slabs on spheres just outside each eyeball, covering the pit except an
  almond-shaped opening; a blink slides the upper lid's edge down over the opening.
- upper and lower teeth: thin closed slabs along the dental arch, inside the pocket.

Per-vertex canonical coordinates (5-D): xyz = 4 x the rest position (NPHM scale), ambient 0 = a part code
(skin 0, eyelid 0.04, eyeball 0.08, teeth -0.08, mouth cavity -0.14; separates inner surfaces from skin at
the same xyz), ambient 1 = an upper/lower coordinate (+ upper lip, upper teeth, upper lids; - lower ones; 0
elsewhere; separates the two lips, which share xyz at rest).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

CANONICAL_SCALE = 4.0
Y_MOUTH = -0.040
RAY_ORIGIN = np.array([0.0, Y_MOUTH, -0.010])  # on the mouth line's height, so grid row theta = 90 deg is it
MOUTH_HALF_WIDTH = 0.024
EYE_CENTRES = np.array([[0.032, 0.021, 0.064], [-0.032, 0.021, 0.064]])  # [left (+x), right]
EYE_RADIUS = 0.0125
PIT_RADIUS = 0.0126
# Eyelid slabs (inner, outer radius): the upper lid lies outside the lower one, so it can close over it.
LID_RADII = {"lower": (0.0127, 0.0131), "upper": (0.0133, 0.0138)}
LID_OPEN_UP, LID_OPEN_DOWN, LID_CORNER = math.radians(26.0), math.radians(19.0), math.radians(62.0)
LID_TILT = math.radians(5.0)  # outer corner higher than the inner one
LID_TOP, LID_BOTTOM, LID_SIDE = math.radians(80.0), math.radians(-80.0), math.radians(105.0)

# Part codes: ambient coordinate 0 of each part.
PART_CODES = {"skin": 0.0, "lid": 0.04, "eyeball": 0.08, "teeth": -0.08, "cavity": -0.14}
SKIN, LID, EYEBALL, TEETH, CAVITY = range(5)
PART_NAMES = ("skin", "lid", "eyeball", "teeth", "cavity")


# -- signed distance function of the head --------------------------------------------------------------------
def _ell(p, c, r):
    """Approximate signed distance to an axis-aligned ellipsoid (centre c, semi-axes r)."""
    q = (p - np.asarray(c)) / np.asarray(r)
    k0 = np.linalg.norm(q, axis=-1)
    k1 = np.linalg.norm(q / np.asarray(r), axis=-1)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-12)


def _smin(a, b, k):
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b * (1 - h) + a * h - k * h * (1 - h)


def _smax(a, b, k):
    return -_smin(-a, -b, k)


def _round_cone(p, a, b, r1, r2):
    """Signed distance to a cone with spherical ends (radius r1 at a, r2 at b)."""
    a, b = np.asarray(a), np.asarray(b)
    ba = b - a
    L = np.linalg.norm(ba)
    t = np.clip(((p - a) @ ba) / L**2, 0.0, 1.0)
    r = r1 + (r2 - r1) * t
    return np.linalg.norm(p - (a + t[..., None] * ba), axis=-1) - r


def head_sdf(p: np.ndarray) -> np.ndarray:
    """Signed distance (metres, negative inside) of the head surface at points p [..., 3] float64."""
    d = _smin(_ell(p, (0, 0.035, -0.012), (0.074, 0.085, 0.098)), _ell(p, (0, -0.022, 0.008), (0.058, 0.056, 0.078)),
              0.02)  # skull + face
    d = _smin(d, _ell(p, (0, -0.060, 0.052), (0.024, 0.017, 0.026)), 0.012)  # chin
    for s in (1, -1):
        d = _smin(d, _ell(p, (s * 0.042, 0.0, 0.048), (0.024, 0.018, 0.025)), 0.022)  # cheekbones
        d = _smin(d, _ell(p, (s * 0.074, 0.005, -0.018), (0.011, 0.029, 0.017)), 0.006)  # ears
    d = _smin(d, _ell(p, (0, 0.042, 0.066), (0.056, 0.013, 0.02)), 0.01)  # brow ridge
    side = np.linalg.norm(np.stack([p[..., 0], (p[..., 2] + 0.012) * 0.048 / 0.052], -1), axis=-1) - 0.048
    neck = np.maximum(_smax(side, -0.12 - p[..., 1], 0.006), p[..., 1] + 0.01)
    d = _smin(d, neck, 0.02)
    nose = _round_cone(p, (0, 0.024, 0.080), (0, -0.010, 0.100), 0.0055, 0.0085)
    nose = _smin(nose, np.linalg.norm(p - np.array([0, -0.011, 0.099]), axis=-1) - 0.0105, 0.004)
    for s in (1, -1):
        nose = _smin(nose, np.linalg.norm(p - np.array([s * 0.0125, -0.016, 0.088]), axis=-1) - 0.0075, 0.004)
    d = _smin(d, nose, 0.006)
    d = _smin(d, _ell(p, (0, -0.0345, 0.079), (0.025, 0.0065, 0.011)), 0.006)  # upper lip
    d = _smin(d, _ell(p, (0, -0.0465, 0.077), (0.022, 0.0072, 0.011)), 0.006)  # lower lip
    for e in EYE_CENTRES:
        d = _smax(d, -_ell(p, e + (0, 0.003, 0.014), (0.021, 0.013, 0.011)), 0.008)  # socket
        d = _smax(d, -(np.linalg.norm(p - e, axis=-1) - PIT_RADIUS), 0.0015)  # eyeball pit
    return d


def _cast(directions: np.ndarray, origin: np.ndarray, t_max: float = 0.26, steps: int = 72) -> np.ndarray:
    """Distance along each unit direction [N, 3] from `origin` to the outermost crossing of `head_sdf`."""
    ts = np.linspace(t_max, 0.0, steps)
    sd = head_sdf(origin + ts[None, :, None] * directions[:, None, :])  # [N, steps], far to near
    inside = sd < 0
    if not inside.any(1).all():
        raise RuntimeError("synthetic head: a ray from the origin misses the surface (the origin is outside)")
    k = inside.argmax(1)  # first sample inside, coming from outside
    hi, lo = ts[k - 1], ts[k]  # hi outside, lo inside
    for _ in range(24):
        mid = 0.5 * (hi + lo)
        out = head_sdf(origin + mid[:, None] * directions) > 0
        hi, lo = np.where(out, mid, hi), np.where(out, lo, mid)
    return 0.5 * (hi + lo)


# -- topology helpers ------------------------------------------------------------------------------------
def _strip(top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    """Triangles [2 (n-1), 3] between two index rows [n] (columns left to right, `bottom` below `top` seen from
    the front), counter-clockwise; triangles that repeat an index (at poles and collapsed corners) dropped."""
    a, b, c, d = top[:-1], top[1:], bottom[1:], bottom[:-1]
    f = np.concatenate([np.stack([a, d, c], 1), np.stack([a, c, b], 1)])
    return f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 0] != f[:, 2])]


def _signed_volume(v: np.ndarray, f: np.ndarray) -> float:
    return float(np.einsum("ij,ij->i", v[f[:, 0]], np.cross(v[f[:, 1]], v[f[:, 2]])).sum() / 6)


def _outward(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    """`f` with every triangle flipped if the closed mesh (v, f) encloses a negative volume."""
    return f if _signed_volume(v, f) > 0 else f[:, ::-1].copy()


def _slab(outer: np.ndarray, inner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A closed thin slab from two matching point grids [n, m, 3] (its two faces) joined along their border.

    Returns vertices [2 n m, 3] (outer grid first, row-major) and outward faces.
    """
    n, m = outer.shape[:2]
    ids = np.arange(n * m).reshape(n, m)
    f_out = np.concatenate([_strip(ids[i], ids[i + 1]) for i in range(n - 1)])
    f_in = f_out[:, ::-1] + n * m
    ring = np.concatenate([ids[0, :], ids[1:, -1], ids[-1, -2::-1], ids[-2:0:-1, 0], ids[:1, 0]])
    f_rim = _strip(ring, ring + n * m)
    v = np.concatenate([outer.reshape(-1, 3), inner.reshape(-1, 3)])
    # The rim's winding must match the sheets': each directed edge once. Try both and keep the consistent one.
    for rim in (f_rim, f_rim[:, ::-1]):
        f = np.concatenate([f_out, f_in, rim])
        e = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
        if len(np.unique(e, axis=0)) == len(e):
            return v, _outward(v, f)
    raise RuntimeError("synthetic head: could not orient a slab")


def _warped_angles(n: int, lo: float, hi: float, density, endpoint: bool) -> np.ndarray:
    """n angles in [lo, hi] spaced by the inverse cumulative of `density` (denser where it is larger)."""
    x = np.linspace(lo, hi, 4001)
    cdf = np.concatenate([[0], np.cumsum(0.5 * (density(x[1:]) + density(x[:-1])) * np.diff(x))])
    q = np.linspace(0, 1, n) if endpoint else np.arange(n) / n
    return np.interp(q * cdf[-1], cdf, x)


# -- components ------------------------------------------------------------------------------------------
N_ROWS, N_COLS, POCKET_ROWS = 74, 88, 12
POCKET_DEPTH, POCKET_HEIGHT = 0.036, 0.017


@dataclass(frozen=True)
class HeadGeometry:
    """The rest-pose head and what the rig needs to know about each vertex (numpy, float64 unless noted).

    vertices [V, 3], faces [F, 3] int64, canonical [V, 5]; part [V] int64 (SKIN, LID, EYEBALL, TEETH, CAVITY);
    jaw_side [V] bool (moves with the jaw: skin below the mouth line, the pocket's lower half, lower teeth);
    pocket_t [V] (0 at the upper lip edge ... 1 at the lower; NaN off the pocket); lid_eye [V] int64 (0 left,
    1 right, -1 not a lid), lid_upper [V] bool, lid_angles [V, 2] (azimuth, elevation about the eye centre,
    radians; 0 off the lids); mouth_half_width (m); components: (first, end) vertex ranges, one per closed part.
    """

    vertices: np.ndarray
    faces: np.ndarray
    canonical: np.ndarray
    part: np.ndarray
    jaw_side: np.ndarray
    pocket_t: np.ndarray
    lid_eye: np.ndarray
    lid_upper: np.ndarray
    lid_angles: np.ndarray
    mouth_half_width: float
    components: tuple[tuple[int, int], ...]


def _smoothstep(e0, e1, x):
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _sphere_dirs(theta: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """[len(theta), len(phi), 3] unit directions, polar axis +y, phi = 0 toward +z and phi > 0 toward +x."""
    t, p = np.meshgrid(theta, phi, indexing="ij")
    return np.stack([np.sin(t) * np.sin(p), np.cos(t), np.sin(t) * np.cos(p)], -1)


def _latlong_faces(n_rows: int, n_cols: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Faces of a closed latitude-longitude sphere: vertex 0 the top pole, then n_rows x n_cols, then the bottom
    pole. Returns the index grid [n_rows, n_cols] and the list of per-strip faces (top pole strip first)."""
    ids = 1 + np.arange(n_rows * n_cols).reshape(n_rows, n_cols)
    wrap = np.concatenate([ids, ids[:, :1]], 1)
    bottom = np.full(n_cols + 1, 1 + n_rows * n_cols)
    rows = [np.zeros(n_cols + 1, np.int64), *wrap, bottom]
    return ids, [_strip(rows[i], rows[i + 1]) for i in range(len(rows) - 1)]


def _shell():
    """Skin shell with the mouth pocket: (vertices, faces, jaw_side, pocket_t, side_coord, mouth_half_width)."""
    theta = _warped_angles(N_ROWS + 2, 0.0, np.pi, lambda t: 1 + 1.8 * np.exp(-(((t - 1.45) / 0.55) ** 4)), True)
    theta = theta[1:-1]
    r_m = int(np.abs(theta - np.pi / 2).argmin())
    theta[r_m] = np.pi / 2
    half = _warped_angles(N_COLS, -np.pi, np.pi, lambda p: 1 + 2.0 * np.exp(-((p / 0.9) ** 4)), False)[N_COLS // 2:]
    half[0] = 0.0
    phi = np.concatenate([[-np.pi], -half[:0:-1], half])  # exactly mirror-symmetric about phi = 0
    dirs = np.concatenate([[[0, 1, 0]], _sphere_dirs(theta, phi).reshape(-1, 3), [[0, -1, 0]]])
    v = RAY_ORIGIN + _cast(dirs, RAY_ORIGIN)[:, None] * dirs
    ids, strips = _latlong_faces(N_ROWS, N_COLS)
    n = len(v)
    jaw = np.zeros(n, bool)
    jaw[ids[r_m + 1:].ravel()] = True
    jaw[-1] = True

    # Mouth: interior columns of the mouth row are split; the lower copies carry the lower lip.
    lip = v[ids[r_m]]
    inner = np.nonzero((lip[:, 2] > 0) & (np.abs(lip[:, 0]) < MOUTH_HALF_WIDTH))[0]
    j0, j1 = inner[0] - 1, inner[-1] + 1
    xc = 0.5 * (abs(lip[j0, 0]) + abs(lip[j1, 0]))
    dup = n + np.arange(len(inner))
    below = np.concatenate([ids[r_m], ids[r_m, :1]])
    below[inner] = dup
    strips[r_m + 1] = _strip(below, np.concatenate([ids[r_m + 1], ids[r_m + 1, :1]]))
    # The pocket: rows s = 0..K from the upper lip edge, back into the head and forward to the lower lip edge.
    K, x = POCKET_ROWS, lip[inner, 0]
    m = np.clip(1 - (x / xc) ** 2, 0, 1) ** 0.75
    back_dir = lip[inner] - RAY_ORIGIN
    back_dir[:, 1] = 0
    back_dir /= np.linalg.norm(back_dir, axis=1, keepdims=True)
    t = np.arange(1, K) / K
    back = POCKET_DEPTH / 2 * (1 - np.cos(2 * np.pi * t))
    up = POCKET_HEIGHT * np.sin(2 * np.pi * t) * _smoothstep(0.0, 0.007, back)
    offset = -back[:, None, None] * back_dir[None] + up[:, None, None] * np.array([0.0, 1.0, 0.0])
    pocket = lip[inner][None] + m[None, :, None] * offset
    first = n + len(inner)
    new = first + np.arange((K - 1) * len(inner)).reshape(K - 1, len(inner))
    rows = [ids[r_m, j0:j1 + 1]] + [np.r_[ids[r_m, j0], row, ids[r_m, j1]] for row in (*new, dup)]
    strips += [_strip(rows[i], rows[i + 1]) for i in range(K)]
    v = np.concatenate([v, lip[inner], pocket.reshape(-1, 3)])
    f = np.concatenate(strips)
    pocket_t = np.full(len(v), np.nan)
    pocket_t[first:] = np.repeat(t, len(inner))
    jaw = np.concatenate([jaw, np.ones(len(inner), bool), np.repeat(t > 0.5, len(inner))])
    # Upper/lower coordinate: +-0.1 on the lips (fading to 0 at the corners and away from the mouth).
    lips = np.clip(1 - (v[:, 0] / xc) ** 2, 0, 1) * _smoothstep(0.03, 0.06, v[:, 2])
    side = np.where(jaw, -0.1, 0.1) * lips * np.exp(-(((v[:, 1] - Y_MOUTH) / 0.012) ** 2))
    on_pocket = ~np.isnan(pocket_t)
    side[on_pocket] = 0.1 * lips[on_pocket] * np.cos(np.pi * pocket_t[on_pocket])
    return v, _outward(v, f), jaw, pocket_t, side, xc


def _eyeball(centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    theta = np.linspace(0, np.pi, 12)[1:-1]
    phi = np.linspace(-np.pi, np.pi, 16, endpoint=False)
    t, p = np.meshgrid(theta, phi, indexing="ij")
    d = np.stack([np.sin(t) * np.cos(p), np.sin(t) * np.sin(p), np.cos(t)], -1).reshape(-1, 3)  # pole toward +z
    d = np.concatenate([[[0, 0, 1]], d, [[0, 0, -1]]])
    _, strips = _latlong_faces(len(theta), len(phi))
    v = centre + EYE_RADIUS * d
    return v, _outward(v, np.concatenate(strips))


def lid_edges(azimuth, lateral_sign):
    """Elevations (radians) of the upper and lower lid edge at eye azimuths `azimuth` (radians, + toward +x);
    `lateral_sign` +1 for the left eye (+x side), -1 for the right (a number or per-azimuth array). Beyond the
    corners both edges meet. Numpy arrays or torch tensors in, the same out."""
    s = (azimuth / LID_CORNER).clip(-1, 1)
    f = (1 - s**2).clip(0, 1) ** 0.8
    mid = LID_TILT * s * lateral_sign
    return mid + LID_OPEN_UP * f, mid - LID_OPEN_DOWN * f


def _lid(centre: np.ndarray, upper: bool):
    """A closed eyelid slab: (vertices, faces, angles [V, 2])."""
    u = np.linspace(-1, 1, 22)
    a = LID_SIDE * np.sign(u) * np.abs(u) ** 1.6  # denser near the eye's centre line
    e_up, e_lo = lid_edges(a, np.sign(centre[0]))
    s = (np.arange(7) / 6) ** 1.6  # 0 at the lid edge, denser there
    if upper:
        e = e_up[:, None] + (LID_TOP - e_up[:, None]) * s[None]
    else:
        e = e_lo[:, None] + (LID_BOTTOM - e_lo[:, None]) * s[None]
    a2 = np.broadcast_to(a[:, None], e.shape)
    d = np.stack([np.cos(e) * np.sin(a2), np.sin(e), np.cos(e) * np.cos(a2)], -1)
    r_in, r_out = LID_RADII["upper" if upper else "lower"]
    v, f = _slab(centre + r_out * d, centre + r_in * d)
    angles = np.tile(np.stack([a2, e], -1).reshape(-1, 2), (2, 1))
    return v, f, angles


def _teeth(front_z: float, upper: bool) -> tuple[np.ndarray, np.ndarray]:
    """A closed slab along the dental arch (x = 19 mm * u, z = front_z - 28 x^2), 3.5 mm thick."""
    x = 0.019 * np.linspace(-1, 1, 17)
    z = front_z - 28 * x**2
    normal = np.stack([56 * x, np.ones_like(x)], 1)  # outward (front) normal of the arch in (x, z)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    inset = 0.0 if upper else 0.004  # the lower incisors close just behind the upper ones
    y = Y_MOUTH + (np.linspace(0.010, -0.0012, 4) if upper else np.linspace(0.0015, -0.0095, 4))
    sheets = []
    for depth in (inset, inset + 0.0035):
        xz = np.stack([x, z], 1) - depth * normal
        sheets.append(np.stack(np.broadcast_arrays(xz[None, :, 0], y[:, None], xz[None, :, 1]), -1))
    return _slab(*sheets)


@lru_cache(maxsize=1)
def head_geometry() -> HeadGeometry:
    """The rest-pose synthetic head (computed once per process; deterministic)."""
    parts = []  # (vertices, faces, part, jaw_side, pocket_t, side, lid_eye, lid_upper, angles)
    v, f, jaw, pocket_t, side, xc = _shell()
    part = np.where(np.isnan(pocket_t), SKIN, CAVITY)
    parts.append((v, f, part, jaw, pocket_t, side, -1, False, np.zeros((len(v), 2))))
    for i, c in enumerate(EYE_CENTRES):
        v, f = _eyeball(c)
        parts.append((v, f, EYEBALL, False, np.nan, 0.0, -1, False, np.zeros((len(v), 2))))
        for upper in (True, False):
            v, f, ang = _lid(c, upper)
            parts.append((v, f, LID, False, np.nan, 0.06 if upper else -0.06, i, upper, ang))
    shell = parts[0][0]
    lip_line = shell[(np.abs(shell[:, 1] - Y_MOUTH) < 1e-9) & (shell[:, 2] > 0)]
    front_z = float(lip_line[:, 2].max()) - 0.008  # the teeth sit 8 mm behind the lips
    for upper in (True, False):
        v, f = _teeth(front_z, upper)
        parts.append((v, f, TEETH, not upper, np.nan, 0.1 if upper else -0.1, -1, False, np.zeros((len(v), 2))))
    verts, faces, cols, comps, start = [], [], {k: [] for k in range(7)}, [], 0
    for v, f, *extra in parts:
        verts.append(v)
        faces.append(f + start)
        comps.append((start, start + len(v)))
        for k, val in enumerate(extra):
            cols[k].append(np.full(len(v), val) if np.ndim(val) == 0 else np.asarray(val))
        start += len(v)
    v = np.concatenate(verts)
    part, jaw, pocket_t, side, lid_eye, lid_upper, angles = (np.concatenate(cols[k]) for k in range(7))
    codes = np.array([PART_CODES[name] for name in PART_NAMES])[part]
    canonical = np.concatenate([CANONICAL_SCALE * v, codes[:, None], side[:, None]], 1)
    arrays = [v, np.concatenate(faces), canonical, part.astype(np.int64), jaw.astype(bool), pocket_t,
              lid_eye.astype(np.int64), lid_upper.astype(bool), angles]
    for a in arrays:
        a.setflags(write=False)  # shared by every caller of the cache
    return HeadGeometry(*arrays, xc, tuple(comps))
