"""`LearnedHead` (head model kind `learned:<file.npz>`): one person's posed mesh from a new expression code, learned
from the person's tracked frames by `avatar fit-head` (`engine.heads.fitting`).

The mesh is a fixed template (a tracked frame's vertices, faces and canonical xyz). A code maps to per-vertex
offsets of the position (3) and of the ambient coordinates (2) through a PCA basis of the tracked offsets:

    z = (clamp(code, low, high) - code_mean) / code_std          per-dimension range of the tracked codes
    coefficients = z @ W + b                                     "linear"
                 + silu(z @ W1 + b1) @ W2 + b2                   "mlp": a small residual MLP on top of the linear map
    [V, 5] offsets = mean + coefficients @ basis

Codes outside the tracked range are clamped per dimension: the map was never fitted there. About 2 K V
multiply-adds a frame (K components): milliseconds on a CPU for the person's mesh.

File (`np.savez`, read with `allow_pickle=False`; every key below is required, no other key is allowed): `format`,
`version`, `kind`, `vertices` [V, 3], `faces` [F, 3], `canonical` [V, 5], `mean` [V, 5], `basis` [K, V, 5],
`code_mean`, `code_std`, `code_low`, `code_high` [E], `linear_weight` [E, K], `linear_bias` [K], and for "mlp"
`hidden_weight` [E, H], `hidden_bias` [H], `out_weight` [H, K], `out_bias` [K].
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CheckpointError, InputError
from ..files import atomic_path, read_npz
from ..geometry import Mesh, vertex_normals

FORMAT = "diffusion-avatars-learned-head"
VERSION = 1
KINDS = ("linear", "mlp")
_COMMON = ("format", "version", "kind", "vertices", "faces", "canonical", "mean", "basis", "code_mean", "code_std",
           "code_low", "code_high", "linear_weight", "linear_bias")
_MLP = ("hidden_weight", "hidden_bias", "out_weight", "out_bias")


class LearnedHead:
    """A learned code -> mesh map (see the module docstring). `arrays`: the file's arrays (float32 tensors)."""

    def __init__(self, arrays: dict[str, torch.Tensor], kind: str, name: str = "learned"):
        if kind not in KINDS:
            raise CheckpointError(f"learned head kind {kind!r} is not one of {list(KINDS)}")
        self.kind, self.name = kind, name
        self.arrays = arrays
        self.template = Mesh(arrays["vertices"], arrays["faces"].long(), arrays["canonical"])
        self.expression_dim = int(arrays["code_mean"].shape[0])

    @property
    def num_vertices(self) -> int:
        return self.template.num_vertices

    def coefficients(self, expression: torch.Tensor) -> torch.Tensor:
        """[K] PCA coefficients of a code [E]."""
        a = self.arrays
        z = (torch.minimum(torch.maximum(expression, a["code_low"]), a["code_high"]) - a["code_mean"]) / a["code_std"]
        out = z @ a["linear_weight"] + a["linear_bias"]
        if self.kind == "mlp":
            out = out + F.silu(z @ a["hidden_weight"] + a["hidden_bias"]) @ a["out_weight"] + a["out_bias"]
        return out

    def offsets(self, expression: torch.Tensor) -> torch.Tensor:
        """[V, 5] position (3) and ambient (2) offsets of a code [E] from the template."""
        a = self.arrays
        k = a["basis"].shape[0]
        return a["mean"] + (self.coefficients(expression) @ a["basis"].reshape(k, -1)).reshape(-1, 5)

    def posed_mesh(self, expression: torch.Tensor) -> Mesh:
        """The template posed by `expression` ([E] float32; clamped per dimension to the tracked range)."""
        code = torch.as_tensor(expression, dtype=torch.float32).reshape(-1).cpu()
        if code.shape[0] != self.expression_dim:
            raise InputError(f"the learned head model {self.name!r} takes {self.expression_dim}-value codes, got "
                             f"{code.shape[0]}")
        if not bool(torch.isfinite(code).all()):
            raise InputError(f"the expression code holds NaN or Inf values; the learned head {self.name!r} needs "
                             "finite codes")
        d = self.offsets(code)
        t = self.template
        vertices = t.vertices + d[:, :3]
        canonical = torch.cat([t.canonical[:, :3], t.canonical[:, 3:] + d[:, 3:]], dim=1)
        return Mesh._unchecked(vertices, t.faces, canonical, vertex_normals(vertices, t.faces))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the file (atomically)."""
        path = Path(path)
        arrays = {k: v.numpy() for k, v in self.arrays.items()}
        arrays["faces"] = arrays["faces"].astype(np.int64)
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, format=np.array(FORMAT), version=np.array(VERSION), kind=np.array(self.kind), **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, name: str | None = None) -> "LearnedHead":
        """Read a file written by `save`, strictly: CheckpointError naming a missing, unexpected or misshapen key."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"learned head model {path} does not exist; write one with `avatar fit-head`")
        got = read_npz(path, "write it again with `avatar fit-head`")
        if str(got.get("format", "")) != FORMAT:
            raise CheckpointError(f"{path} is not a learned head model (no format {FORMAT!r}); write one with "
                                  "`avatar fit-head`")
        if int(got.get("version", -1)) != VERSION:
            raise CheckpointError(f"{path} has learned head version {got.get('version')}, this engine reads {VERSION}")
        kind = str(got.get("kind", ""))
        expected = set(_COMMON) | (set(_MLP) if kind == "mlp" else set())
        missing, unexpected = sorted(expected - set(got)), sorted(set(got) - expected)
        if missing or unexpected:
            raise CheckpointError(f"{path}: missing keys {missing}, unexpected keys {unexpected} for kind {kind!r}")
        arrays = {k: torch.from_numpy(np.asarray(got[k], dtype=np.int64 if k == "faces" else np.float32))
                  for k in expected - {"format", "version", "kind"}}
        _check_shapes(arrays, kind, path)
        return cls(arrays, kind, name=name or f"learned:{path.name}")

    def __repr__(self) -> str:
        return (f"LearnedHead(name={self.name!r}, kind={self.kind!r}, V={self.num_vertices}, "
                f"components={self.arrays['basis'].shape[0]}, code={self.expression_dim})")


