"""Training an avatar (`avatar train`): `TrainConfig`, the accelerate loop (`train`), its objectives.

- `objectives.py`: one training step's maths: the v-prediction MSE of model.md ("Training") and the stage-1 VAE
  reconstruction loss, with every random draw passed in (`Draws`), so a step is a pure function of its inputs.
- `loop.py`: `train()`: data order, optimisers, accelerate (one CPU, one GPU, several GPUs), checkpoints and exact
  resume, validation renders, the progress bar and `log.jsonl`.
- `build.py`: the avatar a run starts from (shaped to the dataset), the fit check, the validation items.
- `run_file.py`: `<out>/train.json`, the run's settings (read back by `--resume`).
- `cli.py`: `avatar train` (parses, wires the above, prints).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..schema import build_dataclass
from .loop import train

RECIPES = ("release", "scratch")
MIXED_PRECISION = ("no", "fp16", "bf16", "auto")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that fixes a training run (saved as `<out>/train.json`). CLI flags map 1:1 to the fields.

    recipe: "release" (model.md: ControlNet, expression attention and projection, neural textures train; UNet and
        VAE frozen, from a local diffusers Stable Diffusion folder `sd_dir` or from the avatar folder being
        fine-tuned) or "scratch" (no pretrained base: stage 1 trains the VAE for `vae_steps` steps and measures its
        latent scaling factor, stage 2 trains everything but the VAE).
    steps: stage-2 (diffusion) steps; the run's total is vae_steps + steps for a scratch run that trains its VAE.
    batch_size: images per step and process (several GPUs: the effective batch is batch_size x processes).
    lr / texture_lr / vae_lr: AdamW learning rates of the networks, the neural textures, the stage-1 VAE (the
        scratch recipe's VAE is small: on the `tiny` preset 1e-3 reaches in 100 steps the L1 loss 1e-4 needs 200
        for).
    weight_decay: AdamW's, on networks and VAE; neural textures get none (decay would pull every texel that the
        head never covers towards 0, to no benefit).
    grad_clip: max gradient norm of the ControlNet (release) or of all trained networks (scratch, and the VAE in
        stage 1); textures are never clipped. 0 turns clipping off.
    vae_kl_weight: weight of the stage-1 KL term (sum over latent values, mean over the batch) next to the L1
        reconstruction loss (mean over pixels).
    mixed_precision: accelerate's "no" (fp32, the release's), "fp16" or "bf16", or "auto" (bf16 on a CUDA device
        that has it, else fp16 on CUDA, else no). Rasterisation, conditioning and the frozen VAE always run fp32.
    cpu: train on the CPU even when a GPU is present.
    crop_min: random square crops of at least this fraction of the image width, resized back (the release: 0.7);
        1.0 turns cropping off. Cameras are cropped with the images.
    checkpoint_every / keep_checkpoints: accelerate state every N steps, keeping the newest K.
    validate_every / validation_frames / validation_steps: every N steps render that many eval frames with DDIM
        of that many steps and log PSNR / SSIM (0 turns validation off).
    seed: the data order and every step's draws (timesteps, noise, crops) derive from it and the step number.
    num_workers / log_every: data-loader processes; a log.jsonl line (and progress-bar loss) every N steps.
    sd_dir: the release recipe's base weights for a new avatar (not needed to fine-tune an avatar folder).
    """

    recipe: str = "release"
    steps: int = 100_000
    vae_steps: int = 2_000
    batch_size: int = 8
    lr: float = 1e-4
    texture_lr: float = 1e-2
    vae_lr: float = 1e-3
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    vae_kl_weight: float = 1e-6
    mixed_precision: str = "no"
    cpu: bool = False
    seed: int = 0
    crop_min: float = 1.0
    num_workers: int = 0
    checkpoint_every: int = 1_000
    keep_checkpoints: int = 2
    validate_every: int = 1_000
    validation_frames: int = 4
    validation_steps: int = 10
    log_every: int = 10
    sd_dir: str | None = None

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ConfigError(f"unknown recipe {self.recipe!r}; choose one of {RECIPES}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"unknown mixed_precision {self.mixed_precision!r}; choose one of {MIXED_PRECISION}")
        positive = ("steps", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every", "validation_steps")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("vae_steps", "num_workers", "validate_every", "validation_frames"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
        for name in ("lr", "texture_lr", "vae_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("weight_decay", "grad_clip", "vae_kl_weight"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.1 <= self.crop_min <= 1.0:
            raise ConfigError(f"crop_min must be in [0.1, 1] (1: no cropping; the release: 0.7), got {self.crop_min}")

    @property
    def trains_vae(self) -> bool:
        """Whether the recipe has a stage 1 at all (the loop skips it for avatars that already have their VAE)."""
        return self.recipe == "scratch" and self.vae_steps > 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        if not isinstance(d, dict):
            raise ConfigError("a training config must be a JSON object")
        return build_dataclass(cls, d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


__all__ = ["TrainConfig", "RECIPES", "train"]
