"""Face tracking (`engine.live.tracking`, its maths in `engine.live.face_math`), the tracker -> avatar map
(`engine.live.expression_map`) and the virtual camera sink. Needs the dev extra (MediaPipe, scikit-image), which
`make test` installs."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from skimage import data
from skimage.transform import rotate

from engine.config import ARKIT8, from_preset
from engine.data.synthetic import SyntheticHead, default_camera
from engine.errors import BackendError, ConfigError, FormatError, InputError
from engine.geometry import Camera
from engine.live.expression_map import ExpressionMap, camera_from_pose, ridge_fit
from engine.live.face_math import (
    COEFFICIENTS,
    RIGID,
    FaceMeasure,
    HeadPose,
    OneEuroFilter,
    euler_from_rotation,
    rotation_from_euler,
    similarity_fit,
    viewer_frame,
)
from engine.live.tracking import Tracker


@pytest.fixture(scope="module")
def tracker():
    with Tracker(static_images=True, smooth=False) as t:
        yield t


@pytest.fixture(scope="module")
def astronaut():
    return data.astronaut()


def _rotated(image: np.ndarray, degrees: float) -> np.ndarray:
    return (rotate(image, degrees, mode="edge") * 255).round().astype(np.uint8)


# -- the tracker on a photo --------------------------------------------------------------------------------
def test_finds_478_landmarks_in_the_astronaut(tracker, astronaut):
    lm = tracker.landmarks(astronaut)
    assert lm is not None and lm.shape == (478, 3) and lm.dtype == np.float32
    assert (lm[:, 0] > 0).all() and (lm[:, 0] < 512).all() and (lm[:, 1] > 0).all() and (lm[:, 1] < 512).all()
    # the subject's left eye (263) is on the image's right in a non-mirrored photo
    assert lm[263, 0] > lm[33, 0]
    assert tracker.landmarks(np.full((128, 128, 3), 255, np.uint8)) is None


@pytest.mark.parametrize("degrees", [10.0, -20.0])
def test_roll_follows_an_in_plane_rotation(tracker, astronaut, degrees, capsys):
    neutral = tracker.calibrate(astronaut)
    assert abs(neutral.pose.roll) < 1e-6 and np.allclose(neutral.vector, 0, atol=1e-5)
    result = tracker.track(_rotated(astronaut, degrees))
    with capsys.disabled():
        print(f"\n[tracker] astronaut rolled {degrees:+.0f} deg: tracked roll {result.pose.roll:+.2f} deg")
    # roll > 0 is counter-clockwise as displayed, the sign skimage.transform.rotate uses
    assert result.pose.roll == pytest.approx(degrees, abs=2.0)
    assert abs(result.pose.yaw) < 5 and abs(result.pose.pitch) < 5
    assert np.allclose(result.pose.rotation, rotation_from_euler(result.pose.roll, result.pose.pitch,
                                                                 result.pose.yaw), atol=1e-6)


def test_translation_and_result_fields(tracker, astronaut):
    tracker.calibrate(astronaut)
    result = tracker.track(np.roll(astronaut, (20, 30), axis=(0, 1)))  # 20 px down, 30 px right
    tx, ty = result.pose.translation
    assert tx > 0.2 and ty < -0.1 and abs(result.pose.roll) < 2
    assert set(result.coefficients) == set(COEFFICIENTS) and result.vector.shape == (len(COEFFICIENTS),)
    assert COEFFICIENTS[:8] == ARKIT8
    assert result.offsets.shape == (478, 3)
    assert all(0.0 <= v <= 1.0 for v in result.coefficients.values())


def test_bad_frames_and_neutrals(tracker):
    with pytest.raises(InputError):
        tracker.track(np.zeros((64, 64), np.uint8))
    with pytest.raises(InputError, match="no face"):
        tracker.calibrate(np.full((96, 96, 3), 255, np.uint8))
    with pytest.raises(InputError):
        tracker.neutral = np.zeros((10, 3))


# -- the tracker on the synthetic head's rig -------------------------------------------------------------
@pytest.fixture(scope="module")
def rig_sweeps(tracker):
    """Tracked coefficient vectors [8, K] for jawOpen, eyeBlinkLeft and mouthSmileLeft swept 0 -> 1 in 8 steps."""
    head, camera = SyntheticHead(), default_camera(256)

    def frame(code):
        rgb, _ = head.render(camera, torch.tensor(code, dtype=torch.float32), supersample=1)
        return (rgb.numpy() * 255).round().astype(np.uint8)

    neutral = frame(np.zeros(8))
    tracker.calibrate(neutral)
    sweeps = {}
    for name in ("jawOpen", "eyeBlinkLeft", "mouthSmileLeft"):
        rows = []
        for value in np.linspace(0.0, 1.0, 8):
            code = np.zeros(8)
            code[ARKIT8.index(name)] = value
            result = tracker.track(frame(code) if value > 0 else neutral)
            assert result is not None, f"no face found in the synthetic head at {name}={value:.2f}"
            rows.append(result.vector)
        sweeps[name] = np.stack(rows)
    return sweeps


@pytest.mark.parametrize("name", ["jawOpen", "eyeBlinkLeft", "mouthSmileLeft"])
def test_coefficients_follow_the_synthetic_rig(rig_sweeps, name, capsys):
    tracked = rig_sweeps[name][:, COEFFICIENTS.index(name)]
    rho = spearmanr(np.linspace(0, 1, 8), tracked).statistic
    with capsys.disabled():
        print(f"\n[tracker] synthetic rig {name} 0 -> 1 in 8 steps: Spearman {rho:.3f}")
    assert rho >= 0.9, f"{name}: tracked {tracked.round(2)}, Spearman {rho:.3f}"
    assert tracked[-1] > 0.5
    # left is the subject's left, as in the rig: the other side's coefficient moves less
    twin = {"eyeBlinkLeft": "eyeBlinkRight", "mouthSmileLeft": "mouthSmileRight"}.get(name)
    if twin:
        assert tracked[-1] > rig_sweeps[name][-1, COEFFICIENTS.index(twin)] + 0.3


# -- pure maths ------------------------------------------------------------------------------------------
def test_similarity_fit_and_euler_round_trip():
    rng = np.random.default_rng(0)
    src = rng.normal(size=(30, 3))
    R = rotation_from_euler(12.0, -7.0, 25.0)
    s, R_fit, t = similarity_fit(src, 1.7 * src @ R.T + [1.0, -2.0, 0.5])
    assert s == pytest.approx(1.7) and np.allclose(R_fit, R) and np.allclose(t, [1.0, -2.0, 0.5])
    assert np.allclose(euler_from_rotation(R), (12.0, -7.0, 25.0))


def test_measure_recovers_a_rigid_head_motion_without_mediapipe():
    rng = np.random.default_rng(0)
    neutral = rng.uniform(100, 300, size=(478, 3)).astype(np.float32)  # pixel landmarks
    face = FaceMeasure(smooth=False, neutral=neutral)
    viewer = viewer_frame(neutral)
    centre = viewer[list(RIGID)].mean(0)  # the pose's translation is the rigid landmarks' centroid shift
    moved = 1.2 * (viewer - centre) @ rotation_from_euler(8.0, -5.0, 12.0).T + centre + [15.0, -10.0, 0.0]
    result = face.measure(viewer_frame(moved))  # the viewer flip is its own inverse
    pose = result.pose
    assert (pose.roll, pose.pitch, pose.yaw) == pytest.approx((8.0, -5.0, 12.0), abs=1e-4)
    assert pose.scale == pytest.approx(1.2)
    iod = np.linalg.norm(viewer[263] - viewer[33])
    assert pose.translation == pytest.approx(np.array([15.0, -10.0]) / iod)
    assert np.allclose(result.offsets, 0, atol=1e-4) and np.allclose(result.vector, 0, atol=1e-4)
    with pytest.raises(InputError, match="no neutral"):
        FaceMeasure().measure(neutral)


def test_one_euro_filter_smooths_jitter_and_follows_motion():
    rng = np.random.default_rng(0)
    f = OneEuroFilter(min_cutoff=1.0, beta=0.0)
    noisy = 0.5 + 0.05 * rng.normal(size=(120, 3))
    out = np.stack([f(x, i / 30) for i, x in enumerate(noisy)])
    assert out[30:].std() < 0.4 * noisy[30:].std()
    fast = OneEuroFilter(min_cutoff=1.0, beta=5.0)
    ramp = [fast(np.array([i / 10]), i / 30) for i in range(30)]
    slow = OneEuroFilter(min_cutoff=1.0, beta=0.0)
    lag = [slow(np.array([i / 10]), i / 30) for i in range(30)]
    assert abs(ramp[-1][0] - 2.9) < abs(lag[-1][0] - 2.9)  # a speed-adaptive cutoff lags less
    with pytest.raises(InputError):
        OneEuroFilter(min_cutoff=0.0)


def test_camera_from_pose_turns_the_head_like_the_tracked_one():
    base = Camera.look_at(eye=(0, 0, 1), width=128, height=128, fov_deg=16)
    same = camera_from_pose(HeadPose(), base)
    assert torch.allclose(same.R, base.R, atol=1e-6) and torch.allclose(same.t, base.t, atol=1e-6)
    top, nose = torch.tensor([[0.0, 0.1, 0.0]]), torch.tensor([[0.0, 0.0, 0.1]])
    centre = base.project(torch.zeros(1, 3))[0]
    roll = camera_from_pose(HeadPose(rotation=rotation_from_euler(30, 0, 0)), base)
    d = roll.project(top)[0] - centre
    # counter-clockwise as displayed (image y points down): the head's top moves left by 30 degrees
    assert math.degrees(math.atan2(-d[0], -d[1])) == pytest.approx(30.0, abs=0.5)
    yaw = camera_from_pose(HeadPose(rotation=rotation_from_euler(0, 0, 20)), base)
    assert yaw.project(nose)[0, 0] > centre[0] + 5  # the face turns toward the image's right
    pitch = camera_from_pose(HeadPose(rotation=rotation_from_euler(0, 20, 0)), base)
    assert pitch.project(nose)[0, 1] > centre[1] + 5  # and nods down
    assert float(roll.center.norm()) == pytest.approx(1.0, abs=1e-5)  # an orbit around the head centre


# -- the expression map ----------------------------------------------------------------------------------
def test_map_by_name_for_the_arkit_rig():
    m = ExpressionMap.for_avatar(from_preset("tiny"))
    assert m.kind == "names" and m.target_dim == 8
    vector = np.linspace(-0.5, 1.5, len(COEFFICIENTS)).astype(np.float32)
    code = m.map_features(vector)
    assert np.allclose(code, np.clip(vector[:8], 0, 1))
    assert np.allclose(ExpressionMap.by_name(["cheekPuff", "jawOpen"]).map_features(vector),
                       np.clip(vector[[7, 0]], 0, 1))
    assert np.allclose(m.neutral_code(), 0)
    with pytest.raises(ConfigError, match="fit-driver"):
        ExpressionMap.for_avatar(from_preset("sd21"))
    with pytest.raises(ConfigError):
        ExpressionMap.by_name(["jawOpen", "notABlendshape"])


def test_ridge_map_fits_saves_and_loads(tmp_path: Path):
    rng = np.random.default_rng(0)
    X = rng.uniform(0, 1, size=(200, len(COEFFICIENTS)))
    W = rng.normal(size=(len(COEFFICIENTS), 5))
    Y = X @ W + 0.3
    m = ExpressionMap.fit(X, Y, alpha=1e-6, metrics={"rmse": 0.0})
    assert np.abs(m.map_features(X) - Y).max() < 1e-3
    path = m.save(tmp_path / "map.npz")
    back = ExpressionMap.load(path)
    assert back.kind == "ridge" and back.target_dim == 5 and back.metrics == {"rmse": 0.0}
    assert np.allclose(back.map_features(X[:3]), m.map_features(X[:3]))
    # the dual form (more features than rows) gives the same answer as the primal one
    Xw, Yw = rng.normal(size=(10, 40)), rng.normal(size=(10, 2))
    Wd, _ = ridge_fit(Xw, Yw, 0.5)
    Xc = Xw - Xw.mean(0)
    Wp = np.linalg.solve(Xc.T @ Xc + 0.5 * np.eye(40), Xc.T @ (Yw - Yw.mean(0)))
    assert np.allclose(Wd, Wp, atol=1e-4)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(FormatError):
        ExpressionMap.load(tmp_path / "bad.npz")
    with pytest.raises(FormatError, match="fit-driver"):
        ExpressionMap.load(tmp_path / "missing.npz")
    with pytest.raises(ConfigError, match="avatar 'tiny'"):
        ExpressionMap.for_avatar(from_preset("tiny"), path)  # 5 values for an 8-value code


# -- the virtual camera ----------------------------------------------------------------------------------
def test_virtual_camera_without_a_device_says_what_to_do():
    from engine.live.sinks import VirtualCameraSink

    if any(Path("/sys/devices/virtual/video4linux").glob("video*")):
        pytest.skip("a v4l2loopback device exists here")
    with pytest.raises(BackendError, match="v4l2loopback|OBS"):
        VirtualCameraSink(64, 64, fps=10)
