"""`RenderPipeline`: a renderer's frames through four CUDA streams, in order, with double buffers.

    host     pose the mesh, stage it in pinned memory, enqueue everything below, return   (frame n + 1)
    upload   geometry host -> device into this slot's buffers                              event upload[k]
    raster   expression tokens, rasterise, condition -> this slot's condition/tokens      event raster[k]
    compute  slot -> the backend (compiled: static inputs + one graph replay) -> this      events cond_free[k],
             slot's output pixels                                                          compute[k]
    copy     output pixels -> this slot's pinned host buffer                               event copy[k]

Slot k = n % depth. With depth 2 the host submits frame n + 1 before it waits for frame n, so frame n + 1's
host work, upload, rasterisation and conditioning run while the GPU denoises frame n; each stage waits only
on the events it needs (its inputs are ready, and the slot it overwrites was consumed by frame n - depth).
Frames come out in order. `records` holds one `FrameRecord` per frame: latency (submit -> pixels in host
memory) and, with `timing`, each stream's GPU time and the backend's in-graph stage times.

Meshes may change size every frame: each slot's device and pinned buffers have a capacity (next power of two)
and grow by reallocation (`MeshBuffers`); the denoising graph never sees the mesh, so nothing is re-captured.
On CPU the same code runs synchronously (streams and events are no-ops): `Renderer.stream` keeps its plain
loop there, and the tests use this path to check the scheduling.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import ConfigError
from .frame import Frame
from .geometry import Mesh
from .raster import rasterize

STAGES = ("upload", "raster", "compute", "copy")


@dataclass
class FrameRecord:
    """One frame's measurements (milliseconds). `gpu_ms`: per stream, between timing events (with `timing`);
    `graph_ms`: the backend's `stage_times()` (with `timing`; exact only at depth 1, where frames don't overlap)."""

    index: int
    latency_ms: float
    host_ms: float
    faces: int
    t_done: float = 0.0  # time.perf_counter() when the pixels were in host memory
    gpu_ms: dict[str, float] = field(default_factory=dict)
    graph_ms: dict | None = None


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


class MeshBuffers:
    """One slot's mesh on the device, with pinned host staging; capacity = next power of two of the largest
    mesh seen, grown by reallocation (`allocations` counts them). `upload(mesh)` -> a `Mesh` of device views."""

    def __init__(self, device: torch.device, faces_dtype: torch.dtype = torch.int64, pin: bool = False):
        self.device, self.faces_dtype, self.pin = torch.device(device), faces_dtype, pin
        self.capacity = (0, 0, 0)  # vertices, faces, canonical dims
        self.allocations = 0
        self._buffers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _reserve(self, v: int, f: int, d: int) -> None:
        cv, cf, cd = self.capacity
        if v <= cv and f <= cf and d == cd:
            return
        cv, cf = max(cv, _pow2(v)), max(cf, _pow2(f))
        shapes = {"vertices": ((cv, 3), torch.float32), "canonical": ((cv, d), torch.float32),
                  "normals": ((cv, 3), torch.float32), "faces": ((cf, 3), self.faces_dtype)}
        self._buffers = {
            name: (torch.empty(shape, dtype=dtype, pin_memory=self.pin),
                   torch.empty(shape, dtype=dtype, device=self.device))
            for name, (shape, dtype) in shapes.items()
        }
        self.capacity = (cv, cf, d)
        self.allocations += 1

    def upload(self, mesh: Mesh) -> Mesh:
        """Copy `mesh` into the buffers (host -> pinned -> device, non-blocking on the current stream)."""
        if mesh.device == self.device and self.device.type == "cuda":
            return mesh
        v, f, d = mesh.num_vertices, mesh.num_faces, mesh.canonical_dims
        self._reserve(v, f, d)
        views = {}
        for name in ("vertices", "canonical", "normals", "faces"):
            src = getattr(mesh, name)
            if src is None:
                views[name] = None
                continue
            host, dev = self._buffers[name]
            n = src.shape[0]
            host[:n].copy_(src)
            views[name] = dev[:n].copy_(host[:n], non_blocking=self.pin)
        return Mesh._unchecked(views["vertices"], views["faces"], views["canonical"], views["normals"])


class _NoEvent:
    """Stands in for torch.cuda.Event on the CPU."""

    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _NoStream:
    def wait_event(self, event) -> None:
        pass


@dataclass
class _InFlight:
    index: int
    slot: int
    t_submit: float
    host_ms: float
    faces: int
    timers: dict | None


class RenderPipeline:
    """Streams `Frame`s through `renderer` (its backend, rasteriser, avatar) as the module docstring describes.

    Args: renderer (`engine.renderer.Renderer`); depth: frames in flight (1 = one after another, 2 = double
    buffered); timing: record per-stream GPU times (CUDA); alpha: RGBA output with the head mask as alpha.
    `run(frames)` yields `[H, W, 3|4]` uint8 numpy frames in order.
    """

    def __init__(self, renderer, depth: int = 2, timing: bool = False, alpha: bool = False):
        if depth not in (1, 2, 3):
            raise ConfigError(f"depth must be 1, 2 or 3 frames in flight, got {depth!r}")
        self.renderer, self.backend = renderer, renderer.backend
        self.device = torch.device(renderer.device)
        self.cuda = self.device.type == "cuda"
        self.depth, self.timing, self.alpha = depth, bool(timing) and self.cuda, alpha
        self._streams = {s: torch.cuda.Stream(self.device) if self.cuda else _NoStream() for s in STAGES}
        new_event = (lambda: torch.cuda.Event()) if self.cuda else _NoEvent
        self._events = {e: [new_event() for _ in range(depth)] for e in (*STAGES, "cond_free")}
        faces_dtype = torch.int32 if renderer.raster_backend == "nvdiffrast" else torch.int64
        self.meshes = [MeshBuffers(self.device, faces_dtype, pin=self.cuda) for _ in range(depth)]
        self._cond, self._tokens = [None] * depth, [None] * depth
        self._mask, self._out, self._host = [None] * depth, [None] * depth, [None] * depth
        self._n = 0
        self.records: list[FrameRecord] = []

    def run(self, frames: Iterable[Frame]) -> Iterator[np.ndarray]:
        """Yield each frame's pixels in order, keeping up to `depth` frames in flight."""
        pending: deque[_InFlight] = deque()
        for frame in frames:
            pending.append(self._submit(frame))
            if len(pending) >= self.depth:
                yield self._collect(pending.popleft())
        while pending:
            yield self._collect(pending.popleft())

    def stats(self) -> dict:
        return {"frames": len(self.records), "depth": self.depth,
                "mesh_allocations": sum(m.allocations for m in self.meshes),
                "mesh_capacity": [list(m.capacity) for m in self.meshes]}

    # -- one frame ---------------------------------------------------------------------------------
    def _on(self, stage: str):
        s = self._streams[stage]
        return (torch.cuda.stream(s) if self.cuda else contextlib.nullcontext()), s

    @torch.no_grad()
    def _submit(self, frame: Frame) -> _InFlight:
        t0 = time.perf_counter()
        n, r = self._n, self.renderer
        k = n % self.depth
        self._n += 1
        ev = self._events
        code = r._codes(frame.expression)  # [1, E] on the CPU, checked (and clamped to the head model's range)
        camera, mesh = r._frame_inputs(frame.camera, code[0], frame.mesh)
        timers = ({f"{s}{i}": torch.cuda.Event(enable_timing=True) for s in STAGES for i in (0, 1)}
                  if self.timing else None)
        mark = (lambda name, s: timers[name].record(s)) if timers else (lambda name, s: None)

        ev["upload"][k].synchronize()  # this slot's pinned staging was copied out (frame n - depth)
        ctx, s = self._on("upload")
        with ctx:
            s.wait_event(ev["raster"][k])  # ... and its device mesh was rasterised
            mark("upload0", s)
            device_mesh = self.meshes[k].upload(mesh)
            mark("upload1", s)
            ev["upload"][k].record(s)

        ctx, s = self._on("raster")
        with ctx:
            tokens = r.avatar.expression_tokens(code)  # first: its small host -> device copy syncs this stream
            s.wait_event(ev["upload"][k])
            s.wait_event(ev["cond_free"][k])  # the compute stream has taken frame n - depth's inputs
            mark("raster0", s)
            cfg = r.config.conditioning
            raster = rasterize(device_mesh, camera, backend=r.raster_backend, znear=cfg.znear, zfar=cfg.zfar)
            self._condition(raster, k)
            self._tokens[k] = _into(self._tokens[k], tokens)
            if self.alpha:
                self._mask[k] = _into(self._mask[k], (raster.mask > 0.5).to(torch.uint8) * 255)
            mark("raster1", s)
            ev["raster"][k].record(s)

        ctx, s = self._on("compute")
        with ctx:
            s.wait_event(ev["raster"][k])
            s.wait_event(ev["copy"][k])  # this slot's output pixels were copied to the host
            mark("compute0", s)
            pixels = self.backend.frame(self._cond[k], self._tokens[k])
            ev["cond_free"][k].record(s)
            if self._out[k] is None:
                b, h, w, _ = pixels.shape
                self._out[k] = torch.empty((b, h, w, 4 if self.alpha else 3), dtype=torch.uint8, device=self.device)
            out = self._out[k]
            out[..., :3].copy_(pixels)
            if self.alpha:
                out[..., 3:].copy_(self._mask[k])
            mark("compute1", s)
            ev["compute"][k].record(s)

        ctx, s = self._on("copy")
        with ctx:
            s.wait_event(ev["compute"][k])
            mark("copy0", s)
            if self.cuda:
                if self._host[k] is None:
                    self._host[k] = torch.empty(out.shape, dtype=torch.uint8, pin_memory=True)
                self._host[k].copy_(out, non_blocking=True)
            else:
                self._host[k] = out
            mark("copy1", s)
            ev["copy"][k].record(s)
        return _InFlight(n, k, t0, (time.perf_counter() - t0) * 1e3, mesh.num_faces, timers)

    def _condition(self, raster, k: int) -> None:
        """The conditioning image into slot k (in place once the slot's buffer exists)."""
        if self._cond[k] is None:
            self._cond[k] = self.backend.condition(raster)
        else:
            self.backend.condition(raster, out=self._cond[k])

    def _collect(self, f: _InFlight) -> np.ndarray:
        self._events["copy"][f.slot].synchronize()
        image = self._host[f.slot].numpy().copy()
        done = time.perf_counter()
        record = FrameRecord(f.index, (done - f.t_submit) * 1e3, f.host_ms, f.faces, done)
        if f.timers:
            record.gpu_ms = {s: f.timers[f"{s}0"].elapsed_time(f.timers[f"{s}1"]) for s in STAGES}
            record.graph_ms = self.backend.stage_times()
        self.records.append(record)
        return image[0]


def _into(buffer: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """Copy `value` into `buffer` (allocated like `value`, layout kept, on first use); returns the buffer."""
    if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
        buffer = torch.empty_like(value, memory_format=torch.preserve_format)
    return buffer.copy_(value)
