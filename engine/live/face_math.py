"""Face landmarks -> head pose + ARKit-named expression coefficients: the tracker's maths, plain numpy.

The landmarks are MediaPipe's 478-point face mesh with irises (`engine.live.tracking.Tracker` finds them in
video frames); nothing here imports MediaPipe, so the maths runs and is tested without it.

- **Neutral reference.** `FaceMeasure.neutral` (the tracker's first tracked frame, `calibrate(frame)`, or a stored
  array) is the neutral face: pose and expression are measured relative to it.
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
from dataclasses import dataclass, field

import numpy as np

from ..config import ARKIT8
from ..errors import InputError

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
        """Forget the past: the next value passes through unfiltered."""
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

    def openness(P, eye):
        return gap(P, eye["upper"], eye["lower"]) / max(gap(P, eye["inner"], eye["outer"]), 1e-9)

    chin_drop = N[CHIN, 1] - A[CHIN, 1]
    lip_gap = gap(A, LIP_UPPER_INNER, LIP_LOWER_INNER) - gap(N, LIP_UPPER_INNER, LIP_LOWER_INNER)
    c = {"jawOpen": clamp(0.5 * (chin_drop + lip_gap) / JAW_FULL)}

    for side, eye in (("Left", EYE_L), ("Right", EYE_R)):
        ratio = openness(A, eye) / max(openness(N, eye), 1e-9)
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
    widths = [gap(A, left, right) / max(gap(N, left, right), 1e-9) for left, right in zip(CONTOUR_L, CONTOUR_R)]
    c["cheekPuff"] = clamp((float(np.mean(widths)) - 1 - PUFF_PER_JAW * c["jawOpen"]) / PUFF_FULL)
    side = A[CHIN, 0] - N[CHIN, 0]
    c["jawLeft"], c["jawRight"] = clamp(side / JAW_SIDE_FULL), clamp(-side / JAW_SIDE_FULL)
    return np.array([c[name] for name in COEFFICIENTS], dtype=np.float32)


def viewer_frame(landmarks: np.ndarray) -> np.ndarray:
    """Pixel landmarks (x right, y down, z away) -> viewer frame (x right, y up, z toward the camera), float64."""
    return landmarks.astype(np.float64) * np.array([1.0, -1.0, -1.0])


class FaceMeasure:
    """Pose and coefficients of landmark sets against a neutral face, optionally smoothed over time.

    Args:
        smooth: One Euro filtering of coefficients and pose (off: the raw per-frame values).
        min_cutoff, beta: the coefficient filter's parameters (Hz, and Hz per coefficient unit per second); the
            pose filter uses `min_cutoff` with beta scaled to degrees for the angles.
        neutral: the neutral face ([478, 3] pixel landmarks, e.g. an earlier `neutral`); default: none yet.
    """

    def __init__(self, smooth: bool = True, min_cutoff: float = 1.5, beta: float = 1.0,
                 neutral: np.ndarray | None = None):
        self.smooth = smooth
        self._coef_filter = OneEuroFilter(min_cutoff, beta)
        # pose = (roll, pitch, yaw) in degrees, which move ~50x more than coefficients, then log scale and shift
        self._pose_filter = OneEuroFilter(min_cutoff, beta * np.array([0.02, 0.02, 0.02, 1.0, 1.0, 1.0]))
        self._neutral: np.ndarray | None = None
        if neutral is not None:
            self.neutral = neutral

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
        viewer = viewer_frame(landmarks)
        iod = float(np.linalg.norm(viewer[EYE_OUTER_L] - viewer[EYE_OUTER_R]))
        if iod < 1e-6:
            raise InputError("the neutral face's eye corners coincide; calibrate on a frame with a visible face")
        self._neutral = landmarks
        self._ref_rigid = viewer[list(RIGID)]
        self._iod = iod
        self._ref_norm = (viewer - self._ref_rigid.mean(0)) / iod
        self._coef_filter.reset()
        self._pose_filter.reset()

    def reset(self) -> None:
        """Forget the neutral face and the filters' state (a `Tracker` takes its next tracked frame as the neutral)."""
        self._neutral = None
        self._coef_filter.reset()
        self._pose_filter.reset()

    def measure(self, landmarks: np.ndarray, t: float = 0.0) -> TrackResult:
        """Pose and coefficients of landmarks [478, 3] (`TrackResult.landmarks`) against the neutral face, at time
        `t` (seconds; feeds the smoothing). Needs a neutral face (`calibrate`, `neutral = ...` or a tracked frame)."""
        if self._neutral is None:
            raise InputError("no neutral face yet; call calibrate(frame), set tracker.neutral or track a frame first")
        landmarks = np.asarray(landmarks, np.float32)
        if landmarks.shape != (NUM_LANDMARKS, 3):
            raise InputError(f"landmarks must be [{NUM_LANDMARKS}, 3] (Tracker.landmarks), got {landmarks.shape}")
        cur = viewer_frame(landmarks)
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
