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
from .errors import FormatError
from .files import write_atomic
from .frame import Frame
from .geometry import Camera, Mesh
from .orbit import DEFAULT_FOV_DEG, orbit_camera

FORMAT = "diffusion-avatars-sequence"
VERSION = 1


def write_sequence(path: str | Path, frames: list[Frame], expression_names=None) -> Path:
    """Write `frames` to `path` (JSON). In-memory meshes are saved beside it in `<stem>.meshes/`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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


def read_sequence(path: str | Path) -> list[Frame]:
    """Read a sequence file -> frames. A malformed file raises FormatError naming the frame and field."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"sequence file {path} does not exist; write one with `avatar orbit --out {path}`")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"sequence file {path} is not valid JSON ({e}); regenerate it") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise FormatError(f"{path} is not a sequence file (expected \"format\": \"{FORMAT}\")")
    if doc.get("version", 0) > VERSION:
        raise FormatError(f"{path} has sequence version {doc['version']}; this engine reads up to {VERSION}")
    records = doc.get("frames")
    if not isinstance(records, list) or not records:
        raise FormatError(f"{path} has no frames; a sequence needs a non-empty \"frames\" list")
    meshes: dict[str, Mesh] = {}
    frames = []
    for i, record in enumerate(records):
        try:
            camera = Camera.from_dict(record["camera"])
            expression = torch.tensor(record["expression"], dtype=torch.float32)
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{path}: frame {i} needs \"camera\" and a numeric \"expression\" list ({e})") from e
        if expression.ndim != 1:
            raise FormatError(f"{path}: frame {i}'s expression must be a flat list of numbers")
        mesh = None
        if record.get("mesh"):
            name = record["mesh"]
            if name not in meshes:
                meshes[name] = Mesh.load(path.parent / name)
            mesh = meshes[name]
        frames.append(Frame(camera, expression, mesh))
    return frames


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
