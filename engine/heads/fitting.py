"""Fitting a `LearnedHead` on one person's tracked frames (a dataset folder, `avatar import-nersemble`).

1. Template: the frame whose code is smallest (neutral), or the one asked for.
2. Matching: every other frame's vertices are matched to the template's by nearest canonical xyz (per-frame
   marching cubes: no shared topology), which gives each frame's positions and ambient coordinates per template
   vertex. The head's rigid pose is removed by a robust (reweighted) Kabsch fit of the matched positions to the
   template: the code carries the expression, not the head pose (the camera does).
3. Map: PCA of the [V, 5] offsets from the template, and the code -> coefficients map, linear (ridge least squares)
   or linear plus a small residual MLP (Adam). `fit_head` fits both and reports both on the held-out frames.

Held-out frames: the dataset's eval sequences when it has training sequences besides, else every 5th frame.
Rendered PSNR uses the synthetic look (`engine.data.synthetic_look.render_mesh`, colours from canonical
coordinates): the fitted mesh placed by the frame's rigid pose against the tracked mesh, from the dataset's first
held-out (else first) camera. Where it breaks: frames whose surface the template lacks (an open mouth's inside
when the template's is closed, as marching cubes changes the topology) match far away; their matching distance is
reported (`match_mm`). Codes outside the tracked range are clamped (`LearnedHead`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import BackendError, InputError
from .learned import KINDS, LearnedHead

HOLDOUT_EVERY = 5


@dataclass
class TrackedFrames:
    """Frames matched to the template: `codes` [N, E], `offsets` [N, V, 5] (pose removed), `poses` (R [N, 3, 3],
    t [N, 3]: world = R x + t), `match_mm` [N] mean matching distance in canonical space (NPHM units / 4, in mm),
    `keys` [(sequence, frame)]."""

    codes: np.ndarray
    offsets: np.ndarray
    rotations: np.ndarray
    translations: np.ndarray
    match_mm: np.ndarray
    keys: list[tuple[str, int]]


def nearest(points: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index into `points`, distance) of the nearest point of every query (a k-d tree)."""
    try:
        from scipy.spatial import cKDTree
    except ImportError as e:
        raise BackendError("fitting a head model needs scipy (nearest canonical coordinates): pip install "
                           "'diffusion-avatars-engine[fit]'") from e
    distance, index = cKDTree(points).query(queries, workers=1)
    return index, distance


