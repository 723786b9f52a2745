"""`RenderWorker`: one rendering thread serving many clients fairly, with bounded latency.

Each client owns a `Slot` that holds only its newest request: a request that arrives before the previous one
was served replaces it (counted in `dropped`), so a fast sender never builds a queue. The thread serves the
slots in turn (round robin), so no client starves, and a request whose code, camera, steps and backend equal
the client's previous frame reuses that frame's JPEG instead of rendering again. Frames are JPEG-encoded on
an encoder thread, so the render thread goes on to the next client meanwhile. Webcam images are tracked on
their own thread (`engine.live.webcam`), which hands each tracked code to this worker as a render request.

The worker knows nothing of sockets: a slot delivers each result (a binary frame message or a JSON error text,
see `engine.live.protocol`) to a callback, which the server forwards to its WebSocket.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..errors import AvatarError, ConfigError
from .protocol import (
    ORBIT_DEFAULTS,
    PROTOCOL_VERSION,
    Request,
    StreamSpec,
    camera_key,
    error_message,
    frame_message,
    tracked_message,
)
from .webcam import WebcamTracker, tracking_status

log = logging.getLogger(__name__)
# Named pad corners for ARKit-coded avatars: neutral, jaw open, smile, brows up.
NAMED_CORNERS = ({}, {"jawOpen": 1.0}, {"mouthSmileLeft": 1.0, "mouthSmileRight": 1.0},
                 {"browInnerUp": 1.0, "eyeBlinkLeft": 0.6, "eyeBlinkRight": 0.6})
NAMED_CORNER_LABELS = ("neutral", "jaw open", "smile", "brows up")


def default_corners(config, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """The expression pad's four corner codes [4, E] float32 (neutral first, then three expressions) and their
    labels.

    ARKit-named codes (the `tiny` rig) get jaw open, smile and brows up; other codes (e.g. NPHM's 206) get
    neutral plus three seeded random codes of the amplitude `engine.sequence.orbit` sweeps through.
    """
    dim, names = config.expression_dim, config.expression_names
    corners = np.zeros((4, dim), np.float32)
    if names and all(any(k in names for k in c) for c in NAMED_CORNERS[1:]):
        for row, values in zip(corners, NAMED_CORNERS):
            for name, v in values.items():
                if name in names:
                    row[names.index(name)] = v
        return corners, list(NAMED_CORNER_LABELS)
    if names:
        for i in range(1, 4):
            corners[i, (i - 1) % dim] = 1.0
        return corners, ["neutral"] + [names[(i - 1) % dim] for i in range(1, 4)]
    corners[1:] = np.random.default_rng(seed).normal(0.0, 0.5, size=(3, dim))
    return corners, ["neutral", "random A", "random B", "random C"]


def view_range(config) -> dict | None:
    """The orbit range the avatar was trained on ({"yaw", "pitch", "distance"}: [low, high], `engine.orbit`'s
    angles), which the page keeps its camera in by default; None when the avatar records none."""
    seen = config.trained_on
    if seen is None:
        return None
    return {"yaw": list(seen.azimuth_deg), "pitch": list(seen.elevation_deg), "distance": list(seen.distance)}


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    """[H, W, 3] uint8 -> JPEG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@dataclass
class Slot:
    """One client's state: its newest unserved request, last frame and statistics."""

    id: int
    deliver: Callable[[bytes | str], None]
    pending: Request | None = None
    closed: bool = False
    last_key: tuple | None = None
    last_jpeg: bytes | None = None
    frames: int = 0
    dropped: int = 0
    fps: float = 0.0
    latency_ms: float = 0.0
    last_delivery: float | None = field(default=None, repr=False)

    def record(self, now: float, latency_s: float) -> None:
        """Moving averages (weight 0.2) of the delivered frame rate and the latency."""
        if self.last_delivery is not None and now > self.last_delivery:
            rate = 1.0 / (now - self.last_delivery)
            self.fps = rate if self.frames == 1 else 0.8 * self.fps + 0.2 * rate
        self.latency_ms = 1e3 * latency_s if self.frames == 0 else 0.8 * self.latency_ms + 200 * latency_s
        self.last_delivery = now
        self.frames += 1


class RenderWorker:
    """One thread rendering for all clients. `start()`, then per client `open_slot(deliver)`, `submit(slot,
    request)` for every request and `close_slot(slot)`; `stop()` ends the thread.

    Args:
        avatar: the model (shared by every renderer the worker builds).
        device, sampler, seed, dtype, raster_backend: as `engine.renderer.Renderer`.
        engines: an export folder (`avatar export`) for the `onnxruntime` and `tensorrt` backends.
        steps: the default number of steps; max_steps: the most a client may ask for.
        backends: the backend names clients may choose (the first is the default).
        max_renderers: renderers kept built, one per (backend, steps), least recently used evicted.
        jpeg_quality: 1..95.
        expression_map: an `ExpressionMap` file (`avatar fit-driver`) for webcam driving of avatars whose code
            the tracker cannot name (default: by name, for ARKit-coded avatars such as `tiny`).
        max_message_bytes: the largest message accepted (default `protocol.MAX_MESSAGE_BYTES`).
        max_trackers: webcam clients tracked at once (one pooled face tracker each).
    """

    def __init__(self, avatar, device: str = "cpu", sampler: str = "ddim", steps: int = 2, max_steps: int = 50,
                 backends: tuple[str, ...] = ("reference",), seed: int | None = None, dtype=None,
                 raster_backend: str = "auto", max_renderers: int = 4, jpeg_quality: int = 90,
                 max_message_bytes: int | None = None, expression_map: str | None = None, max_trackers: int = 4,
                 engines: str | None = None):
        from ..backends import backend_class

        if not backends:
            raise ConfigError("name at least one backend clients may use, e.g. backends=('reference',)")
        for name in backends:
            backend_class(name)  # an unknown name fails now, listing the choices
        self.avatar, self.config = avatar, avatar.config
        options = {} if max_message_bytes is None else {"max_message_bytes": max_message_bytes}
        self.spec = StreamSpec.for_config(self.config, steps=steps, max_steps=max_steps, backends=tuple(backends),
                                          backend=backends[0], **options)
        if not 1 <= steps <= max_steps <= 50:
            raise ConfigError(f"need 1 <= steps <= max_steps <= 50, got steps={steps}, max_steps={max_steps}; "
                              "pass --steps 2 --max-steps 20, say")
        self._renderer_args = dict(device=device, sampler=sampler, seed=seed, dtype=dtype,
                                   raster_backend=raster_backend)
        self.sampler, self.max_renderers, self.jpeg_quality = sampler, max_renderers, jpeg_quality
        self.engines = engines
        self.corners, self.corner_labels = default_corners(self.config)
        self.webcam = WebcamTracker(self.config, self._tracked, max_trackers, expression_map)
        self._renderers: OrderedDict[tuple[str, int], object] = OrderedDict()
        self._slots: dict[int, Slot] = {}
        self._next_id, self._turn = 0, 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._encoder: ThreadPoolExecutor | None = None

    # -- facts ---------------------------------------------------------------------------------------------
    def info(self) -> dict:
        """The `info` message (see `engine.live.protocol`)."""
        s = self.spec
        return {"type": "info", "protocol": PROTOCOL_VERSION, "avatar": self.config.name,
                "image_size": s.image_size, "expression_dim": s.expression_dim,
                "expression_names": list(s.expression_names) if s.expression_names else None,
                "corners": self.corners.tolist(), "corner_labels": self.corner_labels,
                "camera": dict(ORBIT_DEFAULTS), "view_range": view_range(self.config), "steps": s.steps,
                "max_steps": s.max_steps, "backends": list(s.backends), "backend": s.backend,
                "sampler": self.sampler, "max_message_bytes": s.max_message_bytes, "tracking": tracking_status()}

    def stats(self) -> list[dict]:
        """Per client: frames delivered, requests dropped, fps and latency (moving averages)."""
        with self._cond:
            slots = list(self._slots.values())
        return [{"client": s.id, "frames": s.frames, "dropped": s.dropped, "fps": round(s.fps, 2),
                 "latency_ms": round(s.latency_ms, 2), **(self.webcam.stats(s.id) or {})} for s in slots]

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> "RenderWorker":
        if self._thread is None:
            self._stopping = False
            self._encoder = ThreadPoolExecutor(1, thread_name_prefix="jpeg-encoder")  # one: frames stay in order
            self._thread = threading.Thread(target=self._loop, name="render-worker", daemon=True)
            self._thread.start()
            self.webcam.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._encoder is not None:
            self._encoder.shutdown(wait=True)
            self._encoder = None
        self.webcam.stop(timeout)

    def open_slot(self, deliver: Callable[[bytes | str], None]) -> Slot:
        with self._cond:
            slot = Slot(self._next_id, deliver)
            self._next_id += 1
            self._slots[slot.id] = slot
            return slot

    def close_slot(self, slot: Slot) -> None:
        with self._cond:
            slot.closed, slot.pending = True, None
            self._slots.pop(slot.id, None)
        self.webcam.close(slot.id)

    def submit(self, slot: Slot, request: Request) -> None:
        """Make `request` the slot's pending one (replacing, and dropping, an unserved older one); a webcam image
        goes to the tracking thread first."""
        if request.jpeg is not None:
            if not slot.closed:
                self.webcam.submit(slot.id, slot.deliver, request)
            return
        with self._cond:
            if slot.closed:
                return
            if slot.pending is not None:
                slot.dropped += 1
            slot.pending = request
            self._cond.notify()

    # -- the thread ----------------------------------------------------------------------------------------
    def _take(self) -> tuple[Slot, Request] | None:
        """The next slot with a request, in turn after the last one served (call with the lock held)."""
        slots = list(self._slots.values())
        for k in range(len(slots)):
            slot = slots[(self._turn + k) % len(slots)]
            if slot.pending is not None:
                request, slot.pending = slot.pending, None
                self._turn = (self._turn + k + 1) % len(slots)
                return slot, request
        return None

    def _tracked(self, webcam_slot, request: Request, code, camera, found: bool, head) -> None:
        """The tracking thread's result for one image: a `tracked` reply now, a render of it in its turn."""
        with self._cond:
            slot = self._slots.get(webcam_slot.id)
        if slot is None:
            return
        _deliver(slot, tracked_message(request.id, request.capture_time, found, head, code, webcam_slot.fps))
        self.submit(slot, Request(request.id, code, camera, request.steps, request.backend,
                                  received=request.received, tracked=found))

    def _loop(self) -> None:
        while True:
            with self._cond:
                job = None
                while not self._stopping and (job := self._take()) is None:
                    self._cond.wait()
            if self._stopping:
                return
            slot, request = job
            try:
                frame = self.serve(slot, request)
            except Exception as e:  # the one worker must outlive any single bad request
                frame = Future()
                frame.set_exception(e)
            frame.add_done_callback(lambda f, slot=slot, request=request: _deliver_frame(slot, request, f))

    def renderer(self, steps: int, backend: str):
        """The renderer for (backend, steps), built on first use and kept (least recently used evicted)."""
        from ..backends import ENGINE_BACKENDS
        from ..renderer import Renderer

        key = (backend, steps)
        if key in self._renderers:
            self._renderers.move_to_end(key)
            return self._renderers[key]
        options = {"engines": self.engines} if self.engines is not None and backend in ENGINE_BACKENDS else None
        renderer = Renderer(self.avatar, steps=steps, backend=backend, backend_options=options, **self._renderer_args)
        self._renderers[key] = renderer
        while len(self._renderers) > self.max_renderers:
            self._renderers.popitem(last=False)
        return renderer

    def serve(self, slot: Slot, request: Request) -> Future:
        """Render (or reuse) one request's frame -> a Future of its binary frame message, finished by the encoder
        thread (the last-frame cache is read there too: it runs jobs in order). Runs on the worker thread."""
        code, camera = request.code, request.camera
        key = (code.tobytes(), camera_key(camera), request.steps, request.backend)
        image, render_ms = None, 0.0
        if key != slot.last_key:
            t0 = time.perf_counter()
            image = self.renderer(request.steps, request.backend).render(camera, code)
            render_ms = 1e3 * (time.perf_counter() - t0)
            slot.last_key = key
        if self._encoder is not None:
            return self._encoder.submit(self._finish, slot, request, image, render_ms)
        done = Future()  # serve() without start() (tests, one-off use): encoded here
        done.set_result(self._finish(slot, request, image, render_ms))
        return done

    def _finish(self, slot: Slot, request: Request, image: np.ndarray | None, render_ms: float) -> bytes:
        """On the encoder thread: JPEG-encode a rendered image (None: reuse the slot's last JPEG), frame it."""
        if image is not None:
            slot.last_jpeg = encode_jpeg(image, self.jpeg_quality)
        now = time.perf_counter()
        slot.record(now, now - request.received)
        camera = request.camera
        extra = {} if request.tracked is None else {"tracked": request.tracked}
        header = {"id": request.id, "width": camera.width, "height": camera.height,
                  "code": [round(float(v), 5) for v in request.code], "cached": image is None,
                  "render_ms": round(render_ms, 2), "latency_ms": round(1e3 * (now - request.received), 2),
                  "fps": round(slot.fps, 2), "dropped": slot.dropped, **extra}
        return frame_message(header, slot.last_jpeg)


def _deliver_frame(slot: Slot, request: Request, frame: Future) -> None:
    """A finished frame (or why it failed) to its client."""
    error = frame.exception()
    if error is None:
        _deliver(slot, frame.result())
    elif isinstance(error, AvatarError):
        _deliver(slot, error_message(str(error), request.id))
    else:
        log.error("render worker: request %r failed", request.id, exc_info=error)
        _deliver(slot, error_message(f"internal error: {type(error).__name__}: {error}", request.id))


def _deliver(slot: Slot, payload: bytes | str) -> None:
    if not slot.closed:
        try:
            slot.deliver(payload)
        except Exception:  # a client gone mid-delivery is that client's problem only
            log.debug("render worker: delivery to client %d failed", slot.id, exc_info=True)
