"""Synthetic multi-view training data: the synthetic head (`engine.data.synthetic`) rendered by a camera rig through
many expression sequences, written in the dataset format of `engine.data.dataset`. CLI: `avatar make-data`
(`engine.data.write_synthetic`).

Expression sequences (8-D ARKit rig, every value in [0, 1], seeded):
- even-numbered sequences are *sweeps*: each raises single dimensions one after the other from 0 to full strength
  and back (a raised-cosine bump); the dimensions are dealt round-robin over the sweep sequences, so together they
  take every dimension to 1.0;
- odd-numbered sequences are *combinations*: 2 to 4 random dimensions move together along smooth curves through
  random key values (cosine-eased between keys every few frames), the others stay at 0.
Held out for evaluation: `eval_cameras` cameras of middling angle from the front (neither the frontal nor the most
oblique view, so evaluation interpolates between training views; `eval_camera_indices`), and the last
`eval_sequences` combination sequences (the sweeps stay in training, so every dimension is seen at full strength).
With `detail=True` every frame also gets its own fine texture (`synthetic_look.DetailField`, seeded by
`detail_seed(seed, sequence, frame)`, the same in all of the frame's views): data the mesh does not determine, for
the few-step students; `dataset.json` records it under "detail".
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from .writer import DatasetWriter


def sweep_curve(dims: list[int], frames: int, dim: int) -> np.ndarray:
    """[frames, dim] float32: the `dims` raised one after the other, each by a 0 -> 1 -> 0 sin^2 bump over its share
    of the frames (its middle frame(s) at exactly 1). With more dims than frames, some dims get no frame."""
    codes = np.zeros((frames, dim), dtype=np.float32)
    if not dims:
        return codes
    per = frames / len(dims)
    for k, d in enumerate(dims):
        start, stop = round(k * per), round((k + 1) * per)
        if stop > start:
            bump = np.sin(np.pi * np.arange(1, stop - start + 1) / (stop - start + 1)) ** 2
            codes[start:stop, d] = bump / bump.max()  # the middle frame(s) reach exactly 1
    return codes


def combination_curve(rng: np.random.Generator, frames: int, dim: int, key_every: int = 6) -> np.ndarray:
    """[frames, dim] float32: 2-4 random dimensions eased through random keys in [0, 1]; the others 0."""
    active = rng.choice(dim, size=min(dim, int(rng.integers(2, 5))), replace=False)
    n_keys = max(2, math.ceil((frames - 1) / key_every) + 1)
    keys = np.zeros((n_keys, dim))
    keys[1:, active] = rng.uniform(0.0, 1.0, size=(n_keys - 1, len(active)))  # start at rest
    pos = np.linspace(0.0, n_keys - 1, frames)
    lo = np.minimum(np.floor(pos).astype(int), n_keys - 2)
    w = 0.5 - 0.5 * np.cos(np.pi * (pos - lo))  # cosine ease: a convex blend, so values stay in [0, 1]
    return ((1 - w)[:, None] * keys[lo] + w[:, None] * keys[lo + 1]).astype(np.float32)


def expression_sequences(sequences: int, frames: int, dim: int = 8, seed: int = 0) -> list[np.ndarray]:
    """`sequences` arrays [frames, dim] float32 in [0, 1]: sweeps (even indices) and combinations (odd)."""
    rng = np.random.default_rng(seed)
    n_sweeps = (sequences + 1) // 2
    out = []
    for i in range(sequences):
        if i % 2 == 0:
            k = i // 2
            out.append(sweep_curve([d for d in range(dim) if d % n_sweeps == k], frames, dim))
        else:
            out.append(combination_curve(rng, frames, dim))
    return out


def held_out(n: int, k: int) -> list[int]:
    """`k` of the ranks 0..n-1 spread evenly, away from both ends where n allows."""
    return sorted({min(n - 1, int((j + 1) * n / (k + 1))) for j in range(k)})


def eval_camera_indices(cameras: list, k: int) -> list[int]:
    """`k` rig cameras to hold out: ranked by their angle from the frontal direction (+z), the ranks `held_out`
    picks, so held-out views are neither the frontal one nor the most oblique (evaluation interpolates)."""
    angles = [float(torch.arccos((c.center / c.center.norm())[2].clamp(-1, 1))) for c in cameras]
    order = sorted(range(len(cameras)), key=lambda i: (angles[i], i))
    return sorted(order[r] for r in held_out(len(cameras), k))


def detail_seed(seed: int, sequence: int, frame: int) -> int:
    """The seed of one frame's `DetailField` in a dataset made with `seed`."""
    return int(np.random.SeedSequence([seed, sequence, frame, 0xDE7A11]).generate_state(1)[0])


