"""Frame sequences: one JSON file, per frame a camera, an expression code and optionally a mesh file.

Format (version 1):

    {
      "format": "diffusion-avatars-sequence", "version": 1,
      "expression_names": ["jawOpen", ...] | null,          # optional, informative
      "frames": [
        {"camera": {"R": [[3x3]], "t": [3], "fx": .., "fy": .., "cx": .., "cy": .., "width": .., "height": ..},
         "expression": [E floats],
         "mesh": "meshes/00000.npz"}                         # optional, relative to the sequence file
      ]
    }

Cameras are OpenCV world->camera (see `engine.geometry.Camera`). Frames that name the same mesh file share it.
`orbit()` makes the default sequence for an avatar: a camera orbit with an expression sweep.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from .config import AvatarConfig
from .errors import FormatError, InputError
from .files import check_writable, write_atomic
from .frame import Frame
from .geometry import Camera, Mesh
from .orbit import DEFAULT_FOV_DEG, orbit_camera
from .schema import is_finite_number

FORMAT = "diffusion-avatars-sequence"
VERSION = 1


def write_sequence(path: str | Path, frames: list[Frame], expression_names=None) -> Path:
    """Write `frames` to `path` (JSON). In-memory meshes are saved beside it in `<stem>.meshes/`."""
    path = Path(path)
    check_writable(path, "the sequence")
    mesh_files: dict[int, str] = {}
    records = []
    for frame in frames:
        record = {
            "camera": frame.camera.to_dict(),
            "expression": [float(x) for x in torch.as_tensor(frame.expression).reshape(-1).tolist()],
        }
        if frame.mesh is not None:
            key = id(frame.mesh)
            if key not in mesh_files:
                rel = f"{path.stem}.meshes/{len(mesh_files):05d}.npz"
                frame.mesh.save(path.parent / rel)
                mesh_files[key] = rel
            record["mesh"] = mesh_files[key]
        records.append(record)
    doc = {"format": FORMAT, "version": VERSION,
           "expression_names": list(expression_names) if expression_names else None, "frames": records}
    write_atomic(path, json.dumps(doc, indent=1))
    return path


def read_sequence(path: str | Path, config: AvatarConfig | None = None) -> list[Frame]:
    """Read a sequence file -> frames, every frame checked before any is returned: FormatError naming the file, the
    frame and the field. With an avatar's `config`, each frame must also fit that avatar (code length, image size,
    canonical coordinates), so a bad frame 47 of 48 is found before anything is rendered."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"sequence file {path} does not exist (write one with `avatar orbit --out {path}`)")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"sequence file {path} is not valid JSON ({e}) (regenerate it)") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise FormatError(f"{path} is not a sequence file (expected \"format\": \"{FORMAT}\")")
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise FormatError(f"{path}: \"version\" must be a positive integer, got {version!r:.40} (write "
                          f"\"version\": {VERSION}, or regenerate the file with `avatar orbit`)")
    if version > VERSION:
        raise FormatError(f"{path} has sequence version {version}; this engine reads up to {VERSION} (upgrade the "
                          "engine)")
    names = doc.get("expression_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise FormatError(f"{path}: \"expression_names\" must be a list of strings or null, got {names!r:.80}")
    records = doc.get("frames")
    if not isinstance(records, list) or not records:
        raise FormatError(f"{path} has no frames (a sequence needs a non-empty \"frames\" list)")
    meshes: dict[str, Mesh] = {}
    frames = []
    for i, record in enumerate(records):
        where = f"{path}: frame {i} of {len(records)}"
        try:
            frame = _read_frame(record, path.parent, meshes)
            if config is not None:
                _check_fits(frame, config)
        except (FormatError, InputError) as e:
            raise FormatError(f"{where}: {e}") from e
        frames.append(frame)
    return frames


