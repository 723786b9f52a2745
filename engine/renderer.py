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

import inspect
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from .backends import backend_class, copy_module, default_backend
from .devices import resolve_device, resolve_dtype
from .errors import BackendError, ConfigError, InputError, RangeWarning
from .frame import Frame, as_codes, check_output_type, check_visible, to_output
from .geometry import Camera, Mesh
from .heads import code_range
from .model import Avatar
from .raster import MeshUploader, rasterize, resolve_backend as resolve_raster_backend
from .recipe import Recipe
from .sampling import FixedNoise, NoiseSchedule, make_sampler
from .trained_on import CODE_SLACK

# A camera warns (RangeWarning) this far outside the avatar's recorded view range (`AvatarConfig.trained_on`).
# Measured on the demo avatar (DDIM 8, 4 codes, frame PSNR against the synthetic head's ground truth): in-range
# views off its rig score ~30 dB; 4 deg beyond its azimuth range -1.5 dB, 9 deg -2.6, 19 deg (azimuth 60) -6.2,
# 49 deg (azimuth 90) -11.6; 6 deg beyond its elevation range -0.8, 11 deg -2.2; 5 % off its one distance -0.2 to
# -0.7 dB, 10 % -2.5 to -3. The warning starts where the loss passes about 1.5 to 2 dB.
VIEW_MARGIN_DEG, DISTANCE_MARGIN = 5.0, 0.05
_VIEW = {"azimuth_deg": ("azimuth", "deg"), "elevation_deg": ("elevation", "deg"), "distance": ("distance", "m")}


def weight_dtype(avatar: Avatar) -> torch.dtype:
    """The dtype of an avatar's weights (its UNet's)."""
    return next(avatar.unet.parameters()).dtype


