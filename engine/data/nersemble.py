"""The release's tracked data (NeRSemble layout): a reader (`engine.data.nersemble_dataset.convert_nersemble` writes
it in the project's dataset format, `engine.data.dataset`), so real data trains and evaluates with the same commands
as synthetic data.

Layout of one person's folder (file names and JSON keys as in the release's data manager)::

    <person>/calibration/calibration_result.json  {"params_result": {"rs": [C x [3]] Rodrigues, "ts": [C x [3]],
                                                     "intrinsics": [{"fx", "fy", "cx", "cy"}, ...] (1 shared or C)}}
                                                   world -> camera, OpenCV; intrinsics in full-resolution pixels
    <person>/calibration/config.json               {"serials": [C camera serials, in the order of rs/ts],
                                                    "image_size": {"w": W, "h": H} or [W, H]}  (full resolution)
    <person>/flame.ply                             optional: FLAME template in NPHM canonical space (neck cut)
    <person>/sequences/<SEQ>/timesteps/frame_<t:05d>/images-2x/cam_<serial>.jpg|png   (or images/, images-<N>x/)
                                                  .../alpha_map/cam_<serial>.png                    matting (any size)
                                                  .../facer_segmentation_masks/segmentation_cam_<serial>.png  optional
    <person>/sequences/<SEQ>/annotations/color_correction/<serial>.npy    optional affine colour fix [3|4, 4]
    <person>/sequences/<SEQ>/annotations/tracking/<NPHM run>/<t:05d>_local_new.CTM     mesh (NPHM space x 4)
                                                 .../<t:05d>_canonical_vertices_uint16.npz  arr_0 [V, 5] uint16
                                                 .../<t:05d>_ex_code.npz                    arr_0 [200]
    <person>/sequences/<SEQ>/annotations/tracking/<FLAME run>/tracked_flame_params.npz
                                                 rotation [T, 3] (Euler XYZ), translation [T, 3], scale, eyes [T, 6]

Meshes: `.CTM` (OpenCTM RAW/MG1) or a converted `.ply`/`.obj`/`.npz` with the same stem (see `meshio`). Canonical
coordinates decode as v = q (max - min) / 65535 + min with model.md's min/max. World vertices (the release's NPHM
provider): v / 4, then x_world = scale * R_XYZ(rotation[i]) x + translation[i], with i the timestep's position among
the sequence's sorted timesteps. The neck is cut as the release does (`cut_neck_snapped`: the FLAME plane in
canonical space, then a plane fitted to the cut in posed space, its boundary moved onto it).
Expression = ex_code (200) + FLAME eyes (6) = 206 values. Images: colour-corrected,
matted to white by the alpha map, torso (facer label 3, and the top label when > 14) removed; intrinsics scaled by
1 / N for `images-<N>x` (plain scaling, as the release does). The release holds out camera 222200037 and two
sequences per person (`RELEASE_EVAL_SEQUENCES`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import ConditioningConfig
from ..errors import FormatError, InputError
from ..files import read_npz
from ..geometry import Camera, Mesh
from .meshio import read_mesh_file

RELEASE_EVAL_CAMERA = "222200037"
RELEASE_EVAL_SEQUENCES = {
    18: ["EXP-5-mouth", "EMO-3-angry+sad"], 37: ["EMO-1-shout+laugh", "EMO-2-surprise+fear"],
    38: ["EMO-4-disgust+happy", "SEN-08-clothes_and_lodging"], 55: ["EXP-3-cheeks+nose", "SEN-04-two_plus_seven"],
    74: ["EMO-1-shout+laugh", "EXP-4-lips"], 124: ["EMO-1-shout+laugh", "EMO-4-disgust+happy"],
    145: ["EMO-1-shout+laugh", "EXP-9-jaw-2"], 165: ["EMO-2-surprise+fear", "EMO-4-disgust+happy"],
    175: ["EMO-3-angry+sad", "EMO-4-disgust+happy"], 210: ["EMO-4-disgust+happy", "EXP-3-cheeks+nose"],
    251: ["EMO-1-shout+laugh", "EXP-2-eyes"], 264: ["EMO-4-disgust+happy", "EXP-2-eyes"],
    304: ["EMO-1-shout+laugh", "EMO-2-surprise+fear"],
}
NECK_VERTICES = (3276, 3207, 3310)  # FLAME template vertices spanning the neck-cut plane
NECK_MARGIN = -0.05
_C = ConditioningConfig()
CANONICAL_MIN = np.array(_C.canonical_min + _C.ambient_min, dtype=np.float64)
CANONICAL_MAX = np.array(_C.canonical_max + _C.ambient_max, dtype=np.float64)
_MESH_ORDER = (".npz", ".ply", ".obj", ".CTM", ".ctm")  # converted stand-ins first


def rodrigues(rvec) -> np.ndarray:
    """[3, 3] rotation of a Rodrigues vector (axis * angle, radians)."""
    r = np.asarray(rvec, dtype=np.float64).reshape(3)
    theta = np.linalg.norm(r)
    if theta < 1e-12:
        return np.eye(3)
    k = r / theta
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(theta) * K + (1 - np.cos(theta)) * K @ K


def euler_xyz(angles) -> np.ndarray:
    """[3, 3] rotation of intrinsic Euler angles X, Y, Z (scipy's "XYZ"): Rx(a) @ Ry(b) @ Rz(c)."""
    a, b, c = np.asarray(angles, dtype=np.float64).reshape(3)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz


def dequantize_canonical(q: np.ndarray) -> np.ndarray:
    """[V, 5] uint16 -> [V, 5] float32 canonical xyz + ambient: q (max - min) / 65535 + min."""
    return (q.astype(np.float64) * (CANONICAL_MAX - CANONICAL_MIN) / 65535.0 + CANONICAL_MIN).astype(np.float32)


def _boundary_vertices(faces: np.ndarray, exclude: set | None = None) -> tuple[np.ndarray, set]:
    """(ids of the vertices on edges used by one face only, those edges), leaving out the edges in `exclude`."""
    edges = np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    unique, counts = np.unique(edges, axis=0, return_counts=True)
    single = {tuple(e) for e in unique[counts == 1].tolist()} - (exclude or set())
    return np.unique(np.array(sorted(single), dtype=np.int64).reshape(-1)), single


def cut_neck_snapped(v: np.ndarray, faces: np.ndarray, canonical: np.ndarray, plane) -> tuple:
    """The release's neck cut (`nphm_provider.cut_throat_and_move_vertices`) on a mesh in NPHM posed space: cut by
    the FLAME template plane in canonical space (margin NECK_MARGIN), fit a plane through the posed vertices on
    the cut's boundary (least squares, its normal turned to +y, NPHM's up; vertices at z <= -0.9, the marching
    cube's wall, left out), cut the mesh by that posed plane instead and move the new boundary's vertices onto it,
    so the neck ends in a flat cut. Returns (vertices, faces, kept-vertex mask). When the cut's boundary gives no
    plane (fewer than 3 vertices, or all on a line), the canonical cut alone."""
    p1, n = plane
    above = (canonical[:, :3].astype(np.float64) - p1) @ n > NECK_MARGIN
    _, own = _boundary_vertices(faces)  # the mesh's own border is not the cut's
    ids, _ = _boundary_vertices(faces[above[faces].all(axis=1)], exclude=own)
    ring = v[ids][v[ids, 2] > -0.9] if len(ids) else np.zeros((0, 3))
    keep = above
    if len(ring) >= 3:
        centre = ring.mean(0)
        _, sv, vt = np.linalg.svd(ring - centre)
        if sv[1] > 1e-6 * max(sv[0], 1e-12):
            normal = vt[2] if vt[2][1] >= 0 else -vt[2]
            keep = (v - centre) @ normal > 0
            faces_kept = faces[keep[faces].all(axis=1)]
            ids, _ = _boundary_vertices(faces_kept, exclude=own)
            ids = ids[v[ids, 2] > -0.9]
            v = v.copy()
            v[ids] -= ((v[ids] - centre) @ normal)[:, None] * normal
    faces = faces[keep[faces].all(axis=1)]
    remap = np.cumsum(keep) - 1
    return v[keep], remap[faces], keep


def _json(path: Path) -> dict:
    if not path.is_file():
        raise FormatError(f"{path} is missing; the release's calibration folder holds calibration_result.json and "
                          "config.json (serials, image_size)")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(doc, dict):
        raise FormatError(f"{path} must hold a JSON object")
    return doc


def _npz(path: Path) -> dict[str, np.ndarray]:
    return read_npz(path, "the tracking folder needs it for every timestep: download or convert it again")


def _array(arrays: dict[str, np.ndarray], path: Path) -> np.ndarray:
    """The array of a one-array .npz (`arr_0`, as `np.savez` names it)."""
    if "arr_0" in arrays:
        return arrays["arr_0"]
    if len(arrays) != 1:
        raise FormatError(f"{path} holds arrays {sorted(arrays)}; expected one (arr_0)")
    return next(iter(arrays.values()))


class NersemblePerson:
    """One person's folder: the calibrated cameras (`cameras`: serial -> full-resolution `Camera`) and sequences."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        calib = self.root / "calibration"
        if not calib.is_dir():
            raise FormatError(f"{self.root} has no calibration/ folder; pass a person's folder of the release's "
                              "tracked data (it holds calibration/ and sequences/)")
        res, cfg = _json(calib / "calibration_result.json"), _json(calib / "config.json")
        params = res.get("params_result", res)
        try:
            rs, ts = np.asarray(params["rs"], float).reshape(-1, 3), np.asarray(params["ts"], float).reshape(-1, 3)
            intr = params.get("intrinsics") or [{k: params[k] for k in ("fx", "cx", "cy") if k in params}]
            serials = [str(s) for s in cfg["serials"]]
            size = cfg["image_size"]
            W, H = (int(size["w"]), int(size["h"])) if isinstance(size, dict) else (int(size[0]), int(size[1]))
            if len(rs) != len(ts) or len(serials) != len(rs):
                raise ValueError(f"{len(rs)} rotations, {len(ts)} translations and {len(serials)} serials")
            self.cameras: dict[str, Camera] = {}
            for i, serial in enumerate(serials):
                k = intr[i] if len(intr) >= len(rs) else intr[0]  # one shared set unless there is one per camera
                fx = float(k["fx"])
                self.cameras[serial] = Camera(R=rodrigues(rs[i]), t=ts[i], fx=fx, fy=float(k.get("fy") or fx),
                                              cx=float(k["cx"]), cy=float(k["cy"]), width=W, height=H)
        except (KeyError, TypeError, ValueError, IndexError, InputError) as e:
            raise FormatError(f"calibration in {calib} is malformed ({type(e).__name__}: {e}); expected "
                              "calibration_result.json {\"params_result\": {\"rs\", \"ts\", \"intrinsics\"}} and "
                              "config.json {\"serials\", \"image_size\"}") from e
        seqs = self.root / "sequences"
        self.sequences = sorted(p.name for p in seqs.iterdir() if (p / "annotations").is_dir()) if seqs.is_dir() else []
        if not self.sequences:
            raise FormatError(f"{seqs} holds no sequence with an annotations/ folder; is this a person's folder?")
        flame = self.root / "flame.ply"
        self.neck_plane = None
        if flame.is_file():
            v, _ = read_mesh_file(flame)
            if len(v) <= max(NECK_VERTICES):
                raise FormatError(f"{flame} has {len(v)} vertices; the neck cut needs the FLAME template (5023)")
            p1, p2, p3 = (v[i].astype(np.float64) for i in NECK_VERTICES)
            n = np.cross(p2 - p1, p3 - p1)
            self.neck_plane = (p1, n / np.linalg.norm(n))

    @property
    def person_id(self) -> int | None:
        return int(self.root.name) if self.root.name.isdigit() else None

    def sequence(self, name: str, nphm_tracking: str | None = None,
                 flame_tracking: str | None = None) -> "NersembleSequence":
        if name not in self.sequences:
            raise InputError(f"{self.root} has no sequence {name!r}; it has {self.sequences}")
        return NersembleSequence(self, name, nphm_tracking, flame_tracking)


def _pick(folder: Path, marker: str, name: str | None, what: str, option: str) -> Path:
    if name is not None:
        if not (folder / name).is_dir():
            raise FormatError(f"tracking run {folder / name} does not exist; runs there: "
                              f"{sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []}")
        return folder / name
    found = sorted(p for p in folder.iterdir() if p.is_dir() and any(p.glob(marker))) if folder.is_dir() else []
    if len(found) != 1:
        raise FormatError(f"{folder} holds {len(found)} {what} runs ({[p.name for p in found]}); "
                          f"{'pick one with ' + option if found else 'the sequence has no tracking of that kind'}")
    return found[0]


class NersembleSequence:
    """One tracked sequence: `timesteps`, and per timestep `mesh(t)`, `expression(t)`, `image(t, serial)`."""

    def __init__(self, person: NersemblePerson, name: str, nphm_tracking: str | None, flame_tracking: str | None):
        self.person, self.name = person, name
        self.folder = person.root / "sequences" / name
        tracking = self.folder / "annotations" / "tracking"
        self.nphm = _pick(tracking, "*_ex_code.npz", nphm_tracking, "NPHM", "--nphm-tracking")
        self.flame = _pick(tracking, "tracked_flame_params.npz", flame_tracking, "FLAME", "--flame-tracking")
        self.flame_params = _npz(self.flame / "tracked_flame_params.npz")
        with_images = sorted(int(m.group(1)) for p in (self.folder / "timesteps").glob("frame_*")
                             if (m := re.fullmatch(r"frame_(\d+)", p.name)) and self._images_dir(p) is not None)
        tracked = sorted(int(p.name[:5]) for p in self.nphm.glob("[0-9][0-9][0-9][0-9][0-9]_ex_code.npz"))
        self.timesteps = with_images or tracked  # the release indexes FLAME rows by the frames that have images
        self._row = {t: i for i, t in enumerate(self.timesteps)}
        for key in ("rotation", "translation"):
            rows = self.flame_params.get(key)
            if rows is None or rows.shape != (len(self.timesteps), 3):
                raise FormatError(f"{self.flame / 'tracked_flame_params.npz'}: {key!r} must be [T, 3] with T = "
                                  f"{len(self.timesteps)} timesteps, got {None if rows is None else list(rows.shape)}")
        self.scale = np.asarray(self.flame_params.get("scale", 1.0), dtype=np.float64).reshape(-1)
        if self.scale.size not in (1, 3):
            raise FormatError(f"{self.flame / 'tracked_flame_params.npz'}: 'scale' must hold 1 or 3 values")
        factors = {self._images_dir(self.folder / "timesteps" / f"frame_{t:05d}")[1] for t in with_images}
        if len(factors) > 1:
            raise FormatError(f"{self.folder} mixes image folders of downscale factors {sorted(factors)}")
        self.image_factor = factors.pop() if factors else None

    @staticmethod
    def _images_dir(frame_dir: Path) -> tuple[Path, int] | None:
        """The frame's images folder and its downscale factor: images-2x (the release's) before images, images-Nx."""
        found = {}
        for p in frame_dir.iterdir() if frame_dir.is_dir() else []:
            if p.is_dir() and (m := re.fullmatch(r"images(?:-(\d+)x)?", p.name)):
                found[int(m.group(1) or 1)] = p
        if not found:
            return None
        f = 2 if 2 in found else min(found)
        return found[f], f

    def camera(self, serial: str) -> Camera:
        """The camera of `serial` at the resolution of this sequence's images."""
        cam = self.person.cameras[serial]
        f = self.image_factor or 1
        return Camera(R=cam.R, t=cam.t, fx=cam.fx / f, fy=cam.fy / f, cx=cam.cx / f, cy=cam.cy / f,
                      width=cam.width // f, height=cam.height // f)

    def expression(self, t: int, include_eyes: bool = True) -> np.ndarray:
        """[200] (or [206] with the FLAME eye parameters) float32 expression code of timestep t."""
        path = self.nphm / f"{t:05d}_ex_code.npz"
        code = _array(_npz(path), path).astype(np.float32).reshape(-1)
        if not include_eyes:
            return code
        eyes = self.flame_params.get("eyes")
        if eyes is None or eyes.shape != (len(self.timesteps), 6):
            raise FormatError(f"{self.flame / 'tracked_flame_params.npz'} has no 'eyes' [T, 6]; convert without the "
                              "eye parameters (include_eyes=False, --no-eyes) for 200-D codes")
        return np.concatenate([code, eyes[self._row[t]].astype(np.float32)])

    def mesh(self, t: int, cut_neck: bool = True) -> Mesh:
        """The posed mesh of timestep t in world space (metres), canonical [V, 5]; neck cut if flame.ply exists."""
        stem = f"{t:05d}_local_new"
        path = next((self.nphm / (stem + s) for s in _MESH_ORDER if (self.nphm / (stem + s)).is_file()), None)
        if path is None:
            raise FormatError(f"no mesh {stem}.CTM (or .ply/.obj/.npz) in {self.nphm}; the timestep is not tracked")
        v, faces = read_mesh_file(path)
        q_path = self.nphm / f"{t:05d}_canonical_vertices_uint16.npz"
        q = _array(_npz(q_path), q_path)
        if q.dtype != np.uint16 or q.shape != (len(v), 5):
            raise FormatError(f"{q_path} holds {q.dtype} {list(q.shape)}, expected uint16 [{len(v)}, 5] (one row "
                              f"per vertex of {path.name})")
        canonical = dequantize_canonical(q)
        v = v.astype(np.float64)
        if cut_neck and self.person.neck_plane is not None:
            v, faces, keep = cut_neck_snapped(v, faces, canonical, self.person.neck_plane)
            canonical = canonical[keep]
        i = self._row[t]
        M = euler_xyz(self.flame_params["rotation"][i]) * (self.scale if self.scale.size == 3 else self.scale[0])
        world = (v / 4.0) @ M.T + self.flame_params["translation"][i].reshape(3)
        try:
            return Mesh(world.astype(np.float32), faces, canonical)
        except InputError as e:
            raise FormatError(f"{path}: not a usable mesh after placement ({e})") from e

    def image(self, t: int, serial: str, matting: bool = True, color_correction: bool = True,
              remove_torso: bool = True) -> tuple[np.ndarray, np.ndarray] | None:
        """(rgb [H, W, 3] float32 in [0, 1] over white, alpha [H, W] float32), or None if the image is absent."""
        frame = self.folder / "timesteps" / f"frame_{t:05d}"
        found = self._images_dir(frame)
        path = next((found[0] / f"cam_{serial}{s}" for s in (".jpg", ".png") if found and
                     (found[0] / f"cam_{serial}{s}").is_file()), None)
        if path is None:
            return None
        rgb = _read_image(path, "RGB").astype(np.float32) / 255.0
        H, W = rgb.shape[:2]
        cc = self.folder / "annotations" / "color_correction" / f"{serial}.npy"
        if color_correction and cc.is_file():
            A = np.load(cc, allow_pickle=False).astype(np.float32)
            rgb = np.clip(rgb @ A[:3, :3] + A[:3, 3], 0.0, 1.0)
        alpha = np.ones((H, W), dtype=np.float32)
        if matting:
            a_path = frame / "alpha_map" / f"cam_{serial}.png"
            if not a_path.is_file():
                raise FormatError(f"matting mask {a_path} is missing; get the alpha maps, or convert without matting "
                                  "(matting=False, --no-matting) to keep the background")
            alpha = _read_image(a_path, "L", (W, H), Image.BILINEAR).astype(np.float32) / 255.0
        seg = frame / "facer_segmentation_masks" / f"segmentation_cam_{serial}.png"
        if remove_torso and seg.is_file():
            labels = _read_image(seg, "L", (W, H), Image.NEAREST)
            torso = (labels == 3) | ((labels == labels.max()) & (labels.max() > 14))
            alpha = np.where(torso, 0.0, alpha).astype(np.float32)
        return alpha[..., None] * rgb + (1.0 - alpha[..., None]), alpha


def _read_image(path: Path, mode: str, size: tuple[int, int] | None = None, resample=None) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            if size is not None and im.size != size:
                im = im.resize(size, resample)
            return np.asarray(im)
    except (OSError, ValueError, SyntaxError) as e:
        raise FormatError(f"image {path} is corrupt or unreadable ({e}); download it again") from e