def _read_frame(record, folder: Path, meshes: dict[str, Mesh]) -> Frame:
    if not isinstance(record, dict) or "camera" not in record or "expression" not in record:
        raise FormatError("a frame is an object with \"camera\" and \"expression\" (and optionally \"mesh\")")
    camera = Camera.from_dict(record["camera"])
    values = record["expression"]
    if not isinstance(values, list) or not values or not all(is_finite_number(v) for v in values):
        raise FormatError(f"\"expression\" must be a non-empty list of finite numbers, got {values!r:.80}")
    expression = torch.tensor(values, dtype=torch.float32)
    if not torch.isfinite(expression).all():
        raise FormatError("\"expression\" holds a value beyond the float32 range (about 3.4e38)")
    name = record.get("mesh")
    if name is None:
        return Frame(camera, expression)
    if not isinstance(name, str) or not name:
        raise FormatError(f"\"mesh\" must be the path of a .npz file relative to the sequence, got {name!r:.80}")
    if name not in meshes:
        meshes[name] = Mesh.load(folder / name)
    return Frame(camera, expression, meshes[name])


def _check_fits(frame: Frame, config: AvatarConfig) -> None:
    """FormatError unless the avatar of `config` can render `frame`."""
    e, size = config.expression_dim, config.image_size
    if frame.expression.numel() != e:
        names = f" ({', '.join(config.expression_names)})" if config.expression_names else ""
        raise FormatError(f"the expression has {frame.expression.numel()} values, avatar {config.name!r} expects "
                          f"{e}{names} (write the sequence for this avatar, e.g. with `avatar orbit`)")
    camera = frame.camera
    if (camera.width, camera.height) != (size, size):
        raise FormatError(f"the camera renders {camera.width}x{camera.height}, avatar {config.name!r} {size}x{size} "
                          "(scale the camera's intrinsics and size to it, e.g. Camera.scaled)")
    dims = config.conditioning.canonical_dims
    if frame.mesh is not None and frame.mesh.canonical_dims != dims:
        raise FormatError(f"the mesh has {frame.mesh.canonical_dims} canonical values per vertex, avatar "
                          f"{config.name!r} needs {dims}")


def orbit(config: AvatarConfig, frames: int = 48, distance: float = 1.0, yaw_deg: float = 30.0,
          pitch_deg: float = 8.0, fov_deg: float = DEFAULT_FOV_DEG, seed: int = 0) -> list[Frame]:
    """A default sequence: the camera circles in front of the head (yaw +-yaw_deg, pitch +-pitch_deg) while the
    expression sweeps.

    Named codes (e.g. the ARKit-named `tiny` code) raise each dimension 0 -> 1 -> 0 in turn; unnamed codes
    follow a smooth seeded random walk of small amplitude.
    """
    if frames < 1:
        raise FormatError(f"an orbit needs at least 1 frame, got {frames}")
    phase = np.linspace(0.0, 2 * math.pi, frames, endpoint=False)
    codes = _sweep(config, frames, seed)
    out = []
    for i, p in enumerate(phase):
        # an ellipse (not a figure of eight), so no two frames of one loop share a camera
        camera = orbit_camera(yaw_deg * math.sin(p), pitch_deg * math.cos(p), size=config.image_size,
                              distance=distance, fov_deg=fov_deg)
        out.append(Frame(camera, torch.from_numpy(codes[i])))
    return out


def _sweep(config: AvatarConfig, frames: int, seed: int) -> np.ndarray:
    dim = config.expression_dim
    codes = np.zeros((frames, dim), np.float32)
    if config.expression_names:
        # each named dimension gets an equal run of frames and rises 0 -> 1 -> 0 across its run
        owner = [i * dim // frames for i in range(frames)]
        for i, k in enumerate(owner):
            first, count = owner.index(k), owner.count(k)
            codes[i, k] = math.sin(math.pi * (i - first + 0.5) / count)
        return codes
    rng = np.random.default_rng(seed)
    keys = rng.normal(0.0, 0.5, size=(5, dim)).astype(np.float32)
    t = np.linspace(0, len(keys) - 1, frames)
    lo = np.floor(t).astype(int).clip(0, len(keys) - 2)
    w = (t - lo)[:, None]
    w = w * w * (3 - 2 * w)  # smoothstep between keys
    return ((1 - w) * keys[lo] + w * keys[lo + 1]).astype(np.float32)
