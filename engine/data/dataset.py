"""Training data on disk: one folder per dataset, read by `AvatarDataset`, written by `engine.data.writer`.

Format (version 1)
------------------
::

    <root>/dataset.json          the index, written LAST: a folder without it is an incomplete dataset
    <root>/topology.npz          shared topology (optional): a mesh .npz (`Mesh.save`): neutral vertices, faces,
                                 canonical coordinates; used when every frame has the same faces
    <root>/<seq>/codes.npy       [T, E] float32: the expression code of each frame
    <root>/<seq>/vertices.npy    [T, V, 3] float32, world metres: per-frame vertices (shared topology only)
    <root>/<seq>/meshes/<t:05d>.npz   a mesh .npz per frame (no shared topology: per-frame topology)
    <root>/<seq>/<cam>/<t:05d>.png    8-bit RGBA: RGB composited over white, alpha = the head mask

`dataset.json`::

    {"format": "diffusion-avatars-dataset", "version": 1,
     "source": "synthetic" | "nersemble" | ...,            # informative
     "synthetic_version": int | null,                      # version of the synthetic head that rendered it
     "image_size": [W, H],                                 # every camera renders W x H
     "expression_names": [E names] | null, "expression_dim": E, "canonical_dims": 3 | 5,
     "cameras": {"<cam>": Camera.to_dict(), ...},          # OpenCV world->camera, see engine.geometry
     "topology": "topology.npz" | null,
     "sequences": {"<seq>": {"frames": T}, ...},
     "split": {"eval_cameras": [...], "eval_sequences": [...]},
     "detail": {...}, "render": {...}}      # optional: per-frame texture the mesh does not determine; how it rendered

Names of cameras and sequences are file names: letters, digits, `_`, `-`, `+` and `.`. Frames are numbered
0..T-1; a sequence entry may also hold `"source_frames": [T ints]`, the frame numbers in the source data.

Splits
------
- ``train``: the cameras not in `eval_cameras` on the sequences not in `eval_sequences`.
- ``eval``: everything else: the held-out cameras on ALL sequences, plus ALL cameras on the held-out sequences
  (each item's ``holdout`` says which: "camera", "sequence" or "both").
- ``all``: every camera on every sequence.

Items are ordered by sequence, then camera, then frame.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import FormatError, InputError
from ..geometry import Camera, Mesh

FORMAT = "diffusion-avatars-dataset"
VERSION = 1
INDEX_FILE = "dataset.json"
SPLITS = ("train", "eval", "all")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+\-]*$")
_MAKE = "write one with `avatar make-data --out DIR` (or convert release data with `avatar import-nersemble`)"


def image_path(root: Path, sequence: str, camera: str, frame: int) -> Path:
    return root / sequence / camera / f"{frame:05d}.png"


def mesh_path(root: Path, sequence: str, frame: int) -> Path:
    return root / sequence / "meshes" / f"{frame:05d}.npz"


def check_name(name: Any, what: str) -> str:
    """`name` if it is a valid camera/sequence name (a safe file name), else FormatError."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise FormatError(f"{what} name {name!r} is not a valid name; use letters, digits, '_', '-', '+' and '.'")
    return name


def _load_npy(path: Path, mmap: bool = False) -> np.ndarray:
    if not path.is_file():
        raise FormatError(f"{path} is missing; the dataset is incomplete: rewrite it ({_MAKE})")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise FormatError(f"{path} is not a readable .npy array ({e}); rewrite the dataset ({_MAKE})") from e