class Renderer:
    """Renders frames of an `Avatar`: `render`, `render_batch`, `stream`; `close()` (or a `with` block) frees
    what its backend holds.

    Args:
        avatar: the model. Left as it was (device, dtype, train/eval mode, requires_grad): the renderer works on
            its own module tree (`self.avatar`, eval mode, no gradients) holding the caller's very tensors where
            they already live on `device` in the weight dtype (no new memory), else copies there. So an avatar
            loaded on the device costs nothing more; one on the CPU is copied to the device once; and with the
            `compiled` backend, which makes its own half-precision networks, the UNet, ControlNet and VAE are not
            copied to the device at full precision at all (they stay where the caller has them).
        device: "cpu", "cuda", "cuda:N" or "auto" (CUDA when present), or a torch.device (`resolve_device`).
        sampler: "ddpm" (the release's) or "ddim"; steps: 1..50; decoder: "vae" (the release's) or "tiny" (the
            avatar's trained tiny decoder, `Avatar.tiny_decoder`). Each one not given is the avatar's recorded recipe's
            (`AvatarConfig.recipe`; without one the release's: DDPM, 20 steps, the VAE); `self.recipe` is what it
            renders with. A backend without a tiny decoder (`tensorrt`: its engines hold the VAE's) renders a
            recipe's "tiny" with its VAE decoder (a warning); asked for by `decoder="tiny"` it is a ConfigError. An
            ONNX export without the tiny decoder's graph is a CheckpointError saying to export it again.
        seed: the fixed-noise seed (default: the avatar config's `noise_seed`, the release's 181998). The release's
            design: the initial latent and every step's noise are drawn once from this seed and reused for every
            frame and every frame of a batch, so a frame depends only on its camera, code and mesh (no flicker
            from noise) and reruns repeat it; another seed is another, equally valid rendering of the avatar.
        dtype: torch.float32 (the fidelity reference), torch.float16 or torch.bfloat16 (autocast in the reference,
            half weights in `compiled`), or their names; default: the avatar's weight dtype when it is a half type,
            else the backend's (float32 for the reference, float16 for `compiled`).
        raster_backend: "auto" (`engine.raster.default_backend`: "numba" on the CPU where numba is installed, else
            "torch"), "torch" (the reference, any device), "numba" (CPU) or "nvdiffrast" (CUDA).
        condition_backend: how the conditioning image is built where the backend uses the shared one (not
            `compiled`, which fuses it): "auto" (`engine.backends.default_conditioner`: "numba" on the CPU where numba
            is installed, else "torch"), "torch" (`build_condition`, the reference) or "numba" (CPU).
        backend: a registered backend name ("reference", "compiled", "onnxruntime", ...); default
            (`engine.backends.default_backend`): `compiled` on CUDA (one CUDA graph per frame); on the CPU
            `onnxruntime` when backend_options names an export folder ("engines"), else `reference`.
            backend_options: keywords for the backend (e.g.
            `{"engines": DIR}` for "onnxruntime", `compiled`'s decoder="tiny", parallel_controlnet=True).
    Inputs are checked before anything is rendered: a camera that sees nothing of the head (beyond the far plane,
    behind the camera, outside the image) is an InputError. A camera or code outside what the avatar was trained
    on (`config.trained_on`; cameras from `VIEW_MARGIN_DEG` / `DISTANCE_MARGIN` beyond it) gives one
    `engine.errors.RangeWarning` per cause (azimuth, elevation, distance, code) per renderer, and is rendered as
    given. The one limit on codes is the head model's: where it declares a `code_range` (the synthetic head's
    [0, 1], to which its rig clamps), the code is clamped to it once, before both the head model and the
    expression tokens see it, so the mesh and the tokens always get the same code (with a warning).
    """

    def __init__(
        self,
        avatar: Avatar,
        device: str | torch.device = "cpu",
        sampler: str | None = None,
        steps: int | None = None,
        seed: int | None = None,
        dtype: torch.dtype | str | None = None,
        raster_backend: str = "auto",
        condition_backend: str = "auto",
        backend: str | None = None,
        backend_options: dict | None = None,
        decoder: str | None = None,
    ):
        if not isinstance(avatar, Avatar):
            raise ConfigError(f"Renderer needs an engine.model.Avatar, got {type(avatar).__name__}; load one with "
                              "Avatar.from_pretrained(folder) or Avatar.from_preset(name)")
        self.device = resolve_device(device, allow_meta=True)
        backend = backend or default_backend(self.device, (backend_options or {}).get("engines"))
        cls, options = backend_class(backend), dict(backend_options or {})
        decoder = self._decoder(avatar, backend, cls, options, decoder)
        weights = weight_dtype(avatar)
        dtype = resolve_dtype(dtype) if dtype is not None else None if weights == torch.float32 else weights
        try:
            inspect.signature(cls).bind(avatar, None, None, self.device, dtype, **options)
        except TypeError as e:
            raise ConfigError(f"backend {backend!r} does not take the options {sorted(options)} ({e})") from None
        if avatar.is_meta and self.device.type != "meta":
            raise ConfigError("this avatar was built on the meta device and has no weights; load it with "
                              "Avatar.from_pretrained(folder) or Avatar.from_preset(name) outside torch.device('meta')")
        config = avatar.config
        self.config = config
        recipe = config.default_recipe
        self.sampler = make_sampler(sampler or recipe.sampler, NoiseSchedule(config.schedule),
                                    recipe.steps if steps is None else steps)
        self.recipe = Recipe(self.sampler.name, self.sampler.num_steps, decoder)
        # float32 weights stay float32 (a half dtype then runs them under autocast, the release's way)
        placed = weights if dtype is None or weights in (torch.float32, dtype) else dtype
        self.avatar = copy_module(avatar, self.device, placed, keep=cls.own_networks, float32=("textures",),
                                  shared=(avatar.config, avatar.head_model))
        shape = (config.vae.latent_channels, config.latent_size, config.latent_size)
        seed = config.noise_seed if seed is None else seed
        self.noise = FixedNoise(shape, self.sampler.num_steps, seed).to(self.device)
        self.raster_backend = resolve_raster_backend(raster_backend, self.device)
        self._upload = MeshUploader(self.device)
        self.backend = cls(self.avatar, self.sampler, self.noise, self.device, dtype, **options)
        if condition_backend != "auto":
            self.backend.use_conditioner(condition_backend)
        self.dtype = self.backend.dtype
        self._warned: set[str] = set()

    @staticmethod
    def _decoder(avatar: Avatar, backend: str, cls, options: dict, decoder: str | None) -> str:
        """The decoder to render with (`decoder`, else the recipe's), put into the backend's `options` where it
        takes one; a backend option "decoder" of its own (the compiled backend's timing decoder) wins."""
        if "decoder" in options:
            if decoder is not None and decoder != options["decoder"]:
                raise ConfigError(f"decoder={decoder!r} and backend_options decoder={options['decoder']!r} differ; "
                                  "give one of them")
            return options["decoder"]
        chosen = decoder or avatar.config.default_recipe.decoder
        avatar.check_decoder(chosen)
        if "decoder" in inspect.signature(cls).parameters:
            options["decoder"] = chosen
        elif chosen == "tiny":
            if decoder is not None:
                raise ConfigError(f"backend {backend!r} has no tiny decoder (its export holds the VAE's); use "
                                  "decoder='vae', or backend 'reference' or 'compiled'")
            warnings.warn(f"backend {backend!r} has no tiny decoder: avatar {avatar.config.name!r}'s recipe renders "
                          "with its VAE decoder here", stacklevel=3)
            chosen = "vae"
        return chosen

    # -- lifetime --------------------------------------------------------------------------------
    def close(self) -> None:
        """Free what the backend holds (CUDA graphs, buffers, private networks) and the renderer's own device
        copies (returned to torch's CUDA cache). Rendering afterwards is a BackendError; closing twice is fine."""
        if self.backend is not None:
            self.backend.close()
        self.backend = self.avatar = self.noise = None

    def __enter__(self) -> "Renderer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.backend is None:
            raise BackendError("this Renderer is closed (close() or the end of its with block freed its backend); "
                               "make a new Renderer")

    # -- inputs ----------------------------------------------------------------------------------
    def _codes(self, expressions) -> torch.Tensor:
        """The codes checked (`as_codes`) -> [B, E] float32 CPU; clamped into the head model's `code_range` (if it
        declares one) for the tokens as for the mesh; a RangeWarning if outside the recorded range or clamped."""
        config = self.config
        codes = as_codes(expressions, config.expression_dim, config.expression_names)
        head, record = self.avatar.head_model, config.trained_on
        limits = code_range(head)
        clamped = codes if limits is None else codes.clamp(*limits)
        if "code" in self._warned:
            return clamped
        if record is not None:
            low, high = torch.tensor(record.code_min), torch.tensor(record.code_max)
            where = f"avatar {config.name!r} was trained on"
        else:
            low, high = (torch.full_like(codes[0], b) for b in limits or (-np.inf, np.inf))
            where = f"of avatar {config.name!r}'s head model {getattr(head, 'name', head)!r}"
        outside = (codes < low - CODE_SLACK) | (codes > high + CODE_SLACK)
        if bool(outside.any()):
            dims = outside.any(0).nonzero().flatten().tolist()
            names = config.expression_names
            parts = [f"{names[d] if names else f'dimension {d}'} = {float(codes[outside[:, d], d][0]):g} (range "
                     f"{float(low[d]):g}..{float(high[d]):g})" for d in dims[:4]]
            policy = "the frame extrapolates there" if limits is None else (
                f"values beyond its head model's range [{limits[0]:g}, {limits[1]:g}] are clamped to it for both the "
                "mesh and the expression tokens" + ("" if record is None else ", inside it the frame extrapolates"))
            self._warn("code", f"expression code outside the range {where}: {', '.join(parts)}"
                               f"{' and more' if len(dims) > 4 else ''}; {policy}; pass values inside the range")
        return clamped

    def _frame_inputs(self, camera: Camera, code: torch.Tensor, mesh: Mesh | None,
                      which: str = "the camera") -> tuple[Camera, Mesh]:
        """One frame's camera and posed mesh, checked: the camera's type and size, that it sees the mesh, and
        (a warning) that it lies inside the avatar's recorded view range."""
        camera = self._camera(camera)
        mesh = self._mesh(mesh, code)
        check_visible(camera, mesh, self.config.conditioning.znear, self.config.conditioning.zfar, which)
        record = self.config.trained_on
        if record is not None and not self._warned.issuperset(_VIEW):
            outside = record.camera_outside(camera, VIEW_MARGIN_DEG, DISTANCE_MARGIN)
            for key, (value, (low, high)) in outside.items():
                name, unit = _VIEW[key]
                margin = f"{DISTANCE_MARGIN:.0%}" if key == "distance" else f"{VIEW_MARGIN_DEG:g} deg"
                self._warn(key, f"{which} at {name} {value:.2f} {unit} lies outside the {name} range avatar "
                                f"{self.config.name!r} was trained on ({low:.2f}..{high:.2f} {unit}; this warning "
                                f"starts {margin} beyond it): its frames lose quality fast out there (the demo avatar "
                                f"loses 2.6 dB 9 deg beyond its azimuth range, 6 dB at 19 deg); keep the camera "
                                "inside the range")
        return camera, mesh

    def _warn(self, key: str, message: str) -> None:
        """One RangeWarning per cause per renderer, attributed to the first caller outside the engine."""
        if key in self._warned:
            return
        self._warned.add(key)
        level, frame = 1, sys._getframe(0)
        while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith(("engine.", "torch.")):
            frame, level = frame.f_back, level + 1
        warnings.warn(f"{message} (warned once per Renderer)", RangeWarning, stacklevel=level)

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

    def check_frames(self, frames: Iterable[Frame]) -> None:
        """Check every frame's inputs as rendering does (code, camera, that the camera sees the head; the range
        warnings), before any frame is rendered: an InputError names the frame's index."""
        self._check_open()
        for i, frame in enumerate(frames):
            try:
                self._frame_inputs(frame.camera, self._codes(frame.expression)[0], frame.mesh)
            except InputError as e:
                raise InputError(f"frame {i}: {e}") from None

    # -- frames ----------------------------------------------------------------------------------
    @torch.no_grad()
    def render_batch(
        self,
        cameras: Sequence[Camera],
        expressions: Sequence | torch.Tensor | np.ndarray,
        meshes: Sequence[Mesh | None] | None = None,
        alpha: bool = False,
        output_type: str = "np",
    ):
        """Render B frames at once -> [B, H, W, 3] uint8 ([B, H, W, 4] with alpha = the head mask); with
        `output_type` "pil" a list of B PIL images, "pt" a float32 CPU tensor [B, 3|4, H, W] in [0, 1]
        (`engine.frame.to_output`). `expressions`: [B, E] or B codes (each E numbers or a {name: value} dict)."""
        check_output_type(output_type)
        condition, tokens, raster = self._inputs(cameras, expressions, meshes)
        rgb = self.backend.frame(condition, tokens)
        if alpha:
            a = (raster.mask > 0.5).to(torch.uint8) * 255
            rgb = torch.cat([rgb, a.to(rgb.device)], dim=-1)
        return to_output(rgb.cpu().numpy(), output_type)

    @torch.no_grad()
    def latents(self, cameras: Sequence[Camera], expressions, meshes: Sequence[Mesh | None] | None = None):
        """The final latents `[B, c, h, w]` float32 (on the device) of the frames `render_batch` would render from
        these inputs, before decoding (what `avatar distill-decoder` trains a tiny decoder on)."""
        condition, tokens, _ = self._inputs(cameras, expressions, meshes)
        return self.backend.denoise(condition, tokens).float()

    @torch.no_grad()
    def frame_inputs(self, cameras: Sequence[Camera], expressions, meshes: Sequence[Mesh | None] | None = None):
        """(condition `[B, C, H, W]`, tokens `[B, T, D]`) of these frames on the device, checked as `render_batch`
        checks them: what the denoiser sees (`avatar distill` feeds a student with them)."""
        condition, tokens, _ = self._inputs(cameras, expressions, meshes)
        return condition, tokens

    def _inputs(self, cameras, expressions, meshes):
        """B frames' inputs checked -> (condition, tokens, RasterBuffers) on the device."""
        self._check_open()
        if isinstance(cameras, Camera) or not isinstance(cameras, Sequence):
            raise InputError(f"render_batch takes a list of cameras, got {type(cameras).__name__}; use "
                             "render(camera, code) for one frame")
        codes = self._codes(expressions)
        if len(cameras) != codes.shape[0]:
            raise InputError(f"got {len(cameras)} cameras but {codes.shape[0]} expression codes; give one per frame")
        meshes = [None] * len(cameras) if meshes is None else list(meshes)
        if len(meshes) != len(cameras):
            raise InputError(f"got {len(meshes)} meshes for {len(cameras)} cameras; give one per frame (or None)")
        inputs = [self._frame_inputs(cam, c, m, "the camera" if len(cameras) == 1 else f"camera {i}")
                  for i, (cam, c, m) in enumerate(zip(cameras, codes, meshes))]
        tokens = self.avatar.expression_tokens(codes.to(self.device))
        cfg = self.config.conditioning
        buffers = [rasterize(self._upload(mesh), cam, backend=self.raster_backend, znear=cfg.znear, zfar=cfg.zfar)
                   for cam, mesh in inputs]
        raster = buffers[0] if len(buffers) == 1 else type(buffers[0]).cat(buffers)
        return self.backend.condition(raster), tokens, raster

    def render(self, camera: Camera, expression, mesh: Mesh | None = None, alpha: bool = False,
               output_type: str = "np"):
        """Render one frame -> [H, W, 3] uint8 ([H, W, 4] RGBA with `alpha=True`); `output_type` "pil": a
        PIL.Image (RGB or RGBA), "pt": a float32 CPU tensor [3|4, H, W] in [0, 1] (the uint8 values / 255, the
        layout and range of diffusers' `output_type="pt"`).

        `expression` is the avatar's code: E numbers (list, numpy or tensor) or, for an avatar with named code
        dimensions, a {name: value} dict (the rest 0); without `mesh` the avatar's head model poses one from it.
        """
        self._check_open()
        codes = self._codes(expression)
        if codes.shape[0] != 1:
            raise InputError(f"render takes one code [E], got {codes.shape[0]} codes; use render_batch for several "
                             "frames")
        return self.render_batch([camera], codes, [mesh], alpha=alpha, output_type=output_type)[0]

    def stream(self, frames: Iterable[Frame], alpha: bool = False, output_type: str = "np",
               depth: int = 2) -> Iterator:
        """Render frames one after another, yielding them in order (each as `render` returns it).

        `depth`: frames in flight. 1: each frame is finished before the next is taken, the lowest latency (live
        use: `avatar serve`, `avatar drive`); 2 (default): on CUDA the next frame's host work, upload and
        rasterisation overlap this one's denoising, more frames a second at about twice the latency (3: one more).
        On CUDA the stream pipeline (`engine.pipeline.RenderPipeline`: upload, raster, denoise and copy-back
        streams) yields the same frames at any depth; on the CPU, where every stage shares the cores, it is a
        plain loop whatever the depth."""
        check_output_type(output_type)
        self._check_open()
        if depth not in (1, 2, 3):
            raise ConfigError(f"depth must be 1, 2 or 3 frames in flight, got {depth!r}")
        if self.device.type == "cuda":
            from .pipeline import RenderPipeline

            for pixels in RenderPipeline(self, depth=depth, alpha=alpha).run(frames):
                yield to_output(pixels[None], output_type)[0]
            return
        for frame in frames:
            yield self.render(frame.camera, frame.expression, frame.mesh, alpha=alpha, output_type=output_type)
