"""The NPHM tracking model's backward expression field, inverted per vertex of a fixed template (head model kind
`nphm:<head.json>`): a new 200-value code -> a posed mesh with its 5-D canonical coordinates. GPU-scale (about
3 MFLOP a vertex a pass); CPU only for tests.

The network is DPHM's `DeformationNetwork` in its "compress" mode (models/deformations.py; config
`n3dmm_anc39_iden1344_expr200.yaml`): a DeepSDF MLP (`defDeepSDF.lin0..lin6`, 6 hidden layers x 512, Softplus
beta 100, the input concatenated again before the middle layer and scaled by 1/sqrt 2) of [x (3), compressed identity
(32), expression (200)] -> [offset (3), hyper (2)], with `compressor.0` a Linear of [identity (1344), anchors (39 x 3)]
-> 32. The anchors are `assets/anchors_39.npy` plus the identity model's `mlp_pos` (Linear 64-64, ReLU, 64-64, ReLU,
64-117) of the global identity code (its first 64 values). Backward: canonical = x + offset(x), ambient = hyper(x).

Checkpoint: a `.tar` (`torch.load(weights_only=True)`) holding `id_decoder` (only `mlp_pos.*` is used here),
`ex_decoder` (loaded with exactly the keys above) and `latent_codes` (`codebook.geo.embedding.weight` [N, 1344],
`codebook.exp.embedding.weight` [M, 200]).

Inversion: for each template vertex with canonical point c, solve x + offset(x) = c by the fixed-point iteration
x <- c - offset(x), warm-started from the previous frame's solution (the first from x = c), until the largest residual
|x + offset(x) - c| is below `tolerance` or after `max_iterations`; `last_solve` reports both. The ambient coordinates
come from the last evaluation. Output vertices are NPHM space / 4 (metres, the release's `local_new` / 4).

`head.json` (paths relative to it): {"checkpoint": "nphm.tar", "anchors": "anchors_39.npy", "template":
"template.npz" (a `Mesh.save` file whose canonical xyz are the points to pose), "identity": an index into the
codebook or a `.npy` file of 1344 values, "max_iterations": 8, "tolerance": 1e-5}. The identity code is the open
question for real avatars: the codebook holds the model's training subjects; a NeRSemble person tracked by the
release needs the tracking run's identity code, which the release does not ship.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointError, InputError
from ..files import read_json
from ..geometry import Mesh, vertex_normals


@dataclass(frozen=True)
class FieldConfig:
    """Sizes of the released tracking model (n3dmm_anc39_iden1344_expr200.yaml)."""

    expression: int = 200
    identity_global: int = 64
    identity_local: int = 32
    anchors: int = 39
    compressed: int = 32
    hidden: int = 512
    layers: int = 6
    hyper: int = 2
    anchor_mlp: int = 64

    @property
    def identity(self) -> int:
        return self.identity_global + self.identity_local * (self.anchors + 1)


class BackwardField(nn.Module):
    """DPHM's DeformationNetwork ("compress" mode) with its state-dict names; `forward(x [N, 3], identity [1344],
    anchors [39, 3], expression [200]) -> (offsets [N, 3], hyper [N, 2])`."""

    def __init__(self, c: FieldConfig = FieldConfig()):
        super().__init__()
        self.c = c
        self.compressor = nn.Sequential(nn.Linear(c.identity + 3 * c.anchors, c.compressed))
        d_in = 3 + c.compressed + c.expression
        self.skip = c.layers // 2
        self.defDeepSDF = nn.Module()
        dims = [d_in] + [c.hidden] * c.layers + [3 + c.hyper]
        for i in range(len(dims) - 1):
            setattr(self.defDeepSDF, f"lin{i}", nn.Linear(dims[i] + (d_in if i == self.skip else 0), dims[i + 1]))
        self.n_linear = len(dims) - 1

    def forward(self, x: torch.Tensor, identity: torch.Tensor, anchors: torch.Tensor, expression: torch.Tensor):
        compressed = self.compressor(torch.cat([identity, anchors.reshape(-1)]))
        cond = torch.cat([compressed, expression]).expand(x.shape[0], -1)
        inp = torch.cat([x, cond], dim=1)
        h = inp
        for i in range(self.n_linear):
            if i == self.skip:
                h = torch.cat([h, inp], dim=1) / math.sqrt(2)
            h = getattr(self.defDeepSDF, f"lin{i}")(h)
            if i < self.n_linear - 1:
                h = F.softplus(h, beta=100)
        return h[:, :3], h[:, 3:]


class AnchorMLP(nn.Module):
    """The identity model's `mlp_pos`: global identity code [64] -> anchor offsets [39, 3]."""

    def __init__(self, c: FieldConfig = FieldConfig()):
        super().__init__()
        self.mlp_pos = nn.Sequential(nn.Linear(c.identity_global, c.anchor_mlp), nn.ReLU(),
                                     nn.Linear(c.anchor_mlp, c.anchor_mlp), nn.ReLU(),
                                     nn.Linear(c.anchor_mlp, 3 * c.anchors))


def load_tracking_model(path: str | Path, c: FieldConfig = FieldConfig()) -> tuple[BackwardField, AnchorMLP, dict]:
    """(field, anchor MLP, {"geo": [N, 1344], "exp": [M, 200]}) from the DPHM `.tar`; CheckpointError naming the
    first missing or unexpected key or shape."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"NPHM checkpoint {path} does not exist; put the tracking model's .tar there")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unrelated types for damaged or foreign files
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({e})") from e
    for key in ("id_decoder", "ex_decoder", "latent_codes"):
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get(key), dict):
            raise CheckpointError(f"{path} has no {key!r} state dict; an NPHM checkpoint holds id_decoder, "
                                  "ex_decoder and latent_codes")
    field, anchors = BackwardField(c), AnchorMLP(c)
    _load_strict(field, ckpt["ex_decoder"], f"{path}: ex_decoder")
    _load_strict(anchors, {k: v for k, v in ckpt["id_decoder"].items() if k.startswith("mlp_pos.")},
                 f"{path}: id_decoder")
    codes = {}
    for mod, dim in (("geo", c.identity), ("exp", c.expression)):
        key = f"codebook.{mod}.embedding.weight"
        table = ckpt["latent_codes"].get(key)
        if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[1] != dim:
            raise CheckpointError(f"{path}: latent_codes[{key!r}] must be [n, {dim}], got "
                                  f"{None if table is None else list(getattr(table, 'shape', []))}")
        codes[mod] = table.float()
    return field.eval(), anchors.eval(), codes


def _load_strict(module: nn.Module, state: dict, what: str) -> None:
    ours = module.state_dict()
    missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    if missing or unexpected:
        raise CheckpointError(f"{what}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}; expected DPHM's "
                              "n3dmm_anc39_iden1344_expr200 model")
    for key, value in ours.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointError(f"{what}: {key} has shape {list(state[key].shape)}, expected {list(value.shape)}")
    module.load_state_dict({k: v.float() for k, v in state.items()})


class NphmHead:
    """A head model: the template's canonical points posed by inverting the backward field for each code."""

    def __init__(self, field: BackwardField, anchor_mlp: AnchorMLP, anchors: torch.Tensor, identity: torch.Tensor,
                 template: Mesh, max_iterations: int = 8, tolerance: float = 1e-5, name: str = "nphm"):
        c = field.c
        if identity.shape != (c.identity,):
            raise InputError(f"the NPHM identity code must hold {c.identity} values, got {list(identity.shape)}")
        if anchors.shape != (c.anchors, 3):
            raise InputError(f"the NPHM anchors must be [{c.anchors}, 3], got {list(anchors.shape)}")
        self.field, self.identity, self.name = field, identity.float(), name
        with torch.no_grad():
            self.anchors = anchors.float() + anchor_mlp.mlp_pos(self.identity[:c.identity_global]).view(-1, 3)
        self.template = template
        self.target = template.canonical[:, :3].float()
        self.max_iterations, self.tolerance = max_iterations, tolerance
        self._previous: tuple[torch.Tensor, torch.Tensor] | None = None  # (code, solution) of the last frame
        self.last_solve = {"iterations": 0, "residual": float("nan")}
        self.expression_dim = c.expression + 6  # the avatar's code: NPHM 200 + FLAME eyes 6 (unused here)

    @torch.no_grad()
    def solve(self, expression: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(posed points x [V, 3] in NPHM space, hyper [V, 2]) with x + offset(x) = canonical."""
        x = self.target.clone() if self._previous is None else self._previous[1].clone()
        for k in range(1, self.max_iterations + 1):
            offsets, hyper = self.field(x, self.identity, self.anchors, expression)
            residual = (x + offsets - self.target).norm(dim=1)
            if float(residual.max()) < self.tolerance:
                k -= 1
                break
            x = self.target - offsets
        else:
            offsets, hyper = self.field(x, self.identity, self.anchors, expression)
            residual = (x + offsets - self.target).norm(dim=1)
        self.last_solve = {"iterations": k, "residual": float(residual.max())}
        self._previous = (expression, x)
        return x, hyper

    def posed_mesh(self, expression: torch.Tensor) -> Mesh:
        code = torch.as_tensor(expression, dtype=torch.float32).reshape(-1).cpu()
        e = self.field.c.expression
        if code.shape[0] not in (e, e + 6):
            raise InputError(f"the NPHM head takes {e} (or {e + 6} with the FLAME eyes) code values, got "
                             f"{code.shape[0]}")
        x, hyper = self.solve(code[:e])
        vertices = (x / 4.0).contiguous()
        canonical = torch.cat([self.target, hyper], dim=1)
        return Mesh._unchecked(vertices, self.template.faces, canonical, vertex_normals(vertices, self.template.faces))


def nphm_head(argument: str, root: Path | None) -> NphmHead:
    """The `nphm:<head.json>` head model factory (see the module docstring)."""
    from . import head_file

    spec = head_file(f"nphm:{argument}", root)
    doc = read_json(spec, "write the NPHM head description again", CheckpointError)
    base = spec.parent
    try:
        field, anchor_mlp, codes = load_tracking_model(base / doc["checkpoint"])
        anchors = torch.from_numpy(np.load(base / doc["anchors"], allow_pickle=False)).float()
        template = Mesh.load(base / doc["template"])
        ident = doc["identity"]
        identity = codes["geo"][int(ident)] if isinstance(ident, int) else torch.from_numpy(
            np.load(base / ident, allow_pickle=False)).float().reshape(-1)
    except (KeyError, TypeError, IndexError, OSError, ValueError) as e:
        raise CheckpointError(f"{spec}: {type(e).__name__}: {e} (it needs checkpoint, anchors, template and identity; "
                              "see engine/heads/nphm.py)") from e
    return NphmHead(field, anchor_mlp, anchors, identity, template, int(doc.get("max_iterations", 8)),
                    float(doc.get("tolerance", 1e-5)), name=f"nphm:{argument}")
