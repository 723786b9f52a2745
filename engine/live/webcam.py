"""Webcam driving on `avatar serve`: a tracking thread apart from the render thread, and a bounded pool of face
trackers.

Each client's newest webcam image waits in its `WebcamSlot` (an image that arrives before the previous one was
tracked replaces it: stale ones are dropped, counted in `dropped`). The tracking thread takes the clients in
turn, tracks each image at its capture time (the client's clock, so the tracker's One Euro smoothing sees the
true frame rate), and hands the code and camera to a callback: the render worker answers with a `tracked`
message and renders the newest code when its turn comes. Tracking therefore runs at the rate images arrive (up
to what the CPU allows), not at the render rate.

A MediaPipe face mesh costs about 28 MB that closing it does not give back, so trackers are pooled: at most
`size` exist, each held by one client from its first image to its disconnect, then reset and reused by the
next. One more webcam client gets an error naming `--max-trackers`.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import AvatarError
from .protocol import ProtocolError, Request, error_message

log = logging.getLogger(__name__)
MAX_WEBCAM_PIXELS = 4096 * 4096
MIN_FRAME_INTERVAL_S = 1e-3  # capture times that do not increase are moved this far past the previous one


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


class TrackerPool:
    """At most `size` face trackers (`engine.live.tracking.Tracker`), built on demand and reused after `release`."""

    def __init__(self, size: int):
        self.size, self._idle, self.built = size, [], 0
        self._lock = threading.Lock()

    def acquire(self):
        with self._lock:
            if self._idle:
                return self._idle.pop()
            if self.built >= self.size:
                raise ProtocolError(f"all {self.size} face trackers are in use by other webcam clients (the "
                                    "server's --max-trackers); try again when one stops, or push codes instead")
            self.built += 1
        from .tracking import Tracker

        try:
            return Tracker()
        except BaseException:
            with self._lock:
                self.built -= 1
            raise

    def release(self, tracker) -> None:
        """Back to the pool, forgetting its client's face (neutral, smoothing, MediaPipe's tracked region)."""
        tracker.reset()
        with self._lock:
            self._idle.append(tracker)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for tracker in idle:
            tracker.close()


class Tracking:
    """One client's webcam driver: a pooled tracker inside an `engine.live.driver.Driver` (expression map, head
    pose -> camera); anything missing is reported as "tracking unavailable: ..."."""

    def __init__(self, config, pool: TrackerPool, map_path: str | None = None):
        reason = tracking_status()
        if reason is not None:
            raise ProtocolError(reason)
        from ..orbit import orbit_camera
        from .driver import Driver
        from .expression_map import ExpressionMap

        try:
            expression_map = ExpressionMap.for_avatar(config, map_path)
        except AvatarError as e:
            raise ProtocolError(f"tracking unavailable: {e}") from None
        self.pool, self.tracker = pool, pool.acquire()
        self.driver = Driver(expression_map, orbit_camera(size=config.image_size), tracker=self.tracker)
        self.last_time: float | None = None

    def __call__(self, rgb: np.ndarray, base_camera, t: float):
        """[H, W, 3] uint8 at time `t` (seconds) -> (code [E] float32, camera, whether a face was found, the head
        pose (yaw, pitch, roll) in degrees or None). Without a face the last tracked code and camera are kept."""
        if self.last_time is not None and t < self.last_time + MIN_FRAME_INTERVAL_S:
            t = self.last_time + MIN_FRAME_INTERVAL_S
        self.last_time = t
        self.driver.camera = base_camera
        before = self.driver.tracked
        frame = self.driver(rgb, t)
        pose = self.driver.pose
        head = None if pose is None else (float(pose.yaw), float(pose.pitch), float(pose.roll))
        return frame.expression.numpy(), frame.camera, self.driver.tracked > before, head

    def close(self) -> None:
        self.pool.release(self.tracker)


@dataclass
class WebcamSlot:
    """A client's webcam state: its newest untracked image, its tracking, and statistics."""

    id: int
    deliver: Callable[[bytes | str], None]
    pending: Request | None = None
    tracking: Tracking | None = None
    closed: bool = False
    tracked: int = 0
    dropped: int = 0
    fps: float = 0.0
    last_done: float | None = None

    def record(self, now: float) -> None:
        if self.last_done is not None and now > self.last_done:
            rate = 1.0 / (now - self.last_done)
            self.fps = rate if self.tracked == 1 else 0.8 * self.fps + 0.2 * rate
        self.last_done = now
        self.tracked += 1