def write_synthetic_dataset(root: str | Path, sequences: int = 12, frames_per_sequence: int = 24, cameras: int = 12,
                            size: int = 128, eval_cameras: int = 1, eval_sequences: int = 2, seed: int = 0,
                            progress: bool = True, overwrite: bool = False, supersample: int = 2,
                            detail: bool = False, detail_band: tuple[float, float] | None = None,
                            psf: float = 0.0) -> Path:
    """Render and write a synthetic dataset to `root`; returns the path of its `dataset.json`.

    `sequences` x `frames_per_sequence` frames, each seen by `cameras` rig cameras at `size` x `size` pixels; the
    mesh is the synthetic head's (shared topology, per-frame vertices). Cost: sequences x frames x cameras renders.
    `detail_band`: the detail's wave numbers (rad/m; default `synthetic_look.DETAIL_BAND`, sized for 128 px: lower it
    for smaller images, where the default's 1-2 cm wavelengths fall under two pixels). `psf`: a camera's Gaussian
    point-spread in pixels (`SyntheticHead.render`), recorded with `supersample` in dataset.json's "render".
    """
    from tqdm import tqdm

    from .synthetic import SYNTHETIC_VERSION, SyntheticHead, check_psf, default_rig_cameras
    from .synthetic_look import DETAIL_BAND, DetailField

    band = DETAIL_BAND if detail_band is None else tuple(float(v) for v in detail_band)
    if len(band) != 2 or not all(math.isfinite(v) for v in band) or not 0 < band[0] <= band[1]:
        raise InputError(f"detail_band must be two wave numbers 0 < low <= high (rad/m), got {detail_band!r}")
    psf = check_psf(psf)
    for name, v, lo in (("sequences", sequences, 1), ("frames_per_sequence", frames_per_sequence, 1),
                        ("cameras", cameras, 1), ("size", size, 16), ("eval_cameras", eval_cameras, 0),
                        ("eval_sequences", eval_sequences, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise InputError(f"{name} must be an integer >= {lo}, got {v!r}")
    if eval_cameras >= cameras:
        raise InputError(f"eval_cameras ({eval_cameras}) must be fewer than cameras ({cameras}): training needs a view")
    n_combos = sequences // 2
    if eval_sequences > n_combos or eval_sequences >= sequences:
        raise InputError(f"eval_sequences ({eval_sequences}) must be at most the number of combination sequences "
                         f"({n_combos} of {sequences}); write more sequences or hold out fewer")

    head = SyntheticHead()
    rig = default_rig_cameras(n=cameras, size=size)
    cams = {f"cam{i:02d}": cam for i, cam in enumerate(rig)}
    names = list(head.expression_names)
    curves = expression_sequences(sequences, frames_per_sequence, len(names), seed)
    writer = DatasetWriter(root, cameras=cams, expression_dim=len(names), expression_names=names,
                           topology=head.neutral_mesh(), source="synthetic", synthetic_version=SYNTHETIC_VERSION,
                           detail=_detail_record(seed, band) if detail else None, overwrite=overwrite,
                           render={"supersample": supersample, "psf_px": psf})
    total = sequences * frames_per_sequence * cameras
    with tqdm(total=total, desc="rendering", unit="img", disable=not progress) as bar:
        for s, codes in enumerate(curves):
            seq = f"seq{s:03d}"
            vertices = []
            for t, code in enumerate(torch.from_numpy(codes)):
                vertices.append(head.posed_mesh(code).vertices.detach().cpu().numpy())
                field = DetailField.draw(detail_seed(seed, s, t), band=band) if detail else None
                for cam_name, cam in cams.items():
                    rgb, alpha = head.render(cam, code, supersample=supersample, detail=field, psf=psf)
                    writer.write_image(seq, cam_name, t, rgb, alpha)
                    bar.update(1)
            writer.write_sequence(seq, codes, vertices=np.stack(vertices))
    eval_cams = [f"cam{i:02d}" for i in eval_camera_indices(rig, eval_cameras)] if eval_cameras else []
    combos = [s for s in range(sequences) if s % 2 == 1]
    eval_seqs = [f"seq{s:03d}" for s in combos[len(combos) - eval_sequences:]] if eval_sequences else []
    return writer.finish(eval_cameras=eval_cams, eval_sequences=eval_seqs)



def _detail_record(seed: int, band: tuple[float, float]) -> dict:
    """What dataset.json says of the per-frame detail: how it was drawn."""
    from .synthetic_look import DETAIL_AMPLITUDE, DETAIL_WAVES

    return {"field": "engine.data.synthetic_look.DetailField", "waves": DETAIL_WAVES,
            "band_rad_per_m": list(band), "amplitude": DETAIL_AMPLITUDE,
            "frame_seed": f"engine.data.synthetic_dataset.detail_seed({seed}, sequence, frame)"}
