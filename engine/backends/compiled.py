"""The `compiled` backend: the reference's denoise + decode as one replayed CUDA graph (issue "Real time on the GPU").

Every speed trick, and where it is:
1. half weights (float16 by default) and channels-last, on private copies of the networks   `HoistedNetworks`
2. SDPA (flash) attention; text K/V computed at load, expression K/V once per frame           `SDPAttention`
3. the ControlNet's conditioning embedding once per frame, not per step                      `nets.prepare`
4. time embeddings tabulated per step at load (each resnet's projection is a table row)       `StepTable`
5. each sampler step as prev = a x + b v + c noise with the coefficients baked in              `_run`
6. optional (`parallel_controlnet`): the ControlNet on a second stream beside the UNet's down blocks  `predict`
7. the whole frame (prep + N steps + decode + to-pixels) captured as ONE CUDA graph per batch size, after
   `warmup` eager runs on a side stream; per frame: copy inputs into the static buffers, replay        `_graph`
Mesh size never reaches the graph: its only inputs are the conditioning image `[B, C, H, W]` and the tokens
`[B, T, D]`, both fixed-size, so nothing is re-captured or recompiled when per-frame inputs change.

On CPU (or with `graphs=False`) the same hoisted code runs eagerly: a correctness path (tests compare it with
the reference), not a fast one. `graphs=True` on a CPU device is a BackendError.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from dataclasses import dataclass

import torch

from kernels import available, preload

from ..conditioning import build_condition, pack_textures
from ..errors import BackendError, ConfigError, InputError
from ..fused import build_condition_fused
from .hoisted import HoistedNetworks

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ATTENTION = ("flash", "auto")


@dataclass
class _Graph:
    """One captured frame: static inputs (condition, tokens), static outputs (latent, image, pixels), events."""

    graph: "torch.cuda.CUDAGraph"
    condition: torch.Tensor
    tokens: torch.Tensor
    outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    events: list | None


class CompiledBackend:
    """Fast condition -> denoise -> decode stages with the reference backend's interface (`engine.backends`).

    Args (the first five are the registry's): avatar, sampler, noise (`FixedNoise` on `device`), device,
        dtype: torch.float16 (None: the release's autocast type), torch.bfloat16, or torch.float32 (the same
            graph in full precision). On random sd21-structured weights the first step's relative error against
            float32 is ~2e-3 in float16 and ~1.8e-2 in bfloat16 (autocast bfloat16 gives the same): same speed on
            Hopper, so float16 is the default.
        decoder: "vae" (the avatar's) or "tiny" (TAESD-shaped, seeded random weights: for timing).
        graphs: capture CUDA graphs (default: on CUDA). channels_last: NHWC activations (default True).
        attention: "flash" (SDPA restricted to flash -> mem-efficient -> math) or "auto" (torch's order).
        parallel_controlnet: on CUDA, run each step's ControlNet on a second stream, concurrently with the
            UNet's down blocks (forked and joined inside the graph; same numbers). Default off.
        compile: torch.compile every transformer block (default off; the graph is the win).
        timing: record CUDA events inside the graph (`stage_times()`); adds N + 3 event nodes.
        warmup: eager runs before a capture (cuDNN autotuning, cuDNN/flash plans, allocator).
    Outputs of `denoise`/`decode`/`pixels`/`frame` on CUDA are the graph's static buffers: valid until the
    next call (the renderer copies them out at once).
    """

    name = "compiled"
    supports_condition_out = True

    def __init__(self, avatar, sampler, noise, device, dtype=None, *, decoder: str = "vae", graphs=None,
                 channels_last: bool = True, attention: str = "flash", parallel_controlnet: bool = False,
                 compile: bool = False, timing: bool = False, warmup: int = 3):
        self.device = torch.device(device)
        self.dtype = torch.float16 if dtype is None else dtype
        if self.dtype not in DTYPES:
            raise ConfigError(f"the compiled backend runs in {[str(d) for d in DTYPES]}, not {self.dtype}")
        self.graphs = self.device.type == "cuda" if graphs is None else bool(graphs)
        if self.graphs and self.device.type != "cuda":
            raise BackendError(f"CUDA graphs need a CUDA device, got {self.device}; pass graphs=False to run the "
                               "compiled backend eagerly, or use backend='reference'")
        if attention not in ATTENTION:
            raise ConfigError(f"attention must be one of {ATTENTION}, got {attention!r}")
        if sampler.num_steps != noise.num_steps:
            raise ConfigError(f"the sampler has {sampler.num_steps} steps but the noise {noise.num_steps}")
        self.avatar, self.sampler, self.noise = avatar, sampler, noise
        self.attention, self.warmup, self.timing = attention, int(warmup), bool(timing)
        self.channels_last = channels_last
        self.config = avatar.config
        self.nets = HoistedNetworks(avatar, sampler.timesteps, self.dtype, self.device, decoder, channels_last)
        self.coefficients = [sampler.coefficients(i) for i in range(sampler.num_steps)]
        self.latent = noise.latent[:1].to(self.device, torch.float32)  # [1, c, h, w]
        self.step_noise = noise.step_noise[:, :1].to(self.device, torch.float32)  # [N, 1, c, h, w]
        self._packed = self._fused_textures()
        use_side = parallel_controlnet and self.device.type == "cuda"
        self._controlnet_stream = torch.cuda.Stream(self.device) if use_side else None
        self._graphs: dict[int, _Graph] = {}
        self._last: tuple | None = None
        self._last_graph: _Graph | None = None
        self.captures = self.replays = 0
        if compile:
            self._compile()

    # -- the frame ---------------------------------------------------------------------------------
    def _run(self, condition, tokens, events=None, on_step=None):
        """One frame from static inputs (dtype, on device) -> (latent fp32, image, pixels uint8 [B, H, W, 3])."""
        nets, n = self.nets, len(self.coefficients)
        mark = (lambda k: events[k].record()) if events else (lambda k: None)
        mark(0)
        cond_embedding = nets.prepare(condition, tokens)
        mark(1)
        x = self.latent.expand(condition.shape[0], -1, -1, -1)
        for i, (a, b, c) in enumerate(self.coefficients):
            v = nets.predict(i, x.to(self.dtype), cond_embedding, tokens, self._controlnet_stream)
            x = (x * a).add_(v, alpha=b)
            if c:
                x = x.add_(self.step_noise[i], alpha=c)
            mark(2 + i)
            if on_step is not None:
                on_step(i)
        image = nets.decode(x)
        pixels = _to_pixels(image)
        mark(2 + n)
        return x, image, pixels

    def _settings(self, benchmark: bool = True):
        """cuDNN autotuning (warm-up and eager runs; off while capturing, which then reuses the tuned plans and
        never runs a search inside the capture) and the SDPA backend choice."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(_cudnn_benchmark(benchmark))
        if self.attention == "flash":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                             SDPBackend.MATH]))
        return stack

    def _graph(self, condition, tokens) -> _Graph:
        """The captured frame for this batch size; captured on first use with these inputs loaded."""
        b = condition.shape[0]
        if b in self._graphs:
            return self._graphs[b]
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        cond = torch.empty(condition.shape, dtype=self.dtype, device=self.device, memory_format=fmt)
        tok = torch.empty(tokens.shape, dtype=self.dtype, device=self.device)
        cond.copy_(condition)
        tok.copy_(tokens)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with self._settings(), torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._run(cond, tok)
        torch.cuda.current_stream(self.device).wait_stream(side)
        events = _timing_events(len(self.coefficients) + 3) if self.timing else None
        graph = torch.cuda.CUDAGraph()
        try:
            with self._settings(benchmark=False), torch.cuda.graph(graph):
                outputs = self._run(cond, tok, events)
        except RuntimeError as e:
            if not events:
                raise
            # Event nodes are the only optional part of the capture: capture again without them.
            warnings.warn(f"capturing timing events in the CUDA graph failed ({e}); capturing without them")
            torch.cuda.synchronize(self.device)
            self.timing, events, graph = False, None, torch.cuda.CUDAGraph()
            with self._settings(benchmark=False), torch.cuda.graph(graph):
                outputs = self._run(cond, tok)
        self.captures += 1
        self._graphs[b] = _Graph(graph, cond, tok, outputs, events)
        return self._graphs[b]

    @torch.no_grad()
    def _frame(self, condition, tokens, on_step=None):
        self._check(condition, tokens)
        if self.graphs:
            g = self._graph(condition, tokens)
            g.condition.copy_(condition)
            g.tokens.copy_(tokens)
            g.graph.replay()
            self.replays += 1
            self._last, self._last_graph = g.outputs, g
            if on_step is not None:  # the steps ran inside the graph: time them with stage_times()
                for i in range(len(self.coefficients)):
                    on_step(i)
        else:
            fmt = torch.channels_last if self.channels_last else torch.contiguous_format
            cond = condition.to(self.device, self.dtype).contiguous(memory_format=fmt)
            events = _timing_events(len(self.coefficients) + 3, external=False) if (
                self.timing and self.device.type == "cuda") else None
            with self._settings():
                self._last = self._run(cond, tokens.to(self.device, self.dtype), events, on_step)
            self._last_graph = _Graph(None, cond, tokens, self._last, events) if events else None
        return self._last

    # -- the backend interface -------------------------------------------------------------------
    def condition(self, raster, out: torch.Tensor | None = None) -> torch.Tensor:
        """RasterBuffers -> conditioning image `[B, C, H, W]`: float16 channels-last from the fused kernel on
        CUDA, else the float32 reference. `out` (optional): written in place and returned."""
        if self._packed is not None:
            from ..raster import RasterBuffers

            # The rasterisers return depth and canonical as views of one buffer; the kernel wants each contiguous.
            flat = RasterBuffers(*(getattr(raster, k).contiguous() for k in ("mask", "depth", "canonical", "normals")))
            try:
                return build_condition_fused(flat, self._packed, self.config.conditioning, out=out)
            except (BackendError, InputError) as e:
                warnings.warn(f"fused conditioning kernel failed ({e}); using the torch reference from now on")
                self._packed = None
        cond = build_condition(raster, self.avatar.textures, self.config.conditioning)
        return out.copy_(cond) if out is not None else cond

    def denoise(self, condition: torch.Tensor, tokens: torch.Tensor, on_step=None) -> torch.Tensor:
        """condition `[B, C, H, W]`, tokens `[B, T, D]` (any float dtype) -> final latent `[B, c, h, w]` float32.
        Runs the whole frame (decode and pixels too: `decode`/`pixels` of this latent return its results)."""
        return self._frame(condition, tokens, on_step)[0]

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        if self._last is not None and latent is self._last[0]:
            return self._last[1]
        with torch.no_grad(), self._settings():
            return self.nets.decode(latent)

    def pixels(self, image: torch.Tensor) -> torch.Tensor:
        if self._last is not None and image is self._last[1]:
            return self._last[2]
        return _to_pixels(image)

    def frame(self, condition: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The whole frame: -> uint8 `[B, H, W, 3]` on the device (the static output buffer on CUDA)."""
        return self._frame(condition, tokens)[2]

    # -- measurements ----------------------------------------------------------------------------
    @torch.no_grad()
    def first_step(self, condition: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The first step's ControlNet + UNet output (v) `[B, c, h, w]` float32, eagerly (fidelity checks)."""
        self._check(condition, tokens)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        cond = condition.to(self.device, self.dtype).contiguous(memory_format=fmt)
        tok = tokens.to(self.device, self.dtype)
        with self._settings():
            cond_embedding = self.nets.prepare(cond, tok)
            x = self.latent.expand(cond.shape[0], -1, -1, -1).to(self.dtype)
            return self.nets.predict(0, x, cond_embedding, tok).float()

    def stage_times(self) -> dict | None:
        """GPU milliseconds of the last frame's stages, from events inside the graph (needs `timing=True`;
        synchronises on the frame): {"prep": ms, "steps": [ms] * N, "decode": ms} (decode includes to-pixels)."""
        g = self._last_graph
        if g is None or not g.events:
            return None
        ev = g.events
        ev[-1].synchronize()
        ms = [ev[k].elapsed_time(ev[k + 1]) for k in range(len(ev) - 1)]
        return {"prep": ms[0], "steps": ms[1:-1], "decode": ms[-1]}

    def stats(self) -> dict:
        """Counters: CUDA graph captures and replays, captured batch sizes, torch.compile graphs so far."""
        return {"captures": self.captures, "replays": self.replays, "graph_batches": sorted(self._graphs),
                "dynamo_graphs": dynamo_graphs()}

    def close(self) -> None:
        """Free the graphs and the private networks."""
        for g in self._graphs.values():
            g.graph.reset()
        self._graphs.clear()
        self._last = self._last_graph = None
        self.nets = None

    # -- helpers ---------------------------------------------------------------------------------
    def _check(self, condition, tokens) -> None:
        c = self.config
        size = c.image_size
        if condition.dim() != 4 or tuple(condition.shape[1:]) != (c.condition_channels, size, size):
            raise InputError(f"condition must be [B, {c.condition_channels}, {size}, {size}], got "
                             f"{tuple(condition.shape)}; build it with backend.condition(raster)")
        if tuple(tokens.shape) != (condition.shape[0], c.expression_tokens, c.token_dim):
            raise InputError(f"tokens must be [{condition.shape[0]}, {c.expression_tokens}, {c.token_dim}], got "
                             f"{tuple(tokens.shape)}; make them with Avatar.expression_tokens")

    def _fused_textures(self):
        """Neural textures packed for the fused conditioning kernel, or None where it cannot run."""
        if self.device.type != "cuda" or not available():
            return None
        try:
            preload(self.device)
        except BackendError as e:
            warnings.warn(f"fused conditioning kernel unavailable ({e}); using the torch reference")
            return None
        return pack_textures(self.avatar.textures, torch.float16)

    def _compile(self) -> None:
        from diffusers.models.attention import BasicTransformerBlock

        for net in (self.nets.unet, self.nets.controlnet):
            for m in net.modules():
                if isinstance(m, BasicTransformerBlock):
                    m.compile(dynamic=False)


def _to_pixels(image: torch.Tensor) -> torch.Tensor:
    """`engine.renderer.to_pixels`, contiguous (for a channels-last image the permute is already contiguous)."""
    from ..renderer import to_pixels

    return to_pixels(image).contiguous()


@contextlib.contextmanager
def _cudnn_benchmark(on: bool):
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old


def _timing_events(n: int, external: bool = True) -> list | None:
    """n timing events; `external` ones can be recorded inside a CUDA graph (torch >= 2.9) and timed after."""
    try:
        return [torch.cuda.Event(enable_timing=True, external=external) for _ in range(n)]
    except TypeError:  # an older torch: no in-graph timing
        return None


def dynamo_graphs() -> int:
    """Graphs torch.compile has produced in this process (0 when torch._dynamo was never used)."""
    if "torch._dynamo" not in sys.modules:
        return 0
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
