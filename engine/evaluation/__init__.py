"""Evaluation of an avatar on held-out frames (`evaluate`; the `avatar eval` command is `engine.evaluation.cli`).

- `held_out.py`: the frames scored: a dataset's eval split (`--data DIR`: unseen cameras and unseen sequences) or,
  for an avatar whose head model is the synthetic head, frames regenerated on the fly between the cameras of the
  avatar's own training rig. Generator, dataset and avatar must agree on `synthetic_version` (ConfigError
  otherwise).
- `scores.py`: the scores of rendered frames against the truth, shared with the training loop's validation.

Reported (JSON-safe): PSNR over the whole frame and inside the ground truth's head mask, SSIM, mean and per frame;
temporal flicker on a smooth camera + expression sequence (mean absolute difference of consecutive frames in [0, 1]
units, of the prediction and of the ground truth, and their ratio: 1 is as steady as the truth); the autoencoder
ceiling (the same scores of decode(encode(ground truth)) by the avatar's VAE: no rendered frame can beat what its
VAE keeps); the neutral-code comparison (head-mask PSNR of the more expressive half of the frames rendered with
their true code minus the same frames rendered with the neutral code: how much the expression code is honoured);
LPIPS with `lpips_weights`; JOD (FovVideoVDP) with `jod`. Recorded images larger than the avatar's square are cut
to the head-centred square crop (`held_out.cropped_to`), as `avatar render --dataset` renders them. With `out`, also
`metrics.json` and `grid.png` (prediction | ground truth | error).
"weights" records which weights were scored (`scores.weights_sha256`): the sha256 of `weights_file` (the avatar
folder's `model.safetensors`, as `sha256sum` prints it) when given, else of the state dict.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import ConfigError, InputError
from ..files import write_atomic
from .held_out import HeldOutFrame, check_versions, cropped_to, dataset_frames, synthetic_frames
from .scores import (
    LPIPS,
    autoencoder_images,
    expression_gain,
    expressive_half,
    flicker_scores,
    frame_scores,
    jod_score,
    json_safe,
    mean_score,
    save_grid,
    to_unit,
    weights_sha256,
)


def evaluate(avatar, data: str | Path | None = None, frames: int = 16, sampler: str = "ddpm", steps: int = 20,
             seed: int | None = None, out: str | Path | None = None, device: str = "cpu",
             lpips_weights: str | Path | None = None, batch_size: int = 4,
             weights_file: str | Path | None = None, jod: bool = False) -> dict:
    """Score `avatar` on held-out frames (see the module docstring); returns the JSON-safe result. `weights_file`:
    the `model.safetensors` `avatar` was loaded from, whose sha256 the result records (else the state dict's).
    `jod`: also FovVideoVDP's JOD of the flicker sequence as a video (`scores.jod`, needs pyfvvdp)."""
    from ..heads import StaticHead
    from ..renderer import Renderer

    if not isinstance(frames, int) or frames < 2:
        raise InputError(f"frames must be an integer >= 2 (flicker needs consecutive frames), got {frames!r}")
    config = avatar.config
    head = avatar.head_model
    if data is not None:
        held, sequence, dataset = dataset_frames(data, frames)
        size = (config.image_size, config.image_size)
        if dataset.image_size != size and min(dataset.image_size) >= config.image_size:  # recorded images: crop
            held, sequence = cropped_to(held, config.image_size), cropped_to(sequence, config.image_size)
        elif dataset.image_size != size or dataset.expression_dim != config.expression_dim:
            raise ConfigError(f"{data} has {dataset.image_size[0]}x{dataset.image_size[1]} images and "
                              f"{dataset.expression_dim}-value codes, avatar {config.name!r} renders "
                              f"{config.image_size}x{config.image_size} from {config.expression_dim}: use its data")
        if dataset.index.synthetic_version is not None or config.synthetic_version is not None:
            check_versions(config.synthetic_version, dataset.index.synthetic_version, data)
    else:
        if not hasattr(head, "render"):
            raise ConfigError(f"avatar {config.name!r} has head model {config.head_model!r}, which cannot render "
                              "ground truth; pass --data DIR (a dataset with an eval split)")
        if config.synthetic_version is None:
            raise ConfigError(f"avatar {config.name!r} does not record the synthetic_version it was trained on; "
                              "pass --data with its dataset, or retrain it with `avatar train`")
        check_versions(config.synthetic_version)
        held, sequence = synthetic_frames(avatar, frames)

    renderer = Renderer(avatar, device=device, sampler=sampler, steps=steps, seed=seed, backend="reference")

    def render(batch: list[HeldOutFrame], codes=None, meshes=None) -> torch.Tensor:
        chunks = []
        for i in range(0, len(batch), batch_size):
            part = batch[i:i + batch_size]
            c = torch.stack([f.code for f in part]) if codes is None else codes[i:i + batch_size]
            m = [f.mesh for f in part] if meshes is None else meshes[i:i + batch_size]
            chunks.append(to_unit(renderer.render_batch([f.camera for f in part], c, m)))
        return torch.cat(chunks)

    pred = render(held)
    truth, mask = torch.stack([f.image for f in held]), torch.stack([f.mask for f in held])
    scores = frame_scores(pred, truth, mask)
    if lpips_weights is not None:
        values = LPIPS(lpips_weights).to(device)(pred, truth)
        for s, v in zip(scores, values):
            s["lpips"] = v
    per_frame = [{**f.label, **s} for f, s in zip(held, scores)]
    result = {"avatar": config.name, "data": str(data) if data is not None else "synthetic (regenerated)",
              "frames": len(held), "sampler": sampler, "steps": steps, "weights": weights_sha256(avatar, weights_file)}
    for key in scores[0]:
        result[key] = mean_score(s[key] for s in scores)
    ceiling = frame_scores(autoencoder_images(avatar.vae, truth, batch_size), truth, mask)
    result["autoencoder"] = {key: mean_score(s[key] for s in ceiling) for key in ceiling[0]}
    rendered_sequence, true_sequence = render(sequence), torch.stack([f.image for f in sequence])
    result["flicker"] = flicker_scores(rendered_sequence, true_sequence)
    if jod:
        result["jod"] = jod_score(rendered_sequence, true_sequence)
    # the neutral code on the more expressive half: how much of the in-mask quality the code itself buys
    expressive = expressive_half(torch.stack([f.code for f in held]))
    subset = [held[i] for i in expressive]
    neutral = torch.zeros(len(subset), config.expression_dim)
    posing = head is not None and not isinstance(head, StaticHead)
    meshes = [head.posed_mesh(c) for c in neutral] if posing else None
    neutral_scores = frame_scores(render(subset, neutral, meshes), truth[expressive], mask[expressive])
    result["neutral"] = {**expression_gain(scores, neutral_scores, expressive), "neutral_mesh": posing}
    result["per_frame"] = per_frame
    result = json_safe(result)
    if out is not None:
        out = Path(out)
        result["grid"] = str(save_grid(out / "grid.png", pred, truth))
        write_atomic(out / "metrics.json", (json.dumps(result, indent=1) + "\n").encode())
    return result
