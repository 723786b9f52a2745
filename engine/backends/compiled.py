"""The `compiled` backend: the shared frame with a hoisted prediction, replayed as one CUDA graph per batch size.

Every speed trick, and where it is:
1. half weights (float16 by default) and channels-last, on private copies of the networks   `HoistedNetworks`
2. SDPA (flash) attention; text K/V computed at load, expression K/V once per frame           `SDPAttention`
3. the ControlNet's conditioning embedding once per frame, not per step                      `nets.prepare`
4. time embeddings tabulated per step at load (each resnet's projection is a table row)       `StepTable`
5. the shared loop (`engine.sampling.denoise`): python-float step constants, no host sync     `_run`
6. optional (`parallel_controlnet`): the ControlNet on a second stream beside the UNet's down blocks  `predict`
7. the whole frame (prepare + the shared loop + decode + to-pixels) captured as ONE CUDA graph, after
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

from ..conditioning import pack_textures
from ..errors import BackendError, ConfigError, InputError
from ..frame import to_pixels
from ..fused import build_condition_fused
from . import Backend
from .hoisted import HoistedNetworks

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ATTENTION = ("flash", "auto")


@dataclass
class _Graph:
    """One captured frame: static inputs (condition, tokens), its static output (pixels), its timing events."""

    graph: "torch.cuda.CUDAGraph"
    condition: torch.Tensor
    tokens: torch.Tensor
    pixels: torch.Tensor
    events: list | None


class CompiledBackend(Backend):
    """The shared frame (`engine.backends.Backend`) with a hoisted prediction and decoder, captured on CUDA.

    Args (the first five are the registry's): avatar, sampler, noise (`FixedNoise` on `device`), device,
        dtype: torch.float16 (None: the release's autocast type), torch.bfloat16, or torch.float32 (the same
            graph in full precision). On random sd21-structured weights the first step's relative error against
            float32 is ~2e-3 in float16 and ~1.8e-2 in bfloat16 (autocast bfloat16 gives the same): same speed on
            Hopper, so float16 is the default.
        decoder: "vae" (the avatar's) or "tiny": the avatar's trained tiny decoder (`Avatar.tiny_decoder`), or for
            an avatar without one a TAESD-shaped one with seeded random weights (for timing).
        graphs: capture CUDA graphs (default: on CUDA). channels_last: NHWC activations (default True).
        attention: "flash" (SDPA restricted to flash -> mem-efficient -> math) or "auto" (torch's order).
        parallel_controlnet: on CUDA, run each step's ControlNet on a second stream, concurrently with the
            UNet's down blocks (forked and joined inside the graph; same numbers). Default off.
        compile: torch.compile every transformer block (default off; the graph is the win).
        timing: record CUDA events inside the graph (`stage_times()`); adds N + 3 event nodes.
        warmup: eager runs before a capture (cuDNN autotuning, cuDNN/flash plans, allocator).
    `frame` on CUDA returns the graph's static output buffer: valid until the next call (the renderer copies it
    out at once). Its `on_step(i)` hook runs after the replay, once per step, outside the capture (the steps ran
    inside the graph: time them with `stage_times()`); without graphs it runs after each step, as everywhere.
    `denoise` and `decode` called on their own run eagerly (no graph).
    """

    name = "compiled"
    own_networks = ("unet", "controlnet", "vae")  # `HoistedNetworks` holds its own copies, cast on the way

    def __init__(self, avatar, sampler, noise, device, dtype=None, *, decoder: str = "vae", graphs=None,
                 channels_last: bool = True, attention: str = "flash", parallel_controlnet: bool = False,
                 compile: bool = False, timing: bool = False, warmup: int = 3):
        super().__init__(avatar, sampler, noise, device, torch.float16 if dtype is None else dtype)
        if self.dtype not in DTYPES:
            raise ConfigError(f"the compiled backend runs in {[str(d) for d in DTYPES]}, not {self.dtype}")
        self.graphs = self.device.type == "cuda" if graphs is None else bool(graphs)
        if self.graphs and self.device.type != "cuda":
            raise BackendError(f"CUDA graphs need a CUDA device, got {self.device}; pass graphs=False to run the "
                               "compiled backend eagerly, or use backend='reference'")
        if attention not in ATTENTION:
            raise ConfigError(f"attention must be one of {ATTENTION}, got {attention!r}")
        self.attention, self.warmup, self.timing = attention, int(warmup), bool(timing)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.nets = HoistedNetworks(avatar, sampler.timesteps, self.dtype, self.device, decoder, channels_last)
        self._packed = self._fused_textures()
        use_side = parallel_controlnet and self.device.type == "cuda"
        self._controlnet_stream = torch.cuda.Stream(self.device) if use_side else None
        self._graphs: dict[int, _Graph] = {}
        self._last_events: list | None = None
        self.captures = self.replays = 0
        if compile:
            self._compile()

    # -- what the shared loop calls ----------------------------------------------------------------
    def prepare(self, condition: torch.Tensor, tokens: torch.Tensor):
        """-> (the ControlNet's conditioning embedding, tokens in `dtype`); caches the expression keys/values."""
        cond = condition.to(self.device, self.dtype).contiguous(memory_format=self.memory_format)
        tokens = tokens.to(self.device, self.dtype)
        return self.nets.prepare(cond, tokens), tokens

    def predict(self, i: int, sample: torch.Tensor, state) -> torch.Tensor:
        cond_embedding, tokens = state
        return self.nets.predict(i, sample.to(self.dtype), cond_embedding, tokens, self._controlnet_stream)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.nets.decode(latent)

    # -- the frame ---------------------------------------------------------------------------------
    def _run(self, condition, tokens, events=None, on_step=None) -> torch.Tensor:
        """The shared frame (prepare, the shared loop, decode, pixels), with timing events between its stages."""
        mark = (lambda k: events[k].record()) if events else (lambda k: None)

        def after_step(i: int) -> None:
            mark(2 + i)
            if on_step is not None:
                on_step(i)

        mark(0)
        state = self.prepare(condition, tokens)
        mark(1)
        latent = self.denoise(condition, tokens, after_step, state=state)
        pixels = to_pixels(self.decode(latent))
        mark(2 + self.sampler.num_steps)
        return pixels

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
        cond = torch.empty(condition.shape, dtype=self.dtype, device=self.device, memory_format=self.memory_format)
        tok = torch.empty(tokens.shape, dtype=self.dtype, device=self.device)
        cond.copy_(condition)
        tok.copy_(tokens)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with self._settings(), torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._run(cond, tok)
        torch.cuda.current_stream(self.device).wait_stream(side)
        events = _timing_events(self.sampler.num_steps + 3) if self.timing else None
        graph = torch.cuda.CUDAGraph()
        try:
            with self._settings(benchmark=False), torch.cuda.graph(graph):
                pixels = self._run(cond, tok, events)
        except RuntimeError as e:
            if not events:
                raise
            # Event nodes are the only optional part of the capture: capture again without them.
            warnings.warn(f"capturing timing events in the CUDA graph failed ({e}); capturing without them",
                          stacklevel=2)
            torch.cuda.synchronize(self.device)
            self.timing, events, graph = False, None, torch.cuda.CUDAGraph()
            with self._settings(benchmark=False), torch.cuda.graph(graph):
                pixels = self._run(cond, tok)
        self.captures += 1
        self._graphs[b] = _Graph(graph, cond, tok, pixels, events)
        return self._graphs[b]

    @torch.no_grad()
    def frame(self, condition: torch.Tensor, tokens: torch.Tensor, on_step=None) -> torch.Tensor:
        """condition `[B, C, H, W]`, tokens `[B, T, D]` (any float dtype) -> pixels uint8 `[B, H, W, 3]` on the
        device: one graph replay on CUDA, the same frame eagerly elsewhere."""
        self._check(condition, tokens)
        if not self.graphs:
            events = (_timing_events(self.sampler.num_steps + 3, external=False)
                      if self.timing and self.device.type == "cuda" else None)
            with self._settings():
                pixels = self._run(condition, tokens, events, on_step)
            self._last_events = events
            return pixels
        g = self._graph(condition, tokens)
        g.condition.copy_(condition)
        g.tokens.copy_(tokens)
        g.graph.replay()
        self.replays += 1
        self._last_events = g.events
        if on_step is not None:
            for i in range(self.sampler.num_steps):
                on_step(i)
        return g.pixels

    # -- the conditioning image ------------------------------------------------------------------
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
                warnings.warn(f"fused conditioning kernel failed ({e}); using the torch reference from now on",
                              stacklevel=2)
                self._packed = None
        return super().condition(raster, out)

    # -- measurements ----------------------------------------------------------------------------
    def first_step(self, condition: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        self._check(condition, tokens)
        with self._settings():
            return super().first_step(condition, tokens)

    def stage_times(self) -> dict | None:
        """GPU milliseconds of the last frame's stages, from events inside the graph (needs `timing=True`;
        synchronises on the frame): {"prep": ms, "steps": [ms] * N, "decode": ms} (decode includes to-pixels)."""
        ev = self._last_events
        if not ev:
            return None
        ev[-1].synchronize()
        ms = [ev[k].elapsed_time(ev[k + 1]) for k in range(len(ev) - 1)]
        return {"prep": ms[0], "steps": ms[1:-1], "decode": ms[-1]}

    def stats(self) -> dict:
        """Counters: CUDA graph captures and replays, captured batch sizes, torch.compile graphs so far."""
        return {"captures": self.captures, "replays": self.replays, "graph_batches": sorted(self._graphs),
                "dynamo_graphs": dynamo_graphs()}

    def close(self) -> None:
        """Free the graphs, the private networks, the packed textures and the side stream."""
        for g in self._graphs.values():
            g.graph.reset()
        self._graphs.clear()
        self._last_events = None
        self.nets = self._packed = self._controlnet_stream = None
        super().close()

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
            warnings.warn(f"fused conditioning kernel unavailable ({e}); using the torch reference", stacklevel=2)
            return None
        return pack_textures(self.avatar.textures, torch.float16)

    def _compile(self) -> None:
        from diffusers.models.attention import BasicTransformerBlock

        for net in (self.nets.unet, self.nets.controlnet):
            for m in net.modules():
                if isinstance(m, BasicTransformerBlock):
                    m.compile(dynamic=False)


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
