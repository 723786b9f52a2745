"""`RenderWorker`: one rendering thread serving many clients fairly, with bounded latency.

Each client owns a `Slot` that holds only its newest request: a request that arrives before the previous one
was served replaces it (counted in `dropped`), so a fast sender never builds a queue. The thread serves the
slots in turn (round robin), so no client starves, and a request whose code, camera, steps and backend equal
the client's previous frame reuses that frame's JPEG instead of rendering again. Webcam images are tracked
here too (per-client tracker state), after stale ones were dropped.

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
from dataclasses import dataclass, field

import numpy as np

from ..errors import AvatarError, ConfigError
from .protocol import (
    ORBIT_DEFAULTS,
    PROTOCOL_VERSION,
    ProtocolError,
    Request,
    StreamSpec,
    camera_key,
    error_message,
    frame_message,
)

log = logging.getLogger(__name__)
MAX_WEBCAM_PIXELS = 4096 * 4096
# Named pad corners for ARKit-coded avatars: neutral, jaw open, smile, brows up.
NAMED_CORNERS = ({}, {"jawOpen": 1.0}, {"mouthSmileLeft": 1.0, "mouthSmileRight": 1.0},
                 {"browInnerUp": 1.0, "eyeBlinkLeft": 0.6, "eyeBlinkRight": 0.6})


def default_corners(config, seed: int = 0) -> np.ndarray:
    """The expression pad's four corner codes [4, E] float32: neutral first, then three expressions.

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
    elif names:
        for i in range(1, 4):
            corners[i, (i - 1) % dim] = 1.0
    else:
        corners[1:] = np.random.default_rng(seed).normal(0.0, 0.5, size=(3, dim))
    return corners


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    """[H, W, 3] uint8 -> JPEG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    """JPEG bytes -> [H, W, 3] uint8 RGB; a corrupt or huge image is a ProtocolError."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_WEBCAM_PIXELS:
                raise ProtocolError(f"webcam image of {image.width}x{image.height} pixels is too large; send at "
                                    "most 4096x4096 (640x480 is plenty for tracking)")
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ProtocolError(f"the webcam image could not be decoded as a JPEG ({e})") from None


class Tracking:
    """A client's webcam driver (`engine.live.driver.Driver`: tracker, expression map, head pose -> camera), built
    when its first webcam image arrives; anything missing is reported as "tracking unavailable: ..."."""

    def __init__(self, config, map_path: str | None = None):
        reason = tracking_status()
        if reason is not None:
            raise ProtocolError(reason)
        from ..orbit import orbit_camera
        from .driver import Driver
        from .expression_map import ExpressionMap

        try:
            self.driver = Driver(ExpressionMap.for_avatar(config, map_path), orbit_camera(size=config.image_size))
        except AvatarError as e:
            raise ProtocolError(f"tracking unavailable: {e}") from None

    def __call__(self, rgb: np.ndarray, base_camera) -> tuple[np.ndarray, object, bool]:
        """[H, W, 3] uint8 -> (code [E] float32, camera, whether a face was found). Without a face the last
        tracked code and camera (at first the neutral code) are kept."""
        self.driver.camera = base_camera
        before = self.driver.tracked
        frame = self.driver(rgb)
        return frame.expression.numpy(), frame.camera, self.driver.tracked > before

    def close(self) -> None:
        self.driver.close()


def tracking_status() -> str | None:
    """None when the webcam path can run, else why not (the `info` message's "tracking")."""
    import importlib.util

    for module, fix in (("engine.live.tracking", "it is not in this build"),
                        ("engine.live.expression_map", "it is not in this build"),
                        ("engine.live.driver", "it is not in this build"),
                        ("mediapipe", "install the live extra: pip install -e '.[live]'")):
        try:
            if importlib.util.find_spec(module) is None:
                return f"tracking unavailable: {module} is missing ({fix}); push codes as render messages instead"
        except (ImportError, ValueError) as e:
            return f"tracking unavailable: {module} cannot be imported ({e})"
    return None


