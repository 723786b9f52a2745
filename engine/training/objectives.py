"""One training step's maths: the diffusion loss of model.md ("Training") and the stage-1 VAE loss.

Every random number a step uses is drawn up front into `Draws` (from a generator the loop seeds per step), so a
step is a pure function of (weights, batch, draws): a resumed run replays exactly the draws an uninterrupted run
makes, and a test can hold a batch, its noise and its timesteps fixed.

Diffusion step, per sample: rasterise the mesh from the camera (`rasterize_batch`, torch backend),
`build_condition` (differentiable w.r.t. the neural textures), x0 = VAE posterior sample * scaling_factor (frozen
VAE, fp32; a sample, not the mean, as diffusers' SD training does, with its noise in `Draws`; the posterior mean for a
VAE trained in stage 1, see below), t ~ U{0..T-1},
eps ~ N(0, 1), x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, target v = sqrt(ab_t) eps - sqrt(1 - ab_t) x0 (Salimans &
Ho 2022), loss = MSE(avatar.predict(x_t, t, condition, tokens), v).

A VAE trained here (stage 1 of the scratch recipe) is used as a deterministic autoencoder: stage 1 decodes the
posterior mean and stage 2 diffuses it. With the tiny KL weight, a short run leaves the channels it does not use at
the prior (posterior std ~1) and the used ones noisy (std ~0.3 against means ~1; measured on the demo's pilot):
sampling would train the decoder on noisy latents and hand the denoiser pure noise to predict in most channels.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..conditioning import build_condition
from ..errors import ConfigError
from ..geometry import Camera, Mesh
from ..raster import RasterBuffers, rasterize
from ..sampling import NoiseSchedule

STAGES = ("vae", "diffusion")


@dataclass
class Draws:
    """The random numbers of one step, float32 / int64 CPU tensors until `.to(device)`.

    timesteps `[B]` int64 in [0, T); noise `[B, C, h, w]` (the diffusion eps); posterior `[B, C, h, w]` (the N(0, 1)
    of the VAE posterior sample); crops `[B, 3]` int64 (x0, y0, side in pixels) or None (no cropping).
    """

    timesteps: torch.Tensor
    noise: torch.Tensor
    posterior: torch.Tensor
    crops: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "Draws":
        return Draws(*(None if t is None else t.to(device) for t in dataclasses.astuple(self)))


def draw(generator: torch.Generator, batch: int, config, crop_min: float = 1.0) -> Draws:
    """A step's draws for `batch` samples of an avatar with `AvatarConfig` `config`, in a fixed order (timesteps,
    noise, posterior noise, crops) from `generator` (CPU)."""
    shape = (batch, config.vae.latent_channels, config.latent_size, config.latent_size)
    timesteps = torch.randint(0, config.schedule.num_train_timesteps, (batch,), generator=generator)
    noise = torch.randn(shape, generator=generator)
    posterior = torch.randn(shape, generator=generator)
    crops = None
    if crop_min < 1.0:
        size = config.image_size
        side = torch.randint(math.ceil(crop_min * size), size + 1, (batch,), generator=generator)
        u = torch.rand(batch, 2, generator=generator)
        origin = (u * (size - side + 1)[:, None]).floor().long()
        crops = torch.cat([origin, side[:, None]], dim=1)
    return Draws(timesteps, noise, posterior, crops)


def crop_camera(camera: Camera, x0: int, y0: int, side: int, size: int) -> Camera:
    """The camera of the square crop [y0, y0 + side) x [x0, x0 + side) of `camera`'s image, resized to `size`
    pixels (pixel centres at integers: u' = (u + 0.5 - x0) * size / side - 0.5)."""
    scale = size / side
    return dataclasses.replace(
        camera, fx=camera.fx * scale, fy=camera.fy * scale, cx=(camera.cx + 0.5 - x0) * scale - 0.5,
        cy=(camera.cy + 0.5 - y0) * scale - 0.5, width=size, height=size,
    )


def crop_batch(images: torch.Tensor, cameras: Sequence[Camera], crops: torch.Tensor | None
               ) -> tuple[torch.Tensor, list[Camera]]:
    """Apply `Draws.crops` to images `[B, 3, H, W]` and their cameras (unchanged when `crops` is None). The crops
    are resized back to H x W with antialiased bilinear filtering."""
    if crops is None:
        return images, list(cameras)
    size = images.shape[-1]
    out_images, out_cameras = [], []
    for image, camera, (x0, y0, side) in zip(images, cameras, crops.tolist()):
        patch = image[None, :, y0:y0 + side, x0:x0 + side]
        out_images.append(F.interpolate(patch, size=(size, size), mode="bilinear", align_corners=False,
                                        antialias=True))
        out_cameras.append(crop_camera(camera, x0, y0, side, size))
    return torch.cat(out_images), out_cameras


@torch.no_grad()
def rasterize_batch(meshes: Sequence[Mesh], cameras: Sequence[Camera], config, device: torch.device) -> RasterBuffers:
    """Rasterise each sample's mesh from its camera on `device` (torch backend, fp32 even under autocast: depth is not
    safe in half precision) -> `RasterBuffers` `[B, H, W, *]`; `config` is the avatar's `AvatarConfig`."""
    c = config.conditioning
    with torch.autocast(torch.device(device).type, enabled=False):
        buffers = [rasterize(mesh.to(device), camera, backend="torch", znear=c.znear, zfar=c.zfar)
                   for mesh, camera in zip(meshes, cameras)]
    return buffers[0] if len(buffers) == 1 else RasterBuffers.cat(buffers)


class TrainingModule(nn.Module):
    """The avatar plus its losses; the one module accelerate prepares (DDP needs the loss inside `forward`, and only
    tensors and tensor dataclasses cross it, so meshes and cameras are rasterised before).

    Buffers `sqrt_ab`, `sqrt_1m_ab` `[T]` float32 (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t) of the avatar's
    schedule) are not persistent: checkpoints hold exactly `avatar.*`.
    """

    def __init__(self, avatar: nn.Module, vae_kl_weight: float = 1e-6, sample_latents: bool = True):
        """`sample_latents`: stage 2 diffuses posterior samples (the release's pretrained SD VAE); False: posterior
        means (a VAE trained in stage 1, see the module docstring)."""
        super().__init__()
        if avatar.config.schedule.prediction_type != "v_prediction":
            raise ConfigError("training follows model.md's v-prediction; the avatar's schedule predicts "
                              f"{avatar.config.schedule.prediction_type!r}: use prediction_type='v_prediction'")
        self.avatar = avatar
        self.vae_kl_weight = vae_kl_weight
        self.sample_latents = sample_latents
        ab = NoiseSchedule(avatar.config.schedule).alphas_cumprod
        self.register_buffer("sqrt_ab", ab.sqrt(), persistent=False)
        self.register_buffer("sqrt_1m_ab", (1 - ab).sqrt(), persistent=False)

    def forward(self, images: torch.Tensor, raster: RasterBuffers | None, codes: torch.Tensor, draws: Draws,
                stage: str = "diffusion") -> torch.Tensor:
        """images `[B, 3, H, W]` float32 in [-1, 1] over white (already cropped), their `rasterize_batch` buffers
        (unused by stage "vae", may be None), codes `[B, E]`, draws; all on this module's device. Returns the float32
        scalar loss of `stage` ("vae" or "diffusion")."""
        images = images.float()
        if stage == "vae":
            return self.vae_loss(images)
        if stage != "diffusion":
            raise ConfigError(f"unknown training stage {stage!r}; use one of {STAGES}")
        avatar, config = self.avatar, self.avatar.config
        # Texture lookups and the frozen encoder stay fp32 under mixed precision (latent statistics are not safe in
        # half precision).
        with torch.autocast(images.device.type, enabled=False):
            condition = build_condition(raster, avatar.textures, config.conditioning)
            with torch.no_grad():
                posterior = avatar.vae.encode(images).latent_dist
                z = posterior.mean + posterior.std * draws.posterior if self.sample_latents else posterior.mean
                x0 = z * config.vae.scaling_factor
        t = draws.timesteps
        a = self.sqrt_ab[t].view(-1, 1, 1, 1)
        b = self.sqrt_1m_ab[t].view(-1, 1, 1, 1)
        noisy = a * x0 + b * draws.noise
        target = a * draws.noise - b * x0
        prediction = avatar.predict(noisy, t, condition, avatar.expression_tokens(codes))
        return F.mse_loss(prediction.float(), target)

    def vae_loss(self, images: torch.Tensor) -> torch.Tensor:
        """Stage 1: L1 reconstruction (mean over pixels) of the decoded posterior mean + vae_kl_weight *
        KL(posterior || N(0, 1)) (sum over latent values, mean over the batch)."""
        vae = self.avatar.vae
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.mean).sample
        kl = posterior.kl().float().mean()
        return F.l1_loss(reconstruction.float(), images) + self.vae_kl_weight * kl


@torch.no_grad()
def measure_scaling_factor(vae: nn.Module, images: torch.Tensor, batch_size: int = 8) -> float:
    """1 / std of the VAE's posterior means over `images` `[N, 3, H, W]` in [-1, 1]: the factor that gives the
    diffusion model unit-variance latents, for a VAE trained in stage 1 (whose means stage 2 diffuses)."""
    device = next(vae.parameters()).device
    samples = []
    for chunk in images.split(batch_size):
        samples.append(vae.encode(chunk.to(device, torch.float32)).latent_dist.mean.float().flatten())
    std = torch.cat(samples).std().item()
    if not math.isfinite(std) or std <= 0:
        raise ConfigError(f"the trained VAE's latents have standard deviation {std}; stage 1 diverged: lower "
                          "--vae-lr or raise --vae-steps")
    return 1.0 / std