class WebcamTracker:
    """The tracking thread. `submit(slot_id, deliver, request)` a webcam image, `close(slot_id)` when the client
    leaves; each tracked image goes to `on_tracked(slot, request, code, camera, found, head)` (on this thread)."""

    def __init__(self, config, on_tracked: Callable, max_trackers: int = 4, map_path: str | None = None):
        self.config, self.map_path, self.on_tracked = config, map_path, on_tracked
        self.pool = TrackerPool(max_trackers)
        self._slots: dict[int, WebcamSlot] = {}
        self._order: list[int] = []
        self._turn = 0
        self._cond = threading.Condition()
        self._retired: list[Tracking] = []
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="webcam-tracker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._cond:
            retired = self._retired + [s.tracking for s in self._slots.values() if s.tracking is not None]
            self._retired, self._slots, self._order = [], {}, []
        for tracking in retired:
            tracking.close()
        self.pool.close()

    def submit(self, slot_id: int, deliver: Callable[[bytes | str], None], request: Request) -> None:
        with self._cond:
            slot = self._slots.get(slot_id)
            if slot is None:
                slot = self._slots[slot_id] = WebcamSlot(slot_id, deliver)
                self._order.append(slot_id)
            if slot.pending is not None:
                slot.dropped += 1
            slot.pending = request
            self._cond.notify()

    def close(self, slot_id: int) -> None:
        with self._cond:
            slot = self._slots.pop(slot_id, None)
            if slot is None:
                return
            self._order.remove(slot_id)
            slot.closed, slot.pending = True, None
            if slot.tracking is not None:  # released by the thread, never while in use
                self._retired.append(slot.tracking)
                slot.tracking = None
            self._cond.notify()

    def stats(self, slot_id: int) -> dict | None:
        with self._cond:
            slot = self._slots.get(slot_id)
            return None if slot is None else {"tracked": slot.tracked, "tracking_fps": round(slot.fps, 2),
                                              "stale_dropped": slot.dropped}

    def _take(self) -> tuple[WebcamSlot, Request] | None:
        n = len(self._order)
        for k in range(n):
            slot = self._slots[self._order[(self._turn + k) % n]]
            if slot.pending is not None:
                request, slot.pending = slot.pending, None
                self._turn = (self._turn + k + 1) % n
                return slot, request
        return None

    def _loop(self) -> None:
        while True:
            with self._cond:
                job = None
                while not self._stopping and not self._retired and (job := self._take()) is None:
                    self._cond.wait()
                retired, self._retired = self._retired, []
            for tracking in retired:
                tracking.close()
            if self._stopping:
                return
            if job is not None:
                self._track(*job)

    def _track(self, slot: WebcamSlot, request: Request) -> None:
        try:
            rgb = decode_jpeg(request.jpeg)
            if slot.tracking is None:
                slot.tracking = Tracking(self.config, self.pool, self.map_path)
            t = request.capture_time if request.capture_time is not None else request.received
            code, camera, found, head = slot.tracking(rgb, request.camera, t)
        except AvatarError as e:
            self._deliver(slot, error_message(str(e), request.id))
            return
        except Exception as e:  # the one tracking thread must outlive any single bad image
            log.exception("webcam tracker: image %r failed", request.id)
            self._deliver(slot, error_message(f"internal error tracking the image: {type(e).__name__}: {e}",
                                              request.id))
            return
        finally:
            with self._cond:
                if slot.closed and slot.tracking is not None:  # the client left while its image was tracked
                    self._retired.append(slot.tracking)
                    slot.tracking = None
        slot.record(time.perf_counter())
        if not slot.closed:
            self.on_tracked(slot, request, code, camera, found, head)

    @staticmethod
    def _deliver(slot: WebcamSlot, payload: str) -> None:
        if not slot.closed:
            try:
                slot.deliver(payload)
            except Exception:
                log.debug("webcam tracker: delivery to client %d failed", slot.id, exc_info=True)