@dataclass
class Slot:
    """One client's state: its newest unserved request, last frame, tracker and statistics."""

    id: int
    deliver: Callable[[bytes | str], None]
    pending: Request | None = None
    closed: bool = False
    last_key: tuple | None = None
    last_jpeg: bytes | None = None
    tracking: Tracking | None = None
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
        steps: the default number of steps; max_steps: the most a client may ask for.
        backends: the backend names clients may choose (the first is the default).
        max_renderers: renderers kept built, one per (backend, steps), least recently used evicted.
        jpeg_quality: 1..95.
        expression_map: an `ExpressionMap` file (`avatar fit-driver`) for webcam driving of avatars whose code
            the tracker cannot name (default: by name, for ARKit-coded avatars such as `tiny`).
        max_message_bytes: the largest message accepted (default `protocol.MAX_MESSAGE_BYTES`).
    """

    def __init__(self, avatar, device: str = "cpu", sampler: str = "ddim", steps: int = 2, max_steps: int = 50,
                 backends: tuple[str, ...] = ("reference",), seed: int | None = None, dtype=None,
                 raster_backend: str = "torch", max_renderers: int = 4, jpeg_quality: int = 90,
                 max_message_bytes: int | None = None, expression_map: str | None = None):
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
        self.expression_map = expression_map
        self.corners = default_corners(self.config)
        self._renderers: OrderedDict[tuple[str, int], object] = OrderedDict()
        self._slots: dict[int, Slot] = {}
        self._next_id, self._turn = 0, 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._retired: list[Tracking] = []  # closed clients' trackers, closed by the worker thread

    # -- facts ---------------------------------------------------------------------------------------------
    def info(self) -> dict:
        """The `info` message (see `engine.live.protocol`)."""
        s = self.spec
        return {"type": "info", "protocol": PROTOCOL_VERSION, "avatar": self.config.name,
                "image_size": s.image_size, "expression_dim": s.expression_dim,
                "expression_names": list(s.expression_names) if s.expression_names else None,
                "corners": self.corners.tolist(), "camera": dict(ORBIT_DEFAULTS), "steps": s.steps,
                "max_steps": s.max_steps, "backends": list(s.backends), "backend": s.backend,
                "sampler": self.sampler, "max_message_bytes": s.max_message_bytes, "tracking": tracking_status()}

    def stats(self) -> list[dict]:
        """Per client: frames delivered, requests dropped, fps and latency (moving averages)."""
        with self._cond:
            return [{"client": s.id, "frames": s.frames, "dropped": s.dropped, "fps": round(s.fps, 2),
                     "latency_ms": round(s.latency_ms, 2)} for s in self._slots.values()]

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> "RenderWorker":
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="render-worker", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._cond:
            trackers = self._retired + [s.tracking for s in self._slots.values() if s.tracking is not None]
            self._retired = []
            for slot in self._slots.values():
                slot.tracking = None
        for tracking in trackers:
            tracking.close()

    def open_slot(self, deliver: Callable[[bytes | str], None]) -> Slot:
        with self._cond:
            slot = Slot(self._next_id, deliver)
            self._next_id += 1
            self._slots[slot.id] = slot
            return slot

    def close_slot(self, slot: Slot) -> None:
        with self._cond:
            slot.closed, slot.pending = True, None
            if slot.tracking is not None:
                self._retired.append(slot.tracking)
                slot.tracking = None
                self._cond.notify()
            self._slots.pop(slot.id, None)

    def submit(self, slot: Slot, request: Request) -> None:
        """Make `request` the slot's pending one (replacing, and dropping, an unserved older one)."""
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

    def _loop(self) -> None:
        while True:
            with self._cond:
                job = None
                while not self._stopping and not self._retired and (job := self._take()) is None:
                    self._cond.wait()
                retired, self._retired = self._retired, []
            for tracking in retired:  # here, never while the tracker is in use
                tracking.close()
            if self._stopping:
                return
            if job is None:
                continue
            slot, request = job
            try:
                payload = self.serve(slot, request)
            except AvatarError as e:
                payload = error_message(str(e), request.id)
            except Exception as e:  # the one worker must outlive any single bad request
                log.exception("render worker: request %r failed", request.id)
                payload = error_message(f"internal error: {type(e).__name__}: {e}", request.id)
            with self._cond:
                if slot.closed and slot.tracking is not None:  # the client left while its tracker was made
                    self._retired.append(slot.tracking)
                    slot.tracking = None
            if not slot.closed:
                try:
                    slot.deliver(payload)
                except Exception:  # a client gone mid-delivery is that client's problem only
                    log.debug("render worker: delivery to client %d failed", slot.id, exc_info=True)

    def renderer(self, steps: int, backend: str):
        """The renderer for (backend, steps), built on first use and kept (least recently used evicted)."""
        from ..renderer import Renderer

        key = (backend, steps)
        if key in self._renderers:
            self._renderers.move_to_end(key)
            return self._renderers[key]
        renderer = Renderer(self.avatar, steps=steps, backend=backend, **self._renderer_args)
        self._renderers[key] = renderer
        while len(self._renderers) > self.max_renderers:
            self._renderers.popitem(last=False)
        return renderer

    def serve(self, slot: Slot, request: Request) -> bytes:
        """Render (or reuse) one request's frame -> a binary frame message. Runs on the worker thread."""
        extra = {}
        code, camera = request.code, request.camera
        if request.jpeg is not None:
            rgb = decode_jpeg(request.jpeg)
            if slot.tracking is None:
                slot.tracking = Tracking(self.config, self.expression_map)
            code, camera, extra["tracked"] = slot.tracking(rgb, request.camera)
        key = (code.tobytes(), camera_key(camera), request.steps, request.backend)
        render_ms, cached = 0.0, key == slot.last_key
        if not cached:
            t0 = time.perf_counter()
            image = self.renderer(request.steps, request.backend).render(camera, code)
            render_ms = 1e3 * (time.perf_counter() - t0)
            slot.last_key, slot.last_jpeg = key, encode_jpeg(image, self.jpeg_quality)
        now = time.perf_counter()
        slot.record(now, now - request.received)
        header = {"id": request.id, "width": camera.width, "height": camera.height,
                  "code": [round(float(v), 5) for v in code], "cached": cached, "render_ms": round(render_ms, 2),
                  "latency_ms": round(1e3 * (now - request.received), 2), "fps": round(slot.fps, 2),
                  "dropped": slot.dropped, **extra}
        return frame_message(header, slot.last_jpeg)