def rigid_fit(source: np.ndarray, target: np.ndarray, iterations: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(R, t) minimising the robustly weighted sum |R source + t - target|^2 (Kabsch, reweighted by the residual so
    that the moving parts (jaw, lids) weigh less than the skull)."""
    w = np.ones(len(source))
    for _ in range(iterations):
        ws = w / w.sum()
        mu_s, mu_t = ws @ source, ws @ target
        H = (source - mu_s).T @ ((target - mu_t) * ws[:, None])
        U, _, Vt = np.linalg.svd(H)
        d = np.sign(np.linalg.det(Vt.T @ U.T))
        R = Vt.T @ np.diag([1.0, 1.0, d]) @ U.T
        t = mu_t - R @ mu_s
        r = np.linalg.norm(source @ R.T + t - target, axis=1)
        scale = 2.0 * np.median(r) + 1e-9
        w = 1.0 / (1.0 + (r / scale) ** 2)
    return R, t


def match_frames(index, keys: list[tuple[str, int]], template, progress: bool = True) -> TrackedFrames:
    """Match the frames `keys` of the dataset `index` (`DatasetIndex`) to the template mesh."""
    from tqdm import tqdm

    tv, tc = template.vertices.double().numpy(), template.canonical.double().numpy()
    codes, offsets, rots, trans, dist = [], [], [], [], []
    cache: dict = {}
    for seq, frame in tqdm(keys, desc="matching", unit="frame", disable=not progress):
        mesh = index.mesh(seq, frame, cache)
        if mesh.canonical_dims != 5:
            raise InputError(f"frame {frame} of {seq!r} has {mesh.canonical_dims}-D canonical coordinates; the "
                             "learned head model needs the 5-D (NPHM with ambient) ones")
        c = mesh.canonical.double().numpy()
        idx, d = nearest(c[:, :3], tc[:, :3])
        world = mesh.vertices.double().numpy()[idx]
        R, t = rigid_fit(tv, world)
        local = (world - t) @ R
        offsets.append(np.concatenate([local - tv, c[idx, 3:] - tc[:, 3:]], axis=1).astype(np.float32))
        codes.append(index.codes[seq][frame].astype(np.float32))
        rots.append(R)
        trans.append(t)
        dist.append(d.mean() * 250.0)  # canonical NPHM units are metres x 4
    return TrackedFrames(np.stack(codes), np.stack(offsets), np.stack(rots), np.stack(trans), np.array(dist), keys)


def split_frames(index) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(training, held-out) frame keys (see the module docstring)."""
    keys = [(s, f) for s in sorted(index.frames) for f in range(index.frames[s])]
    held = set(index.eval_sequences) if set(index.frames) - set(index.eval_sequences) else set()
    if held:
        return [k for k in keys if k[0] not in held], [k for k in keys if k[0] in held]
    return [k for k in keys if k[1] % HOLDOUT_EVERY != 2], [k for k in keys if k[1] % HOLDOUT_EVERY == 2]


def neutral_frame(index, keys: list[tuple[str, int]]) -> tuple[str, int]:
    """The frame of the smallest code (the NPHM part of a 206-value code): the most neutral expression."""
    def norm(k):
        code = index.codes[k[0]][k[1]]
        return float(np.linalg.norm(code[:200] if len(code) == 206 else code))

    return min(keys, key=norm)


def fit_map(codes: np.ndarray, offsets: np.ndarray, template, kind: str, components: int = 32, hidden: int = 128,
            steps: int = 1500, seed: int = 0, ridge: float = 1e-3) -> LearnedHead:
    """A `LearnedHead` of `kind` fitted to (codes [N, E], offsets [N, V, 5])."""
    if kind not in KINDS:
        raise InputError(f"head model kind {kind!r} is not one of {list(KINDS)}")
    N, V, _ = offsets.shape
    X = torch.from_numpy(offsets.reshape(N, -1)).double()
    mean = X.mean(0)
    U, S, Vt = torch.linalg.svd(X - mean, full_matrices=False)
    K = int(min(components, N - 1, (S > S[0] * 1e-6).sum()))
    basis = Vt[:K]
    target = (X - mean) @ basis.T  # [N, K]
    c = torch.from_numpy(codes).double()
    low, high = c.min(0).values, c.max(0).values
    code_mean, code_std = c.mean(0), c.std(0, unbiased=False).clamp_min(1e-6)
    z = (c - code_mean) / code_std
    A = torch.cat([z, torch.ones(N, 1, dtype=z.dtype)], 1)
    reg = ridge * N * torch.eye(A.shape[1], dtype=z.dtype)
    reg[-1, -1] = 0
    sol = torch.linalg.solve(A.T @ A + reg, A.T @ target)
    arrays = {"vertices": template.vertices.double(), "faces": template.faces, "canonical": template.canonical.double(),
              "mean": mean.reshape(V, 5), "basis": basis.reshape(K, V, 5), "code_mean": code_mean, "code_std": code_std,
              "code_low": low, "code_high": high, "linear_weight": sol[:-1], "linear_bias": sol[-1]}
    if kind == "mlp":
        arrays.update(_fit_residual_mlp(z.float(), (target - A @ sol).float(), hidden, steps, seed))
    return LearnedHead({k: v.float() if v.is_floating_point() else v for k, v in arrays.items()}, kind)


def _fit_residual_mlp(z: torch.Tensor, residual: torch.Tensor, hidden: int, steps: int, seed: int) -> dict:
    """silu(z W1 + b1) W2 + b2 fitted to what the linear map leaves (full batch Adam, weight decay)."""
    g = torch.Generator().manual_seed(seed)
    E, K = z.shape[1], residual.shape[1]
    w1 = (torch.randn(E, hidden, generator=g) / E ** 0.5).requires_grad_()
    b1 = torch.zeros(hidden, requires_grad=True)
    w2 = torch.zeros(hidden, K, requires_grad=True)
    b2 = torch.zeros(K, requires_grad=True)
    opt = torch.optim.AdamW([w1, b1, w2, b2], lr=3e-3, weight_decay=1e-3)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = (F.silu(z @ w1 + b1) @ w2 + b2 - residual).pow(2).sum(1).mean()
            loss.backward()
            opt.step()
    return {"hidden_weight": w1.detach(), "hidden_bias": b1.detach(), "out_weight": w2.detach(),
            "out_bias": b2.detach()}


def evaluate(head: LearnedHead, frames: TrackedFrames, index, camera_name: str, renders: int = 16) -> dict:
    """Held-out figures: vertex error (mean, p95, max, mm) against the matched tracked vertices (pose removed), PSNR
    (dB, mean over up to `renders` frames) of the fitted mesh against the tracked mesh in the synthetic look."""
    from ..data.synthetic_look import render_mesh
    from ..metrics import psnr

    errors = []
    for code, target in zip(frames.codes, frames.offsets):
        pred = head.offsets(torch.from_numpy(code))[:, :3].numpy()
        errors.append(np.linalg.norm(pred - target[:, :3], axis=1) * 1000.0)
    errors = np.concatenate(errors)
    camera, cache, scores = index.cameras[camera_name], {}, []
    for i in np.linspace(0, len(frames.keys) - 1, min(renders, len(frames.keys))).round().astype(int):
        seq, frame = frames.keys[i]
        posed = head.posed_mesh(torch.from_numpy(frames.codes[i]))
        R, t = torch.from_numpy(frames.rotations[i]).float(), torch.from_numpy(frames.translations[i]).float()
        placed = posed.with_vertices(posed.vertices @ R.T + t)
        fitted, _ = render_mesh(placed, camera)
        tracked, _ = render_mesh(index.mesh(seq, frame, cache), camera)
        scores.append(float(psnr(fitted.permute(2, 0, 1)[None], tracked.permute(2, 0, 1)[None])))
    code = torch.from_numpy(frames.codes[0])
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        head.posed_mesh(code)
        times.append(time.perf_counter() - t0)
    return {"vertex_mm_mean": float(errors.mean()), "vertex_mm_p95": float(np.percentile(errors, 95)),
            "vertex_mm_max": float(errors.max()), "psnr_db": float(np.mean(scores)), "psnr_frames": len(scores),
            "pose_ms": float(np.median(times) * 1000.0)}


def fit_head(root: str | os.PathLike, kind: str = "auto", components: int = 32, hidden: int = 128,
             steps: int = 1500, seed: int = 0, template: tuple[str, int] | None = None, max_frames: int = 1200,
             progress: bool = True) -> tuple[LearnedHead, dict]:
    """Fit a learned head on the dataset folder `root`; `kind` "linear", "mlp" or "auto" (the one with the lower
    held-out vertex error). Returns (head, report): {"template", "train_frames", "heldout_frames", "match_mm"
    (held-out mean, worst), "kinds": {kind: evaluate(...)}, "chosen"}. At most `max_frames` training frames
    (evenly spaced) are kept: the offsets are held in memory (frames x vertices x 5 floats)."""
    from ..data.dataset import DatasetIndex

    if kind not in (*KINDS, "auto"):
        raise InputError(f"--kind must be one of {[*KINDS, 'auto']}, got {kind!r}")
    index = DatasetIndex(root)
    train_keys, held_keys = split_frames(index)
    if len(train_keys) < 2 or not held_keys:
        raise InputError(f"{index.root} has {len(train_keys)} training and {len(held_keys)} held-out frames; "
                         "fitting a head model needs at least 2 and 1")
    if template is None:
        template = neutral_frame(index, train_keys)
    elif template not in set(train_keys) | set(held_keys):
        raise InputError(f"template frame {template} is not a frame of {index.root}")
    if len(train_keys) > max_frames:
        train_keys = [train_keys[i] for i in np.linspace(0, len(train_keys) - 1, max_frames).round().astype(int)]
    mesh = index.mesh(*template, {})
    train = match_frames(index, train_keys, mesh, progress)
    held = match_frames(index, held_keys, mesh, progress)
    camera = next((c for c in index.eval_cameras), next(iter(index.cameras)))
    report = {"template": list(template), "vertices": mesh.num_vertices, "train_frames": len(train_keys),
              "heldout_frames": len(held_keys), "camera": camera,
              "match_mm": [float(held.match_mm.mean()), float(held.match_mm.max())], "kinds": {}}
    heads = {}
    for k in (KINDS if kind == "auto" else (kind,)):
        heads[k] = fit_map(train.codes, train.offsets, mesh, k, components, hidden, steps, seed)
        report["kinds"][k] = evaluate(heads[k], held, index, camera)
    chosen = min(heads, key=lambda k: report["kinds"][k]["vertex_mm_mean"])
    report["chosen"] = chosen
    return heads[chosen], report
