"""`Renderer`: frames of an avatar from cameras and expression codes; its reference path is the specification.

Where each stage of `Renderer.render(camera, code)` lives, in the order the data flows:

    code -> posed mesh                 `engine.heads` `HeadModel.posed_mesh` (unless a mesh is given)
    camera + mesh -> RasterBuffers     `engine.raster.rasterize` (torch reference, nvdiffrast on CUDA)
    RasterBuffers -> condition         `Backend.condition` -> `engine.conditioning.build_condition` [B, C, H, W]
    code -> expression tokens          `Avatar.expression_tokens` (`engine.model`) [B, T, D]
    fixed noise -> N steps -> latent   `Backend.denoise` -> `engine.sampling.denoise`, the one loop of every
                                       backend: per step `Backend.predict` (reference: `Avatar.predict`, diffusers'
                                       ControlNet + UNet) then `Sampler.step`; `engine.sampling.FixedNoise`
    latent -> image -> uint8 RGB       `Backend.decode` (reference: `Avatar.decode`, the VAE) ->
                                       `engine.frame.to_pixels`

`Backend` (`engine.backends`) composes the last three as `Backend.frame`; the backend is chosen by name
(`reference` in `engine.backends.reference`, `compiled` beside it). Identical inputs give bit-identical frames on
the same CPU machine at a fixed thread count.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from .backends import backend_class, default_backend
from .errors import ConfigError, InputError
from .frame import Frame, as_codes
from .geometry import Camera, Mesh
from .model import Avatar
from .raster import rasterize
from .sampling import FixedNoise, NoiseSchedule, make_sampler

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ConfigError(f"dtype {dtype} is not supported; use torch.float32, torch.float16 or torch.bfloat16")
    return dtype


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
        backend: a registered backend name ("reference", "compiled", "onnxruntime", ...); default: `compiled` on
            CUDA (one CUDA graph per frame), `reference` elsewhere.
        backend_options: keyword arguments of the backend's constructor (e.g. `{"engines": DIR}` for
            "onnxruntime", `{"decoder": "tiny"}` for "compiled").
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
        backend_options: dict | None = None,
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
        self.backend = backend_class(backend)(self.avatar, self.sampler, self.noise, self.device, dtype,
                                              **(backend_options or {}))
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
        rgb = self.backend.frame(self.backend.condition(raster), tokens)
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
