"""`avatar eval`: render held-out frames with the `Renderer` and score them against the ground truth.

Held-out frames come from a dataset's eval split (`--data DIR`: unseen cameras and unseen sequences) or, for an
avatar whose head model is the synthetic head, are regenerated on the fly: the synthetic rig's cameras turned by half
the rig's spacing in yaw (so none is a training camera), through expression curves of the dataset generator's kind
drawn with a seed no dataset uses (`HELD_OUT_SEED`). Generator, dataset and avatar must agree on
`synthetic_version` (ConfigError otherwise).

Reported (JSON, or a short table): PSNR over the whole frame and inside the ground truth's head mask, SSIM, mean and
per frame; temporal flicker on a smooth camera + expression sequence (mean absolute difference of consecutive frames
in [0, 1] units, of the prediction and of the ground truth, and their ratio: 1 is as steady as the truth); the
autoencoder ceiling (the same scores of decode(encode(ground truth)) by the avatar's VAE: no rendered frame can beat
what its VAE keeps); the neutral-code comparison (head-mask PSNR of the more expressive half of the frames rendered
with their true code minus the same frames rendered with the neutral code: how much the expression code is
honoured); LPIPS with `--lpips-weights`. With `--out`, also `metrics.json` and `grid.png` (prediction | ground
truth | error).
"""

from __future__ import annotations

import argparse
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import BackendError, CheckpointError, ConfigError, InputError
from .files import write_atomic
from .geometry import Camera, Mesh
from .metrics import psnr, ssim

HELD_OUT_SEED = 7_919  # expression curves no training set draws (datasets use small seeds, 0 by default)
ERROR_GAIN = 4.0  # the grid's error column shows the mean |prediction - truth| over RGB x 4


@dataclass
class HeldOutFrame:
    """One scored frame: camera, code `[E]` float32, posed mesh, truth `image` `[3, H, W]` float32 in [0, 1] (8-bit
    values, over white) and head `mask` `[1, H, W]` float32, and a label (JSON-safe) saying where it comes from."""

    camera: Camera
    code: torch.Tensor
    mesh: Mesh
    image: torch.Tensor
    mask: torch.Tensor
    label: dict


# -- scoring helpers (also used by the training loop's validation) ---------------------------------------
def to_unit(pixels) -> torch.Tensor:
    """uint8 frames `[B, H, W, 3]` (numpy or tensor) -> float32 `[B, 3, H, W]` in [0, 1]."""
    return torch.as_tensor(np.asarray(pixels)).permute(0, 3, 1, 2).float() / 255.0


def target_images(items) -> tuple[torch.Tensor, torch.Tensor]:
    """Dataset items -> (images `[B, 3, H, W]` in [0, 1], rounded to 8-bit values; masks `[B, 1, H, W]`)."""
    images = torch.stack([it["image"] for it in items]).float()
    return ((images + 1) / 2 * 255).round().clamp(0, 255) / 255, torch.stack([it["mask"] for it in items]).float()


def frame_scores(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> list[dict]:
    """Per frame {"psnr", "psnr_mask", "ssim"} of `pred` vs `target` (`[B, 3, H, W]` in [0, 1]) with head masks
    `[B, 1, H, W]` (psnr_mask is NaN for a frame whose mask is empty)."""
    whole, structure = psnr(pred, target).tolist(), ssim(pred, target).tolist()
    covered = mask.flatten(1).sum(1) > 0
    inside = [math.nan] * len(whole)
    if covered.any():
        values = psnr(pred[covered], target[covered], mask[covered]).tolist()
        for i, v in zip(covered.nonzero().flatten().tolist(), values):
            inside[i] = v
    return [{"psnr": a, "psnr_mask": b, "ssim": c} for a, b, c in zip(whole, inside, structure)]


@torch.no_grad()
def autoencoder_images(vae, target: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """decode(encode(target)) with the posterior mean, `[B, 3, H, W]` in [0, 1]: what the avatar's VAE alone keeps of
    the ground truth, the ceiling every frame the diffusion model renders sits under."""
    weight = next(vae.parameters())
    chunks = []
    for part in target.split(batch_size):
        x = (part * 2 - 1).to(weight.device, weight.dtype)
        image = vae.decode(vae.encode(x).latent_dist.mean).sample
        chunks.append((image.float().cpu() / 2 + 0.5).clamp(0, 1))
    return torch.cat(chunks)


def save_grid(path: str | Path, pred: torch.Tensor, target: torch.Tensor) -> Path:
    """Write a PNG with one row per frame: prediction | ground truth | error (`[B, 3, H, W]` in [0, 1]; the error is
    the mean absolute difference over RGB x ERROR_GAIN, black where exact); written to a temporary file and
    renamed."""
    error = ((pred - target).abs().mean(1, keepdim=True) * ERROR_GAIN).clamp(0, 1).expand_as(pred)
    rows = torch.cat([pred, target, error], dim=3)  # [B, 3, H, 3W]
    grid = (torch.cat(list(rows), dim=1).permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG")
    path = Path(path)
    write_atomic(path, buffer.getvalue())
    return path


def flicker(frames: torch.Tensor) -> float:
    """Mean absolute difference of consecutive frames `[F, 3, H, W]` in [0, 1] (F >= 2)."""
    return float((frames[1:] - frames[:-1]).abs().mean())


# -- held-out frames ------------------------------------------------------------------------------------
def turn_camera(camera: Camera, yaw: float) -> Camera:
    """`camera` moved around the vertical axis through the origin (the head's centre) by `yaw` radians, still
    looking at the same point: centre C' = Ry C, rotation R' = R Ry^T."""
    c, s = math.cos(yaw), math.sin(yaw)
    ry = torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]], dtype=torch.float64)
    R = camera.R.double() @ ry.T
    centre = ry @ camera.center.double()
    return Camera(R.float(), (-R @ centre).float(), camera.fx, camera.fy, camera.cx, camera.cy, camera.width,
                  camera.height)


