"""`Renderer`: the reference frame pipeline, and the numerical specification for every fast backend.

    camera + mesh -> rasterize -> RasterBuffers -> build_condition -> [B, C, H, W]
    expression code -> expression tokens [B, T, D]
    fixed noise -> N x (ControlNet + UNet -> sampler step) -> latent [B, c, h, w] -> VAE decode -> uint8 RGB

Identical inputs give bit-identical frames on the same CPU machine at a fixed thread count.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .backends import backend_class, default_backend
from .conditioning import build_condition
from .errors import ConfigError, InputError
from .geometry import Camera, Mesh
from .model import Avatar
from .raster import rasterize
from .sampling import FixedNoise, NoiseSchedule, make_sampler

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Frame:
    """One frame's inputs: a camera, an expression code [E] and optionally a posed mesh."""

    camera: Camera
    expression: torch.Tensor
    mesh: Mesh | None = None


def to_pixels(image: torch.Tensor) -> torch.Tensor:
    """Decoder output [B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8 (the release's (x / 2 + 0.5).clamp(0, 1))."""
    return ((image.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def as_codes(expressions) -> torch.Tensor:
    """Expression code(s) as a float32 CPU tensor [B, E] (one code [E] becomes [1, E])."""
    codes = expressions if torch.is_tensor(expressions) else torch.from_numpy(np.asarray(expressions, np.float32))
    codes = codes.detach().to("cpu", torch.float32)
    if codes.ndim == 1:
        codes = codes[None]
    if codes.ndim != 2:
        raise InputError(f"expression codes must be [E] or [B, E], got shape {tuple(codes.shape)}")
    return codes


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ConfigError(f"dtype {dtype} is not supported; use torch.float32, torch.float16 or torch.bfloat16")
    return dtype


class ReferenceBackend:
    """The straightforward loop, as the release runs it: eager, every constant recomputed in every step.

    float32 is the fidelity reference; float16/bfloat16 run under autocast (the release's own way, and the speed
    baseline that benchmarks compare against).
    """

    name = "reference"

    def __init__(self, avatar: Avatar, sampler, noise: FixedNoise, device: torch.device,
                 dtype: torch.dtype | None = None):
        self.avatar, self.sampler, self.noise, self.device = avatar, sampler, noise, device
        self.dtype = torch.float32 if dtype is None else dtype

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def condition(self, raster) -> torch.Tensor:
        return build_condition(raster, self.avatar.textures, self.avatar.config.conditioning)

    def denoise(self, condition: torch.Tensor, tokens: torch.Tensor, on_step=None) -> torch.Tensor:
        """Run the sampler from the fixed noise; `on_step(i)` (optional) is called after each step (for timing)."""
        batch = condition.shape[0]
        sample = self.noise.latent.expand(batch, -1, -1, -1)
        for i, t in enumerate(self.sampler.timesteps.tolist()):
            timestep = torch.tensor(t, device=self.device)
            with self._autocast():
                v = self.avatar.predict(sample, timestep, condition, tokens)
            noise = self.noise.step_noise[i].expand(batch, -1, -1, -1)
            sample = self.sampler.step(i, v.float(), sample, noise).prev_sample
            if on_step is not None:
                on_step(i)
        return sample

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.avatar.decode(latent).float()

    def pixels(self, image: torch.Tensor) -> torch.Tensor:
        return to_pixels(image)


class Renderer:
    """Renders frames of an `Avatar`: `render`, `render_batch`, `stream`.

    Args:
        avatar: the model; moved to `device` and put in eval mode.
        device: torch device string or object.
        sampler: "ddpm" (the release's) or "ddim"; steps: 1..50.
        seed: the fixed-noise seed (default: the avatar config's `noise_seed`, the release's 181998).
        dtype: torch.float32 (the fidelity reference), torch.float16 or torch.bfloat16 (autocast in the reference,
            half weights in `compiled`), or their names; default: the backend's (float32 for the reference,
            float16 for `compiled`).
        raster_backend: "torch" (reference, any device) or "nvdiffrast" (CUDA).
        backend: a registered backend name ("reference", "compiled", ...); default: `compiled` on CUDA (one CUDA
            graph per frame), `reference` elsewhere.
    """

    def __init__(
        self,
        avatar: Avatar,
        device: str | torch.device = "cpu",
        sampler: str = "ddpm",
        steps: int = 20,
        seed: int | None = None,
        dtype: torch.dtype | str | None = None,
        raster_backend: str = "torch",
        backend: str | None = None,
    ):
        self.device = torch.device(device)
        dtype = None if dtype is None else resolve_dtype(dtype)
        backend = backend or default_backend(self.device)
        self.avatar = avatar.to(self.device).eval().requires_grad_(False)
        config = avatar.config
        self.config = config
        self.sampler = make_sampler(sampler, NoiseSchedule(config.schedule), steps)
        shape = (config.vae.latent_channels, config.latent_size, config.latent_size)
        seed = config.noise_seed if seed is None else seed
        self.noise = FixedNoise(shape, self.sampler.num_steps, seed).to(self.device)
        self.raster_backend = raster_backend
        self.backend = backend_class(backend)(self.avatar, self.sampler, self.noise, self.device, dtype)
        self.dtype = self.backend.dtype

    # -- inputs ----------------------------------------------------------------------------------
    def _mesh(self, mesh: Mesh | None, expression: torch.Tensor) -> Mesh:
        if mesh is not None:
            if not isinstance(mesh, Mesh):
                raise InputError(f"mesh must be an engine.geometry.Mesh, got {type(mesh).__name__}")
            return mesh
        head = self.avatar.head_model
        if head is None:
            raise InputError(
                f"avatar {self.config.name!r} has no head model (config head_model={self.config.head_model!r}); "
                "pass a posed mesh to render(..., mesh=...)"
            )
        return head.posed_mesh(expression)

    def _camera(self, camera: Camera) -> Camera:
        if not isinstance(camera, Camera):
            raise InputError(f"camera must be an engine.geometry.Camera, got {type(camera).__name__}")
        size = self.config.image_size
        if (camera.width, camera.height) != (size, size):
            raise InputError(
                f"camera image size is {camera.width}x{camera.height} but avatar {self.config.name!r} renders "
                f"{size}x{size}; pass camera.scaled({size}, {size})"
            )
        return camera

    # -- frames ----------------------------------------------------------------------------------
    @torch.no_grad()
    def render_batch(
        self,
        cameras: Sequence[Camera],
        expressions: Sequence | torch.Tensor | np.ndarray,
        meshes: Sequence[Mesh | None] | None = None,
        alpha: bool = False,
    ) -> np.ndarray:
        """Render B frames at once -> [B, H, W, 3] uint8 ([B, H, W, 4] with alpha = the head mask)."""
        codes = as_codes(expressions)
        if len(cameras) != codes.shape[0]:
            raise InputError(f"got {len(cameras)} cameras but {codes.shape[0]} expression codes; give one per frame")
        meshes = [None] * len(cameras) if meshes is None else list(meshes)
        if len(meshes) != len(cameras):
            raise InputError(f"got {len(meshes)} meshes for {len(cameras)} cameras; give one per frame (or None)")
        tokens = self.avatar.expression_tokens(codes.to(self.device))
        buffers = [
            rasterize(self._mesh(m, c).to(self.device), self._camera(cam), backend=self.raster_backend,
                      znear=self.config.conditioning.znear, zfar=self.config.conditioning.zfar)
            for cam, c, m in zip(cameras, codes, meshes)
        ]
        raster = buffers[0] if len(buffers) == 1 else type(buffers[0]).cat(buffers)
        condition = self.backend.condition(raster)
        latent = self.backend.denoise(condition, tokens)
        rgb = self.backend.pixels(self.backend.decode(latent))
        if alpha:
            a = (raster.mask > 0.5).to(torch.uint8) * 255
            rgb = torch.cat([rgb, a.to(rgb.device)], dim=-1)
        return rgb.cpu().numpy()

    def render(self, camera: Camera, expression, mesh: Mesh | None = None, alpha: bool = False) -> np.ndarray:
        """Render one frame -> [H, W, 3] uint8 ([H, W, 4] RGBA with `alpha=True`).

        `expression` is the avatar's code [E] (list, numpy or tensor); without `mesh` the avatar's head model
        poses one from the code.
        """
        return self.render_batch([camera], as_codes(expression), [mesh], alpha=alpha)[0]

    def stream(self, frames: Iterable[Frame], alpha: bool = False) -> Iterator[np.ndarray]:
        """Render frames one after another, yielding them in order: a plain loop on the CPU; on CUDA the stream
        pipeline (`engine.pipeline.RenderPipeline`: upload, raster, denoise and copy-back streams, two frames in
        flight), which yields the same frames."""
        if self.device.type == "cuda":
            from .pipeline import RenderPipeline

            yield from RenderPipeline(self, depth=2, alpha=alpha).run(frames)
            return
        for frame in frames:
            yield self.render(frame.camera, frame.expression, frame.mesh, alpha=alpha)