def _check_shapes(a: dict[str, torch.Tensor], kind: str, path: Path) -> None:
    V, E, K = a["vertices"].shape[0], a["code_mean"].shape[0], a["basis"].shape[0]
    H = a["hidden_weight"].shape[-1] if kind == "mlp" else 0
    shapes = {"vertices": (V, 3), "canonical": (V, 5), "mean": (V, 5), "basis": (K, V, 5), "code_std": (E,),
              "code_low": (E,), "code_high": (E,), "linear_weight": (E, K), "linear_bias": (K,)}
    if kind == "mlp":
        shapes.update(hidden_weight=(E, H), hidden_bias=(H,), out_weight=(H, K), out_bias=(K,))
    for key, shape in shapes.items():
        if tuple(a[key].shape) != shape:
            raise CheckpointError(f"{path}: {key} has shape {list(a[key].shape)}, expected {list(shape)}")
    faces = a["faces"]
    if faces.dim() != 2 or faces.shape[1] != 3 or (faces.numel() and (faces.min() < 0 or faces.max() >= V)):
        raise CheckpointError(f"{path}: faces must be [F, 3] indices below {V}")
    if not all(bool(torch.isfinite(t).all()) for t in a.values()) or bool((a["code_std"] <= 0).any()):
        raise CheckpointError(f"{path} holds NaN/Inf values or a code_std <= 0; fit it again")


def learned_head(argument: str, root: Path | None) -> LearnedHead:
    """The `learned:<file>` head model factory (the file relative to the avatar folder `root`)."""
    from . import head_file

    return LearnedHead.load(head_file(f"learned:{argument}", root), name=f"learned:{argument}")