def held_out_cameras(size: int) -> list[Camera]:
    """Cameras of the synthetic rig's cap that no dataset trains on: each camera of the generator's default rig
    turned in yaw by half the rig's median nearest-neighbour angle, to whichever side lies farther from every rig
    camera; kept when that is at least a quarter of the angle (so all sit between training views, none on one)."""
    from .data.synthetic import default_rig_cameras
    from .data.write_synthetic import DEFAULTS

    rig = default_rig_cameras(n=DEFAULTS["cameras"], size=size)
    centres = torch.stack([c.center.double() for c in rig])
    directions = centres / centres.norm(dim=1, keepdim=True)
    angles = torch.arccos((directions @ directions.T).clamp(-1, 1)).fill_diagonal_(math.pi)
    spacing = float(angles.min(dim=1).values.median()) if len(rig) > 1 else math.radians(10.0)

    def clearance(cam: Camera) -> float:
        d = cam.center.double() / cam.center.double().norm()
        return float(torch.arccos((directions @ d).clamp(-1, 1)).min())

    held = []
    for cam in rig:
        best = max((turn_camera(cam, sign * spacing / 2) for sign in (1, -1)), key=clearance)
        if clearance(best) >= spacing / 4:
            held.append(best)
    return held


def synthetic_frames(avatar, frames: int) -> tuple[list[HeldOutFrame], list[HeldOutFrame]]:
    """(held-out frames, flicker sequence) regenerated by the avatar's synthetic head (see the module docstring)."""
    from .data.write_synthetic import combination_curve

    head = avatar.head_model
    size = avatar.config.image_size
    dim = avatar.config.expression_dim
    rng = np.random.default_rng(HELD_OUT_SEED)
    cameras = held_out_cameras(size)
    codes = np.concatenate([combination_curve(rng, 2 * frames, dim) for _ in range(2)])[1::4][:frames]
    held = [_synthetic(head, cameras[i % len(cameras)], codes[i], {"camera": f"heldout{i % len(cameras):02d}",
                                                                    "frame": i}) for i in range(frames)]
    # the flicker sequence: one held-out camera drifting 4 degrees in yaw while the face moves smoothly
    base = cameras[len(cameras) // 2]
    curve = combination_curve(rng, frames, dim)
    drift = np.linspace(-2.0, 2.0, frames)
    sequence = [_synthetic(head, turn_camera(base, math.radians(d)), curve[i], {"sequence": "flicker", "frame": i})
                for i, d in enumerate(drift)]
    return held, sequence


def _synthetic(head, camera: Camera, code: np.ndarray, label: dict) -> HeldOutFrame:
    code = torch.from_numpy(np.asarray(code, np.float32))
    rgb, alpha = head.render(camera, code, supersample=2)
    image = (torch.as_tensor(rgb).float().permute(2, 0, 1) * 255).round().clamp(0, 255) / 255
    mask = (torch.as_tensor(alpha).float()[None] * 255).round() / 255
    return HeldOutFrame(camera, code, head.posed_mesh(code), image, mask, label)


def dataset_frames(root: str | Path, frames: int) -> tuple[list[HeldOutFrame], list[HeldOutFrame], object]:
    """(held-out frames spread evenly over the eval split, the longest-held-out run of consecutive frames of one
    camera for flicker, the dataset)."""
    from .data.dataset import AvatarDataset

    data = AvatarDataset(root, "eval")
    picks = np.linspace(0, len(data) - 1, min(frames, len(data))).round().astype(int)
    held = [_item(data[int(i)]) for i in picks]
    runs: dict[tuple[str, str], list[int]] = {}
    for i, (seq, cam, _) in enumerate(data.samples):
        runs.setdefault((seq, cam), []).append(i)
    rank = {"both": 0, "sequence": 1, "camera": 2, "none": 3}
    key = min(runs, key=lambda k: (rank[data.index.holdout(*k)], -len(runs[k])))
    sequence = [_item(data[i]) for i in runs[key][:frames]]
    return held, sequence, data


def _item(item: dict) -> HeldOutFrame:
    image, mask = target_images([item])
    label = {"sequence": item["sequence"], "camera": item["camera_name"], "frame": int(item["frame"])}
    return HeldOutFrame(item["camera"], item["expression"], item["mesh"], image[0], mask[0], label)


def check_versions(avatar_version, data_version=None, data_root=None) -> None:
    """ConfigError unless the avatar's and the dataset's `synthetic_version` (each when not None) are this engine's
    generator's (so they also agree with each other)."""
    from .data.synthetic import check_synthetic_version

    if avatar_version is not None:
        check_synthetic_version(avatar_version, "the avatar")
    if data_version is not None:
        check_synthetic_version(data_version, f"the dataset {data_root}")


# -- evaluation -----------------------------------------------------------------------------------------
def evaluate(avatar, data: str | Path | None = None, frames: int = 16, sampler: str = "ddpm", steps: int = 20,
             seed: int | None = None, out: str | Path | None = None, device: str = "cpu",
             lpips_weights: str | Path | None = None, batch_size: int = 4) -> dict:
    """Score `avatar` on held-out frames (see the module docstring); returns the JSON-safe result."""
    from .heads import StaticHead
    from .renderer import Renderer

    if not isinstance(frames, int) or frames < 2:
        raise InputError(f"frames must be an integer >= 2 (flicker needs consecutive frames), got {frames!r}")
    config = avatar.config
    head = avatar.head_model
    if data is not None:
        held, sequence, dataset = dataset_frames(data, frames)
        size = (config.image_size, config.image_size)
        if dataset.image_size != size or dataset.expression_dim != config.expression_dim:
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
              "frames": len(held), "sampler": sampler, "steps": steps}
    for key in scores[0]:
        result[key] = _mean(s[key] for s in scores)
    ceiling = frame_scores(autoencoder_images(avatar.vae, truth, batch_size), truth, mask)
    result["autoencoder"] = {key: _mean(s[key] for s in ceiling) for key in ceiling[0]}
    seq_pred = render(sequence)
    seq_truth = torch.stack([f.image for f in sequence])
    moving, steady = flicker(seq_pred), flicker(seq_truth)
    result["flicker"] = {"prediction": moving, "ground_truth": steady, "ratio": moving / steady if steady else None,
                         "frames": len(sequence)}
    # the neutral code on the more expressive half: how much of the in-mask quality the code itself buys
    norms = torch.stack([f.code.float().norm() for f in held])
    expressive = norms.argsort(descending=True)[: max(1, len(held) // 2)].tolist()
    subset = [held[i] for i in expressive]
    neutral = torch.zeros(len(subset), config.expression_dim)
    posing = head is not None and not isinstance(head, StaticHead)
    meshes = [head.posed_mesh(c) for c in neutral] if posing else None
    neutral_scores = frame_scores(render(subset, neutral, meshes), truth[expressive], mask[expressive])
    true_inside = _mean(scores[i]["psnr_mask"] for i in expressive)
    neutral_inside = _mean(s["psnr_mask"] for s in neutral_scores)
    result["neutral"] = {"frames": expressive, "psnr_mask": true_inside, "psnr_mask_neutral": neutral_inside,
                         "gain": true_inside - neutral_inside, "neutral_mesh": posing}
    result["per_frame"] = per_frame
    result = _finite(result)
    if out is not None:
        out = Path(out)
        result["grid"] = str(save_grid(out / "grid.png", pred, truth))
        write_atomic(out / "metrics.json", (json.dumps(result, indent=1) + "\n").encode())
    return result


def _finite(value):
    """`value` with NaN and infinite floats (an empty mask, identical images) as None: valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


class LPIPS:
    """LPIPS (Zhang et al. 2018) from local weights only: `path` is a state dict of a whole `lpips.LPIPS` module
    (backbone + linear heads; AlexNet or VGG, told apart by the first conv), e.g. written once where downloads work:
    `torch.save(lpips.LPIPS(net="alex").state_dict(), "lpips_alex.pth")`. Needs the `lpips` package."""

    def __init__(self, path: str | Path):
        try:
            import lpips
        except ImportError as e:
            raise BackendError("LPIPS needs the lpips package: pip install lpips (weights are read from "
                               "--lpips-weights only, nothing is downloaded)") from e
        path = Path(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several unrelated types for missing, damaged or foreign files
            raise CheckpointError(f"{path} is not a readable LPIPS state dict ({e}); see `avatar eval --help`") from e
        first = state.get("net.slice1.0.weight") if isinstance(state, dict) else None
        if first is None:
            raise CheckpointError(f"{path} is not a whole lpips.LPIPS state dict (no net.slice1.0.weight); save one "
                                  "with torch.save(lpips.LPIPS(net='alex').state_dict(), PATH)")
        net = "alex" if first.shape[-1] == 11 else "vgg"
        self.model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
        self.model.load_state_dict(state)
        self.model.eval().requires_grad_(False)

    def to(self, device) -> "LPIPS":
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> list[float]:
        """Per-frame LPIPS of `[B, 3, H, W]` images in [0, 1] (lower is closer)."""
        device = next(self.model.parameters()).device
        values = self.model(pred.to(device) * 2 - 1, target.to(device) * 2 - 1)
        return values.flatten().tolist()


# -- CLI ------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `avatar eval`."""
    p.add_argument("--avatar", required=True, help="an avatar folder, a shipped avatar (e.g. demo) or a preset")
    p.add_argument("--data", default=None, help="dataset folder: score its eval split (default: regenerate "
                   "held-out frames with the avatar's synthetic head)")
    p.add_argument("--frames", type=int, default=16, help="held-out frames, and flicker-sequence length (default: 16)")
    p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"], help="sampler (default: ddpm, the release's)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default: 20)")
    p.add_argument("--seed", type=int, default=None, help="fixed-noise seed (default: the avatar's)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--batch-size", type=int, default=4, help="frames rendered at once (default: 4)")
    p.add_argument("--out", default=None, help="folder for metrics.json and grid.png")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--lpips-weights", default=None, help="local state dict of a whole lpips.LPIPS module "
                   "(torch.save(lpips.LPIPS(net='alex').state_dict(), PATH)); needs `pip install lpips`")


def run(args: argparse.Namespace) -> None:
    """`avatar eval`: evaluate and print JSON or a table."""
    from .avatars import load_avatar

    avatar = load_avatar(args.avatar, device=args.device)
    result = evaluate(avatar, data=args.data, frames=args.frames, sampler=args.sampler, steps=args.steps,
                      seed=args.seed, out=args.out, device=args.device, lpips_weights=args.lpips_weights,
                      batch_size=args.batch_size)
    print(json.dumps(result, indent=1) if args.json else format_table(result))


def format_table(result: dict) -> str:
    """The short human-readable summary of an `evaluate` result."""
    lines = [f"avatar {result['avatar']} on {result['frames']} held-out frames ({result['data']}; "
             f"{result['sampler']} {result['steps']} steps)"]
    rows = [("PSNR (frame)", "psnr", "dB"), ("PSNR (head mask)", "psnr_mask", "dB"), ("SSIM", "ssim", ""),
            ("LPIPS", "lpips", "")]
    lines += [f"  {name:<22} {_num(result[key], 8, 3)} {unit}" for name, key, unit in rows if key in result]
    a = result["autoencoder"]
    lines.append(f"  {'VAE ceiling':<22} {_num(a['psnr'], 8, 3)} dB frame, {_num(a['psnr_mask'], 0, 3)} dB head mask, "
                 f"SSIM {_num(a['ssim'], 0, 3)}  (decode(encode(ground truth)))")
    f, n = result["flicker"], result["neutral"]
    lines.append(f"  {'flicker (pred / GT)':<22} {_num(f['prediction'], 8, 4)} / {_num(f['ground_truth'], 0, 4)}"
                 f"  ratio {_num(f['ratio'], 0, 2)}")
    lines.append(f"  {'code gain (head mask)':<22} {_num(n['gain'], 8, 3)} dB  ({_num(n['psnr_mask'], 0, 2)} true vs "
                 f"{_num(n['psnr_mask_neutral'], 0, 2)} neutral code)")
    if "grid" in result:
        lines.append(f"  grid: {result['grid']}")
    return "\n".join(lines)


def _num(value, width: int, digits: int) -> str:
    return f"{value:{width}.{digits}f}" if value is not None else f"{'n/a':>{width}}"
