"""`convert_nersemble`: the release's tracked data of one person (NeRSemble layout, read by `engine.data.nersemble`)
into the project's dataset format, so `AvatarDataset` (and so training and evaluation) read it like synthetic data.
CLI: `avatar import-nersemble SRC --out DST` (`engine.data.import_nersemble`).

Per-frame topology (marching cubes per frame), so the dataset has no shared topology: each frame's world-space mesh
is written to `<seq>/meshes/<t>.npz`. Cameras are named by serial; frames are renumbered 0..T-1 and the release's
timestep numbers kept as each sequence's "source_frames". Default split: the release's, camera 222200037 and the
person's two held-out sequences where they are present.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import FormatError, InputError
from ..geometry import Camera
from .nersemble import RELEASE_EVAL_CAMERA, RELEASE_EVAL_SEQUENCES, NersemblePerson
from .writer import DatasetWriter


def _downscaled(cam: Camera, d: int) -> Camera:
    # Plain intrinsics scaling, as the release rescales its intrinsics for downscaled images.
    return Camera(R=cam.R, t=cam.t, fx=cam.fx / d, fy=cam.fy / d, cx=cam.cx / d, cy=cam.cy / d,
                  width=cam.width // d, height=cam.height // d)


def convert_nersemble(src: str | Path, dst: str | Path, *, sequences: Sequence[str] | None = None,
                      cameras: Sequence[str] | None = None, eval_cameras: Sequence[str] | None = None,
                      eval_sequences: Sequence[str] | None = None, every: int = 1, downscale: int = 1,
                      include_eyes: bool = True, cut_neck: bool = True, matting: bool = True,
                      color_correction: bool = True, remove_torso: bool = True, nphm_tracking: str | None = None,
                      flame_tracking: str | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    """Convert the person folder `src` into a dataset folder `dst`; returns the path of its `dataset.json`.

    `sequences` / `cameras` (serials): subsets (default: all). `every`: keep every n-th timestep. `downscale`: shrink
    images by this integer factor (box filter) beyond the release's own `images-<N>x`. `eval_cameras` /
    `eval_sequences`: the held-out split (default: the release's where present). The other flags switch off parts
    of the image preparation (see `NersembleSequence.image`) or the eye parameters (200-D codes instead of 206).
    """
    from tqdm import tqdm

    for name, v in (("every", every), ("downscale", downscale)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise InputError(f"{name} must be an integer >= 1, got {v!r}")
    person = NersemblePerson(src)
    seq_names = list(sequences) if sequences else person.sequences
    serials = list(cameras) if cameras else list(person.cameras)
    unknown = [s for s in seq_names if s not in person.sequences] + [c for c in serials if c not in person.cameras]
    if unknown:
        raise InputError(f"{src} has no sequence/camera {unknown}; sequences: {person.sequences}, cameras: "
                         f"{list(person.cameras)}")
    seqs = [person.sequence(s, nphm_tracking, flame_tracking) for s in seq_names]
    factors = {s.image_factor for s in seqs}
    if None in factors:
        bad = [s.name for s in seqs if s.image_factor is None]
        raise FormatError(f"sequence(s) {bad} have no images (timesteps/frame_*/images*/); the converter needs them")
    if len(factors) > 1:
        raise FormatError(f"the sequences use different image downscale factors {sorted(factors)}; convert them "
                          "separately")
    native = {c: seqs[0].camera(c) for c in serials}  # at the resolution of the release's images
    cams = {c: _downscaled(cam, downscale) for c, cam in native.items()}
    first = seqs[0]
    t0 = first.timesteps[0]
    writer = DatasetWriter(dst, cameras=cams, expression_dim=len(first.expression(t0, include_eyes)),
                           canonical_dims=5, source="nersemble", overwrite=overwrite)
    total = sum(len(s.timesteps[::every]) for s in seqs)
    with tqdm(total=total, desc="converting", unit="frame", disable=not progress) as bar:
        for seq in seqs:
            steps = seq.timesteps[::every]
            codes = []
            for j, t in enumerate(steps):
                codes.append(seq.expression(t, include_eyes))
                writer.write_mesh(seq.name, j, seq.mesh(t, cut_neck=cut_neck))
                for serial, cam in cams.items():
                    got = seq.image(t, serial, matting=matting, color_correction=color_correction,
                                    remove_torso=remove_torso)
                    if got is None:
                        raise FormatError(f"sequence {seq.name!r} has no image of camera {serial} at timestep {t} "
                                          f"(in {seq.folder / 'timesteps' / f'frame_{t:05d}'}); leave the camera out "
                                          "(cameras=...) or restore the image")
                    rgb, alpha = got
                    n = native[serial]
                    if rgb.shape[:2] != (n.height, n.width):
                        raise FormatError(f"image of camera {serial} at timestep {t} of {seq.name!r} is "
                                          f"{rgb.shape[1]}x{rgb.shape[0]}, but the calibration's image_size / "
                                          f"{seq.image_factor} (images-{seq.image_factor}x) is {n.width}x{n.height}")
                    if downscale > 1:
                        rgb, alpha = _shrink(rgb, cam), _shrink(alpha, cam)
                    writer.write_image(seq.name, serial, j, rgb, alpha)
                bar.update(1)
            if len({len(c) for c in codes}) != 1:
                raise FormatError(f"sequence {seq.name!r} has expression codes of different lengths")
            writer.write_sequence(seq.name, np.stack(codes), source_frames=steps)
    if eval_cameras is None:
        eval_cameras = [RELEASE_EVAL_CAMERA] if RELEASE_EVAL_CAMERA in cams and len(cams) > 1 else []
    if eval_sequences is None:
        eval_sequences = [s for s in RELEASE_EVAL_SEQUENCES.get(person.person_id, []) if s in seq_names]
        eval_sequences = eval_sequences if len(eval_sequences) < len(seq_names) else []
    return writer.finish(eval_cameras=eval_cameras, eval_sequences=eval_sequences)


def _shrink(image: np.ndarray, cam: Camera) -> np.ndarray:
    """`image` [H, W(, C)] float in [0, 1] box-filtered to the camera's size."""
    planes = image[..., None] if image.ndim == 2 else image
    out = np.stack([np.asarray(Image.fromarray(planes[..., c].astype(np.float32)).resize(
        (cam.width, cam.height), Image.BOX)) for c in range(planes.shape[-1])], axis=-1)
    return out[..., 0] if image.ndim == 2 else out