class DatasetIndex:
    """The parsed and validated `dataset.json` of a dataset folder, plus its per-sequence arrays.

    Opening checks the index, the topology, every sequence's `codes.npy` (shape [T, E], finite) and `vertices.npy`
    (shape [T, V, 3]) or mesh files (present), and that every camera folder exists; images are checked when read
    (or all at once by `check`).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        path = self.root / INDEX_FILE
        if not self.root.is_dir():
            raise FormatError(f"dataset folder {self.root} does not exist; {_MAKE}")
        if not path.is_file():
            raise FormatError(f"{self.root} is not a dataset folder (no {INDEX_FILE}); {_MAKE}. A folder whose "
                              f"writer was interrupted also lacks it: write it again")
        try:
            doc = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FormatError(f"{path} is not valid JSON ({e}); rewrite the dataset ({_MAKE})") from e
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise FormatError(f"{path} is not a dataset index (\"format\" is {got!r}, expected {FORMAT!r}); {_MAKE}")
        version = doc.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise FormatError(f"{path} has an invalid \"version\" {version!r}; expected an integer >= 1")
        if version > VERSION:
            raise FormatError(f"{path} has dataset version {version}, newer than this engine reads ({VERSION}); "
                              "upgrade the engine")
        self.doc = doc
        self._parse(path)
        self._load_sequences()

    # -- dataset.json ----------------------------------------------------------------------------
    def _field(self, key: str, types: tuple, path: Path) -> Any:
        if key not in self.doc:
            raise FormatError(f"{path} lacks the field {key!r}; rewrite the dataset ({_MAKE})")
        value = self.doc[key]
        if not isinstance(value, types) or isinstance(value, bool):
            raise FormatError(f"{path}: field {key!r} has the wrong type ({type(value).__name__})")
        return value

    def _parse(self, path: Path) -> None:
        self.source = self.doc.get("source")
        self.synthetic_version = self.doc.get("synthetic_version")
        if self.synthetic_version is not None and (not isinstance(self.synthetic_version, int)
                                                   or isinstance(self.synthetic_version, bool)):
            raise FormatError(f"{path}: \"synthetic_version\" must be an integer or null, got "
                              f"{self.synthetic_version!r}")
        # how per-frame detail was drawn (engine.data.synthetic_dataset), or None
        self.detail = self._field("detail", (dict,), path) if "detail" in self.doc else None
        size = self._field("image_size", (list,), path)
        if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
            raise FormatError(f"{path}: \"image_size\" must be [width, height] in pixels, got {size!r}")
        self.image_size = (size[0], size[1])
        self.expression_dim = self._field("expression_dim", (int,), path)
        if self.expression_dim < 1:
            raise FormatError(f"{path}: \"expression_dim\" must be >= 1, got {self.expression_dim}")
        names = self.doc.get("expression_names")
        if names is not None and (not isinstance(names, list) or len(names) != self.expression_dim
                                  or not all(isinstance(n, str) for n in names)):
            raise FormatError(f"{path}: \"expression_names\" must be null or {self.expression_dim} strings")
        self.expression_names = None if names is None else tuple(names)
        self.canonical_dims = self._field("canonical_dims", (int,), path)
        if self.canonical_dims not in (3, 5):
            raise FormatError(f"{path}: \"canonical_dims\" must be 3 or 5, got {self.canonical_dims}")

        cams = self._field("cameras", (dict,), path)
        if not cams:
            raise FormatError(f"{path} lists no cameras; a dataset needs at least one")
        self.cameras: dict[str, Camera] = {}
        for name, d in cams.items():
            check_name(name, "camera")
            try:
                cam = Camera.from_dict(d)
            except (FormatError, InputError) as e:
                raise FormatError(f"{path}: camera {name!r} is invalid: {e}") from e
            if (cam.width, cam.height) != self.image_size:
                raise FormatError(f"{path}: camera {name!r} is {cam.width}x{cam.height} but \"image_size\" is "
                                  f"{self.image_size[0]}x{self.image_size[1]}; every camera must render image_size")
            self.cameras[name] = cam

        seqs = self._field("sequences", (dict,), path)
        if not seqs:
            raise FormatError(f"{path} lists no sequences; a dataset needs at least one")
        self.frames: dict[str, int] = {}
        for name, d in seqs.items():
            check_name(name, "sequence")
            n = d.get("frames") if isinstance(d, dict) else None
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise FormatError(f"{path}: sequence {name!r} needs {{\"frames\": T}} with T >= 1, got {d!r}")
            self.frames[name] = n

        split = self._field("split", (dict,), path)
        self.eval_cameras = self._name_list(split, "eval_cameras", self.cameras, path)
        self.eval_sequences = self._name_list(split, "eval_sequences", self.frames, path)

        topo = self.doc.get("topology")
        self.topology: Mesh | None = None
        if topo is not None:
            if not isinstance(topo, str) or not _NAME.match(topo):
                raise FormatError(f"{path}: \"topology\" must be a file name in the dataset folder or null, got "
                                  f"{topo!r}")
            self.topology = Mesh.load(self.root / topo)
            if self.topology.canonical_dims != self.canonical_dims:
                raise FormatError(f"{self.root / topo} has {self.topology.canonical_dims}-D canonical coordinates "
                                  f"but {path} says \"canonical_dims\": {self.canonical_dims}; rewrite the dataset")

    @staticmethod
    def _name_list(split: dict, key: str, known: dict, path: Path) -> tuple[str, ...]:
        names = split.get(key, [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise FormatError(f"{path}: split \"{key}\" must be a list of names, got {names!r}")
        unknown = [n for n in names if n not in known]
        if unknown:
            raise FormatError(f"{path}: split \"{key}\" names {unknown}, which the dataset does not have "
                              f"(it has {sorted(known)})")
        return tuple(names)

    # -- per-sequence files ----------------------------------------------------------------------
    def _load_sequences(self) -> None:
        self.codes: dict[str, np.ndarray] = {}
        for seq, T in self.frames.items():
            codes_file = self.root / seq / "codes.npy"
            codes = _load_npy(codes_file)
            if codes.shape != (T, self.expression_dim) or codes.dtype.kind != "f":
                raise FormatError(f"{codes_file} holds {codes.dtype} {list(codes.shape)} but the index says "
                                  f"{T} frames x {self.expression_dim} values (float); rewrite the dataset")
            bad = ~np.isfinite(codes)
            if bad.any():
                row = int(np.argwhere(bad)[0][0])
                raise FormatError(f"{codes_file} holds {int(bad.sum())} NaN/Inf values (first in frame {row}); "
                                  "fix or regenerate the expression codes of that sequence")
            self.codes[seq] = codes.astype(np.float32)
            if self.topology is not None:
                vfile = self.root / seq / "vertices.npy"
                verts = _load_npy(vfile, mmap=True)
                want = (T, self.topology.num_vertices, 3)
                if verts.shape != want:
                    raise FormatError(f"{vfile} has shape {list(verts.shape)} but the sequence has {T} frames and "
                                      f"the topology {want[1]} vertices (expected {list(want)}); rewrite the dataset")
            else:
                missing = [mesh_path(self.root, seq, t) for t in range(T) if not mesh_path(self.root, seq, t).is_file()]
                if missing:
                    raise FormatError(f"{len(missing)} mesh file(s) of sequence {seq!r} are missing (first: "
                                      f"{missing[0]}); the dataset has no shared topology, so every frame needs one")
            for cam in self.cameras:
                if not (self.root / seq / cam).is_dir():
                    raise FormatError(f"image folder {self.root / seq / cam} is missing; every camera needs one "
                                      f"per sequence; rewrite the dataset ({_MAKE})")

    # -- reading ---------------------------------------------------------------------------------
    def samples(self, split: str) -> list[tuple[str, str, int]]:
        """(sequence, camera, frame) of every item of `split`, ordered by sequence, camera, frame."""
        if split not in SPLITS:
            raise InputError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
        out = []
        for seq, T in self.frames.items():
            for cam in self.cameras:
                held = self.holdout(seq, cam)
                if split == "all" or (split == "train") == (held == "none"):
                    out.extend((seq, cam, t) for t in range(T))
        return out

    def holdout(self, sequence: str, camera: str) -> str:
        """"none", "camera", "sequence" or "both": why (sequence, camera) is held out for evaluation."""
        c, s = camera in self.eval_cameras, sequence in self.eval_sequences
        return "both" if c and s else "camera" if c else "sequence" if s else "none"

    def mesh(self, sequence: str, frame: int, vertices_cache: dict) -> Mesh:
        if self.topology is None:
            mesh = Mesh.load(mesh_path(self.root, sequence, frame))
            if mesh.canonical_dims != self.canonical_dims:
                raise FormatError(f"{mesh_path(self.root, sequence, frame)} has {mesh.canonical_dims}-D canonical "
                                  f"coordinates, the index says {self.canonical_dims}; rewrite the dataset")
            return mesh
        if sequence not in vertices_cache:  # memory-mapped once per process (DataLoader workers too)
            vertices_cache[sequence] = _load_npy(self.root / sequence / "vertices.npy", mmap=True)
        v = np.array(vertices_cache[sequence][frame], dtype=np.float32)
        if not np.isfinite(v).all():
            raise FormatError(f"{self.root / sequence / 'vertices.npy'} frame {frame} holds NaN/Inf vertices; "
                              "regenerate that sequence")
        return self.topology.with_vertices(torch.from_numpy(v))

    def image(self, sequence: str, camera: str, frame: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image [3, H, W] float32 in [-1, 1] over white, mask [1, H, W] float32 in [0, 1]) from the RGBA PNG."""
        path = image_path(self.root, sequence, camera, frame)
        if not path.is_file():
            raise FormatError(f"image {path} is missing; the dataset is incomplete: rewrite it ({_MAKE})")
        try:
            with Image.open(path) as im:
                mode, size = im.mode, im.size
                rgba = np.array(im, dtype=np.uint8)  # decodes: a truncated file fails here
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            raise FormatError(f"image {path} is corrupt or not a PNG ({e}); rewrite the dataset ({_MAKE})") from e
        if mode != "RGBA" or size != self.image_size:
            raise FormatError(f"image {path} is {mode} {size[0]}x{size[1]}, expected RGBA "
                              f"{self.image_size[0]}x{self.image_size[1]}; rewrite the dataset")
        t = torch.from_numpy(rgba).permute(2, 0, 1).float() / 255.0
        return t[:3] * 2.0 - 1.0, t[3:]


