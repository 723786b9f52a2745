"""Scores of rendered frames against their ground truth: PSNR (whole frame and head mask) and SSIM per frame, the
VAE's ceiling (decode(encode(truth))), flicker, LPIPS from local weights, the prediction / truth / error grid, and
the JSON-safe means `evaluate` reports. The training loop's validation scores its renders with the same functions.
"""

from __future__ import annotations

import hashlib
import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import BackendError, CheckpointError
from ..files import write_atomic
from ..metrics import psnr, ssim

ERROR_GAIN = 4.0  # the grid's error column shows the mean |prediction - truth| over RGB x 4


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


def flicker_scores(prediction: torch.Tensor, truth: torch.Tensor) -> dict:
    """The flicker of a rendered sequence `[F, 3, H, W]` against its ground truth's: {"prediction", "ground_truth",
    "ratio" (prediction / ground truth; 1 is as steady as the truth, None for a still truth), "frames"}."""
    moving, steady = flicker(prediction), flicker(truth)
    return {"prediction": moving, "ground_truth": steady, "ratio": moving / steady if steady else None,
            "frames": len(prediction)}


def expressive_half(codes: torch.Tensor) -> list[int]:
    """The indices of the more expressive half (at least one) of frames with codes `[N, E]`: the largest code norms,
    largest first."""
    norms = codes.float().norm(dim=1)
    return norms.argsort(descending=True, stable=True)[: max(1, len(codes) // 2)].tolist()


def expression_gain(scores: list[dict], neutral_scores: list[dict], frames: list[int]) -> dict:
    """How much the code itself buys in the head mask: the mean `psnr_mask` of `frames` (indices into `scores`, the
    frames rendered with their true code) minus the mean of `neutral_scores` (the same frames, in that order, rendered
    with the neutral code), in dB."""
    true_inside = mean_score(scores[i]["psnr_mask"] for i in frames)
    neutral_inside = mean_score(s["psnr_mask"] for s in neutral_scores)
    return {"frames": frames, "psnr_mask": true_inside, "psnr_mask_neutral": neutral_inside,
            "gain": true_inside - neutral_inside}


def weights_sha256(avatar, weights_file: str | Path | None = None) -> dict:
    """Which weights were scored: {"sha256": hex digest, "of": what was hashed}.

    With `weights_file` (an avatar folder's `model.safetensors`, which `avatar eval` passes for a folder or shipped
    avatar) the digest is the file's, the same as `sha256sum model.safetensors`, and "of" is its path. Otherwise (a
    preset, an avatar built in Python) it is the digest of the state dict, "of" is "state dict": for every tensor of
    `avatar.state_dict()` in sorted name order, the UTF-8 name, a NUL byte, the dtype and shape as text (e.g.
    "torch.float32(3, 4)"), a NUL byte, then the tensor's bytes (contiguous, CPU, native byte order)."""
    digest = hashlib.sha256()
    if weights_file is not None:
        with open(weights_file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return {"sha256": digest.hexdigest(), "of": str(weights_file)}
    state = avatar.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"sha256": digest.hexdigest(), "of": "state dict"}


def json_safe(value):
    """`value` with NaN and infinite floats (an empty mask, identical images) as None: valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def mean_score(values) -> float:
    """The mean of `values` without their NaNs (frames whose head mask is empty); NaN when none is left."""
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


class LPIPS:
    """LPIPS (Zhang et al. 2018) from local weights only: `path` is a state dict of a whole `lpips.LPIPS` module
    (backbone + linear heads; AlexNet or VGG, told apart by the first conv), e.g. written once where downloads work:
    `torch.save(lpips.LPIPS(net="alex").state_dict(), "lpips_alex.pth")`. Uses the `lpips` package when installed;
    without it, AlexNet weights run on the plain-torch copy of the network (`lpips_alex`)."""

    def __init__(self, path: str | Path):
        from .lpips_alex import lpips_alex, required_keys

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
        try:
            import lpips
        except ImportError as e:
            if net != "alex":
                raise BackendError("VGG LPIPS weights need the lpips package: pip install lpips (weights are read "
                                   "from --lpips-weights only, nothing is downloaded)") from e
            missing = [k for k in required_keys() if k not in state]
            if missing:
                raise CheckpointError(f"{path} lacks {missing[:3]}; save a whole lpips.LPIPS(net='alex')") from None
            weights = {k: state[k].float() for k in required_keys()}
            self.model = lambda a, b: lpips_alex({k: v.to(a.device) for k, v in weights.items()}, a, b)
            self.device = torch.device("cpu")
            return
        self.model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
        self.model.load_state_dict(state)
        self.model.eval().requires_grad_(False)

    def to(self, device) -> LPIPS:
        if isinstance(self.model, torch.nn.Module):
            self.model.to(device)
        self.device = torch.device(device)
        return self

    @torch.no_grad()
    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> list[float]:
        """Per-frame LPIPS of `[B, 3, H, W]` images in [0, 1] (lower is closer)."""
        device = next(self.model.parameters()).device if isinstance(self.model, torch.nn.Module) else self.device
        values = self.model(pred.to(device) * 2 - 1, target.to(device) * 2 - 1)
        return values.flatten().tolist()


def jod_score(pred: torch.Tensor, target: torch.Tensor, fps: float = 24.0) -> float:
    """FovVideoVDP's JOD (10 = identical) of the video `pred` against `target` (`[T, 3, H, W]` in [0, 1]) on its
    standard 4K display model; needs `pip install pyfvvdp` (no weights)."""
    try:
        import pyfvvdp
    except ImportError as e:
        raise BackendError("JOD needs FovVideoVDP: pip install pyfvvdp (no weights are downloaded)") from e
    metric = pyfvvdp.fvvdp(display_name="standard_4k", heatmap=None)
    jod, _ = metric.predict(pred.permute(0, 2, 3, 1).cpu(), target.permute(0, 2, 3, 1).cpu(), dim_order="FHWC",
                            frames_per_second=fps)
    return float(jod)
