"""`DatasetWriter`: the one writer of the training-data format documented in `engine.data.dataset`.

Every file is written to a temporary name and renamed into place, and `dataset.json` is written last by `finish()`,
so an interrupted writer leaves a folder that readers reject as incomplete rather than a silently partial dataset.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import InputError
from ..files import write_atomic
from ..geometry import Camera, Mesh
from .dataset import FORMAT, INDEX_FILE, VERSION, check_name, image_path, mesh_path

TOPOLOGY_FILE = "topology.npz"


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _as_numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as e:
        raise InputError(f"{name} must be an array or tensor ({e})") from e


def rgba_bytes(rgb: Any, alpha: Any) -> bytes:
    """PNG bytes of an RGBA image from `rgb` [H, W, 3] and `alpha` [H, W] (floats in [0, 1] or uint8)."""
    rgb, alpha = _as_numpy(rgb, "rgb"), _as_numpy(alpha, "alpha")
    if alpha.ndim == 3 and alpha.shape[-1] == 1:
        alpha = alpha[..., 0]
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or alpha.shape != rgb.shape[:2]:
        raise InputError(f"an image needs rgb [H, W, 3] and alpha [H, W], got {list(rgb.shape)} and "
                         f"{list(alpha.shape)}")
    planes = []
    for a in (rgb, alpha[..., None]):
        if a.dtype != np.uint8:
            a = a.astype(np.float64)
            if not np.isfinite(a).all():
                raise InputError("an image holds NaN/Inf values; fix the renderer or the source image")
            a = np.round(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
        planes.append(a)
    buf = io.BytesIO()
    Image.fromarray(np.concatenate(planes, axis=-1)).save(buf, format="PNG", compress_level=4)
    return buf.getvalue()


class DatasetWriter:
    """Writes a dataset folder. Typical use::

        w = DatasetWriter(root, cameras={"cam00": cam, ...}, expression_dim=8, topology=neutral_mesh)
        w.write_image("seq000", "cam00", 0, rgb, alpha)            # every (sequence, camera, frame)
        w.write_sequence("seq000", codes, vertices=verts)           # [T, E] codes, [T, V, 3] vertices
        w.finish(eval_cameras=["cam05"], eval_sequences=["seq011"]) # writes dataset.json last

    Without a shared `topology`, call `write_mesh(seq, frame, mesh)` for every frame instead of passing vertices.
    `overwrite=False` refuses a non-empty folder; with `overwrite=True` an old `dataset.json` is removed first, so
    the folder reads as incomplete until `finish()`.
    """

    def __init__(self, root: str | os.PathLike, *, cameras: dict[str, Camera], expression_dim: int,
                 expression_names: Sequence[str] | None = None, topology: Mesh | None = None,
                 canonical_dims: int | None = None, source: str | None = None,
                 synthetic_version: int | None = None, detail: dict | None = None, render: dict | None = None,
                 overwrite: bool = False):
        self.root = Path(root)
        if not cameras:
            raise InputError("a dataset needs at least one camera")
        sizes = {(c.width, c.height) for c in cameras.values()}
        if len(sizes) != 1:
            raise InputError(f"every camera of a dataset must render the same image size, got {sorted(sizes)}")
        for name in cameras:
            check_name(name, "camera")
        if expression_names is not None and len(expression_names) != expression_dim:
            raise InputError(f"{len(expression_names)} expression names for expression_dim {expression_dim}")
        if topology is None and canonical_dims not in (3, 5):
            raise InputError("without a shared topology, pass canonical_dims (3 or 5) of the per-frame meshes")
        if self.root.exists() and any(self.root.iterdir()):
            if not overwrite:
                what = "a dataset" if (self.root / INDEX_FILE).exists() else "files (an interrupted write?)"
                raise InputError(f"{self.root} already holds {what}; pass overwrite=True (--overwrite) to write over "
                                 "it, or choose an empty folder")
            (self.root / INDEX_FILE).unlink(missing_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        self.cameras = dict(cameras)
        self.image_size = sizes.pop()
        self.expression_dim = int(expression_dim)
        self.expression_names = None if expression_names is None else list(expression_names)
        self.topology = topology
        self.canonical_dims = topology.canonical_dims if topology is not None else int(canonical_dims)
        self.source = source
        self.synthetic_version = synthetic_version
        self.detail = detail
        self.render = render
        self.frames: dict[str, int] = {}
        self.source_frames: dict[str, list[int]] = {}
        if topology is not None:
            topology.save(self.root / TOPOLOGY_FILE)

    def write_image(self, sequence: str, camera: str, frame: int, rgb: Any, alpha: Any) -> Path:
        """Write one frame's image: `rgb` [H, W, 3] already composited over white, `alpha` [H, W] the mask."""
        check_name(sequence, "sequence")
        if camera not in self.cameras:
            raise InputError(f"unknown camera {camera!r}; the writer has {sorted(self.cameras)}")
        data = rgba_bytes(rgb, alpha)
        W, H = self.image_size
        shape = _as_numpy(alpha, "alpha").shape[:2]
        if shape != (H, W):
            raise InputError(f"camera {camera!r} renders {W}x{H} but the image is {shape[1]}x{shape[0]}")
        path = image_path(self.root, sequence, camera, frame)
        write_atomic(path, data)
        return path

    def write_mesh(self, sequence: str, frame: int, mesh: Mesh) -> Path:
        """Write one frame's mesh (datasets without a shared topology)."""
        if self.topology is not None:
            raise InputError("this dataset has a shared topology: pass per-frame vertices to write_sequence instead")
        if mesh.canonical_dims != self.canonical_dims:
            raise InputError(f"mesh has {mesh.canonical_dims}-D canonical coordinates, the dataset "
                             f"{self.canonical_dims}-D")
        check_name(sequence, "sequence")
        return mesh.to("cpu").save(mesh_path(self.root, sequence, frame))

    def write_sequence(self, sequence: str, codes: Any, vertices: Any = None,
                       source_frames: Sequence[int] | None = None) -> None:
        """Write a sequence's `codes` [T, E] and, with a shared topology, its `vertices` [T, V, 3].
        `source_frames` (optional, informative): the T frame numbers these frames had in the source data."""
        check_name(sequence, "sequence")
        codes = _as_numpy(codes, "codes").astype(np.float32)
        if codes.ndim != 2 or codes.shape[1] != self.expression_dim or codes.shape[0] < 1:
            raise InputError(f"codes must be [T, {self.expression_dim}] with T >= 1, got {list(codes.shape)}")
        if not np.isfinite(codes).all():
            raise InputError(f"the codes of sequence {sequence!r} hold NaN/Inf values")
        T = codes.shape[0]
        if self.topology is not None:
            if vertices is None:
                raise InputError("this dataset has a shared topology: pass vertices [T, V, 3]")
            vertices = _as_numpy(vertices, "vertices").astype(np.float32)
            want = (T, self.topology.num_vertices, 3)
            if vertices.shape != want:
                raise InputError(f"vertices must be {list(want)}, got {list(vertices.shape)}")
            if not np.isfinite(vertices).all():
                raise InputError(f"the vertices of sequence {sequence!r} hold NaN/Inf values")
            write_atomic(self.root / sequence / "vertices.npy", _npy_bytes(vertices))
        elif vertices is not None:
            raise InputError("this dataset has per-frame meshes: write them with write_mesh, not as vertices")
        write_atomic(self.root / sequence / "codes.npy", _npy_bytes(codes))
        self.frames[sequence] = T
        if source_frames is not None:
            if len(source_frames) != T:
                raise InputError(f"source_frames has {len(source_frames)} entries for {T} frames")
            self.source_frames[sequence] = [int(f) for f in source_frames]

    def finish(self, eval_cameras: Sequence[str] = (), eval_sequences: Sequence[str] = ()) -> Path:
        """Check that every image and mesh was written, then write `dataset.json` (last). Returns its path."""
        for name, known in ((eval_cameras, self.cameras), (eval_sequences, self.frames)):
            unknown = [n for n in name if n not in known]
            if unknown:
                raise InputError(f"held-out names {unknown} are not in the dataset ({sorted(known)})")
        if not self.frames:
            raise InputError("no sequence was written; call write_sequence first")
        for seq, T in self.frames.items():
            for t in range(T):
                for cam in self.cameras:
                    if not image_path(self.root, seq, cam, t).is_file():
                        raise InputError(f"image {image_path(self.root, seq, cam, t)} was not written")
                if self.topology is None and not mesh_path(self.root, seq, t).is_file():
                    raise InputError(f"mesh {mesh_path(self.root, seq, t)} was not written")
        doc = {
            "format": FORMAT, "version": VERSION, "source": self.source, "synthetic_version": self.synthetic_version,
            "image_size": list(self.image_size), "expression_names": self.expression_names,
            "expression_dim": self.expression_dim, "canonical_dims": self.canonical_dims,
            "cameras": {name: cam.to_dict() for name, cam in self.cameras.items()},
            "topology": TOPOLOGY_FILE if self.topology is not None else None,
            "sequences": {seq: {"frames": T, **({"source_frames": self.source_frames[seq]}
                                                if seq in self.source_frames else {})}
                          for seq, T in self.frames.items()},
            "split": {"eval_cameras": list(eval_cameras), "eval_sequences": list(eval_sequences)},
            **({"detail": self.detail} if self.detail is not None else {}),
            **({"render": self.render} if self.render is not None else {}),
        }
        path = self.root / INDEX_FILE
        write_atomic(path, json.dumps(doc, indent=1).encode())
        return path