class AvatarDataset(torch.utils.data.Dataset):
    """A training-data folder (see the module docstring) as a PyTorch dataset.

    `AvatarDataset(root, split="train" | "eval" | "all")`. Each item is a dict:
    - `image` [3, H, W] float32 in [-1, 1] (RGB over a white background), `mask` [1, H, W] float32 in [0, 1];
    - `expression` [E] float32; `camera` (`Camera`); `mesh` (`Mesh`, posed, world space, on the CPU);
    - `sequence` (str), `camera_name` (str), `frame` (int), `holdout` ("none", "camera", "sequence", "both").
    Use `collate` as the DataLoader's `collate_fn`. A malformed dataset raises FormatError (on open, or on reading
    an image that is missing or corrupt).

    Attributes: `cameras` {name: Camera}, `sequences` {name: frames} (all of them, whatever the split),
    `image_size` (width, height), `expression_dim`, `expression_names`, `canonical_dims`, `source`,
    `synthetic_version`, `samples` (the split's (sequence, camera, frame) list), `index` (the `DatasetIndex`).
    """

    def __init__(self, root: str | os.PathLike, split: str = "train"):
        self.index = DatasetIndex(root)
        self.split = split
        self.samples = self.index.samples(split)
        if not self.samples:
            raise FormatError(f"the {split!r} split of {self.index.root} is empty (eval cameras "
                              f"{list(self.index.eval_cameras)}, eval sequences {list(self.index.eval_sequences)}); "
                              "hold out fewer cameras or sequences when writing the dataset")
        self._vertices: dict[str, np.ndarray] = {}
        idx = self.index
        self.root = idx.root
        self.cameras: dict[str, Camera] = idx.cameras
        self.sequences: dict[str, int] = idx.frames  # {name: frames}, every sequence whatever the split
        self.image_size: tuple[int, int] = idx.image_size  # (width, height)
        self.expression_dim: int = idx.expression_dim
        self.expression_names: tuple[str, ...] | None = idx.expression_names
        self.canonical_dims: int = idx.canonical_dims
        self.source, self.synthetic_version = idx.source, idx.synthetic_version  # as written in dataset.json

    def expression(self, sequence: str, frame: int) -> torch.Tensor:
        """[E] float32: the expression code of a frame."""
        return torch.from_numpy(self.index.codes[sequence][frame].copy())

    def mesh(self, sequence: str, frame: int) -> Mesh:
        """The posed mesh of a frame (CPU)."""
        return self.index.mesh(sequence, frame, self._vertices)

    # -- torch Dataset ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        seq, cam, t = self.samples[i]
        image, mask = self.index.image(seq, cam, t)
        return {"image": image, "mask": mask, "expression": self.expression(seq, t), "camera": self.cameras[cam],
                "mesh": self.mesh(seq, t), "sequence": seq, "camera_name": cam, "frame": t,
                "holdout": self.index.holdout(seq, cam)}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_vertices"] = {}  # memory maps are reopened in each worker process
        return state

    def __repr__(self) -> str:
        W, H = self.image_size
        return (f"AvatarDataset({str(self.root)!r}, split={self.split!r}, items={len(self)}, "
                f"cameras={len(self.cameras)}, sequences={len(self.sequences)}, size={W}x{H}, "
                f"expression_dim={self.expression_dim})")


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch dataset items: `image` [B, 3, H, W], `mask` [B, 1, H, W], `expression` [B, E], `frame` [B] int64
    tensors; `camera`, `mesh`, `sequence`, `camera_name`, `holdout` stay lists of length B."""
    if not items:
        raise InputError("collate needs at least one item")
    out: dict[str, Any] = {k: torch.stack([it[k] for it in items]) for k in ("image", "mask", "expression")}
    out["frame"] = torch.tensor([it["frame"] for it in items], dtype=torch.int64)
    for k in ("camera", "mesh", "sequence", "camera_name", "holdout"):
        out[k] = [it[k] for it in items]
    return out


def check(root: str | os.PathLike, progress: bool = False) -> DatasetIndex:
    """Verify a whole dataset before training: the index and arrays (as on open), then that every image exists and
    is an uncorrupted RGBA PNG of the right size, and that every mesh file loads. Raises FormatError naming the
    first bad file; returns the index."""
    from tqdm import tqdm

    index = DatasetIndex(root)
    todo = index.samples("all")
    for seq, cam, t in tqdm(todo, desc="checking images", disable=not progress, unit="img"):
        path = image_path(index.root, seq, cam, t)
        if not path.is_file():
            raise FormatError(f"image {path} is missing; the dataset is incomplete: rewrite it ({_MAKE})")
        try:
            with Image.open(path) as im:
                mode, size = im.mode, im.size
                im.verify()  # checks the PNG chunks' CRCs without decoding the pixels
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            raise FormatError(f"image {path} is corrupt or not a PNG ({e}); rewrite the dataset ({_MAKE})") from e
        if mode != "RGBA" or size != index.image_size:
            raise FormatError(f"image {path} is {mode} {size[0]}x{size[1]}, expected RGBA "
                              f"{index.image_size[0]}x{index.image_size[1]}; rewrite the dataset")
    if index.topology is None:
        for seq, T in index.frames.items():
            for t in range(T):
                index.mesh(seq, t, {})
    else:
        for seq in index.frames:
            v = _load_npy(index.root / seq / "vertices.npy", mmap=True)
            for t in range(v.shape[0]):
                if not np.isfinite(v[t]).all():
                    raise FormatError(f"{index.root / seq / 'vertices.npy'} frame {t} holds NaN/Inf vertices; "
                                      "regenerate that sequence")
    return index
