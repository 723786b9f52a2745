"""Backends: interchangeable implementations of a frame's per-step prediction and decoder, around one shared loop.

A backend is chosen by name (`register_backend`, `backend_class`). Every backend derives from `Backend` and
supplies only
    prepare(condition [B, C, H, W], tokens [B, T, D]) -> per-frame state    work constant over a frame's steps
    predict(i, sample [B, c, h, w], state) -> v [B, c, h, w]               step i's ControlNet + UNet
    decode(latent [B, c, h, w]) -> image [B, 3, H, W] in [-1, 1]           the decoder
The loop itself (fixed noise, sampler step, per-step hook) is `engine.sampling.denoise`, run by `Backend.denoise`
for every backend; `Backend.frame` is denoise -> decode -> `engine.frame.to_pixels`. A backend may replace
`frame` only by something built from that same loop (the compiled backend captures it in a CUDA graph).

The `reference` backend (`engine.backends.reference`) is the specification; the fast paths live in their own
modules and are imported only when chosen, so the reference path never imports them.

`Backend.condition` (RasterBuffers -> the ControlNet input) runs a conditioner chosen by name from `_CONDITIONERS`:
`torch` (`build_condition`, the reference) or `numba` (`engine.condition_numba`, CPU); "auto" is
`default_conditioner(device)`, the one place that picks it.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
from functools import partial

import torch
from torch import nn

from ..conditioning import build_condition
from ..errors import ConfigError
from ..frame import to_pixels
from ..sampling import FixedNoise, Sampler, denoise

# name -> "module:Class"; imported lazily.
_BACKENDS: dict[str, str] = {
    "reference": "engine.backends.reference:ReferenceBackend",
    "compiled": "engine.backends.compiled:CompiledBackend",
    "onnxruntime": "engine.backends.onnxruntime:OnnxRuntimeBackend",
    "tensorrt": "engine.backends.tensorrt:TensorRTBackend",
}


# name -> "module:Class" of a conditioner: Class(textures, conditioning config), then obj(raster, out=None).
_CONDITIONERS: dict[str, str] = {
    "torch": "engine.backends:ReferenceConditioner",
    "numba": "engine.condition_numba:NumbaConditioner",
}
CONDITIONER_CHOICES = ("auto", *_CONDITIONERS)


class ReferenceConditioner:
    """`build_condition` (the reference) as a conditioner: a new float32 NCHW image, copied into `out` if given."""

    def __init__(self, textures, config):
        self.textures, self.config = textures, config

    def __call__(self, raster, out: torch.Tensor | None = None) -> torch.Tensor:
        cond = build_condition(raster, self.textures, self.config)
        return out.copy_(cond) if out is not None else cond


def default_conditioner(device) -> str:
    """The conditioner for "auto": `numba` on the CPU where numba is installed (the reference's image up to float32
    rounding of the texel positions; its time per frame: `benchmarks/results/demo-cpu-stages.md`), else `torch`."""
    if torch.device(device).type == "cpu" and importlib.util.find_spec("numba") is not None:
        return "numba"
    return "torch"


def make_conditioner(name: str, textures, config, device):
    """The conditioner `name` ("auto": `default_conditioner(device)`) for these textures and conditioning config."""
    name = default_conditioner(device) if name == "auto" else name
    if name not in _CONDITIONERS:
        raise ConfigError(f"unknown conditioner {name!r}; choose one of {list(CONDITIONER_CHOICES)}")
    module, _, cls = _CONDITIONERS[name].partition(":")
    return getattr(importlib.import_module(module), cls)(textures, config)


class Backend:
    """What every backend shares. Args (the registry's; `Renderer` passes them): avatar (`engine.model.Avatar`:
    the renderer's own copy, in eval mode, on `device` but for the submodules named in `own_networks`), sampler,
    noise (`FixedNoise` on `device`, batch 1: its draws serve every frame of a batch), device, dtype (None: the
    backend's default).

    `own_networks`: the avatar's submodules the backend copies for itself (the compiled backend's half-precision
    networks); the renderer leaves those where the caller's avatar has them, so no second full-precision copy of
    them lands on the device."""

    name = ""
    own_networks: tuple[str, ...] = ()

    def __init__(self, avatar, sampler: Sampler, noise: FixedNoise, device: torch.device,
                 dtype: torch.dtype | None = None):
        self.avatar, self.sampler, self.noise = avatar, sampler, noise
        self.device = torch.device(device)
        self.config = avatar.config
        self.dtype = torch.float32 if dtype is None else dtype
        self.conditioner = make_conditioner("auto", avatar.textures, self.config.conditioning, self.device)

    # -- what a backend supplies -------------------------------------------------------------------
    def prepare(self, condition: torch.Tensor, tokens: torch.Tensor):
        """Per-frame state for `predict` (default: the inputs themselves)."""
        return condition, tokens

    def predict(self, i: int, sample: torch.Tensor, state) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------------
    def use_conditioner(self, name: str) -> None:
        """Build the conditioning image with the conditioner `name` from now on ("auto", "torch", "numba")."""
        self.conditioner = make_conditioner(name, self.avatar.textures, self.config.conditioning, self.device)

    def condition(self, raster, out: torch.Tensor | None = None) -> torch.Tensor:
        """RasterBuffers -> the ControlNet input `[B, C, H, W]` float32 (`self.conditioner`: `build_condition` or
        its numba twin on the CPU, whose image has channels-last strides); `out`: written in place."""
        return self.conditioner(raster, out)

    def denoise(self, condition: torch.Tensor, tokens: torch.Tensor, on_step=None, state=None) -> torch.Tensor:
        """condition `[B, C, H, W]`, tokens `[B, T, D]` -> the final latent `[B, c, h, w]` float32: the shared loop
        with this backend's prediction. `on_step(i)` runs after each step; `state`: a `prepare` result to reuse."""
        state = self.prepare(condition, tokens) if state is None else state
        return denoise(partial(self.predict, state=state), self.sampler, self.noise, condition.shape[0], on_step)

    def frame(self, condition: torch.Tensor, tokens: torch.Tensor, on_step=None) -> torch.Tensor:
        """The whole frame: denoise -> decode -> pixels uint8 `[B, H, W, 3]` on the device."""
        return to_pixels(self.decode(self.denoise(condition, tokens, on_step)))

    @torch.no_grad()
    def first_step(self, condition: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Step 0's prediction (v) `[B, c, h, w]` float32 from the fixed noise (fidelity checks)."""
        sample = self.noise.latent[:1].expand(condition.shape[0], -1, -1, -1)
        return self.predict(0, sample, self.prepare(condition, tokens)).float()

    def stage_times(self) -> dict | None:
        """The last frame's stage times where the backend measures them itself (`compiled` with `timing`)."""
        return None

    def close(self) -> None:
        """Free what the backend holds (graphs, buffers, private weights); the default drops its avatar."""
        self.avatar = self.conditioner = None


def copy_module(module: nn.Module, device, dtype: torch.dtype, *, keep=(), float32=(), shared=()) -> nn.Module:
    """A private copy of `module` for inference: its structure deep-copied, in eval mode, without gradients, each
    floating tensor on `device` in `dtype`. Where a tensor already is there in that dtype the copy holds that very
    tensor (no new memory); tensors under the submodule prefixes in `keep` stay as they are (shared, wherever they
    live), those under `float32` become float32; the objects in `shared` (e.g. a head model) are shared, not copied.
    The caller's module is left as it was (mode, flags, device, dtype)."""
    memo = {id(obj): obj for obj in shared}
    device = torch.device(device)

    def under(name: str, prefixes) -> bool:
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        new = t.detach()
        if not under(name, keep):
            target = (torch.float32 if under(name, float32) else dtype) if t.is_floating_point() else t.dtype
            new = new.to(device=device, dtype=target)
        memo[id(t)] = nn.Parameter(new, requires_grad=False) if isinstance(t, nn.Parameter) else new
    return copy.deepcopy(module, memo).eval()


def register_backend(name: str, target: str) -> None:
    """Make `Renderer(backend=name)` build `target` ("package.module:Class", a `Backend` subclass)."""
    _BACKENDS[name] = target


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


# The CPU frame backend where an export folder is at hand: in one bench run of the demo on 2 threads
# (`benchmarks/results/demo-cpu-stages.md`), ONNX Runtime's step took 26 ms and its VAE decoder 28 ms against the
# reference's 78 + 41 ms and the hoisted eager torch backend's (`compiled`) 177 ms frame against 96 ms at DDIM 2.
CPU_FRAME_BACKEND = "onnxruntime"
ENGINE_BACKENDS = ("onnxruntime", "tensorrt")  # the backends that render an export folder (`engines`)


def default_backend(device, engines=None) -> str:
    """The one place that picks a frame backend where none is named: `compiled` on CUDA (the fast path); on the CPU
    `CPU_FRAME_BACKEND` when an export folder (`engines`) is given, else `reference`."""
    if torch.device(device).type == "cuda":
        return "compiled"
    return CPU_FRAME_BACKEND if engines is not None else "reference"


def backend_class(name: str):
    """The class registered under `name`; an unknown name is a ConfigError listing the choices."""
    if name not in _BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose one of {backend_names()}")
    module, _, cls = _BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)
