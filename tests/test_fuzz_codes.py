"""Fuzzing (hypothesis) of the expression-code and camera validators and of the renderer's camera checks: every
generated input either works (and then what comes out is right) or raises the project's error type.

Deterministic (`derandomize=True`: the same examples every run) and a few seconds in all.
"""

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from engine.data.synthetic import ARKIT8
from engine.errors import AvatarError, FormatError, InputError, RangeWarning
from engine.frame import as_codes
from engine.geometry import Camera
from engine.orbit import orbit_camera
from engine.renderer import DISTANCE_MARGIN, VIEW_MARGIN_DEG, Renderer
from engine.trained_on import CODE_SLACK

FUZZ = settings(derandomize=True, deadline=None, max_examples=150, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**40, 10**40))
values = st.one_of(numbers, st.booleans(), st.none(), st.text(max_size=3), st.complex_numbers(max_magnitude=10))
dtypes = st.sampled_from([np.float32, np.float64, np.float16, np.int64, np.uint8, np.bool_, np.complex64])
ndarrays = arrays(dtypes, array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=9))
codes = st.one_of(
    values,
    st.lists(values, max_size=10),
    st.lists(st.lists(st.floats(-3, 3), max_size=9), max_size=3),
    st.dictionaries(st.one_of(st.sampled_from(ARKIT8), st.text(max_size=8)), values, max_size=4),
    st.lists(st.dictionaries(st.sampled_from(ARKIT8), st.floats(-2, 2)), min_size=1, max_size=3),
    ndarrays,
    ndarrays.map(torch.from_numpy),
)


@pytest.fixture(scope="module")
def demo():
    from engine.avatars import load_avatar

    return load_avatar("demo")


@pytest.fixture(scope="module")
def demo_renderer(demo):
    return Renderer(demo, sampler="ddim", steps=1)


@pytest.mark.filterwarnings("ignore::engine.errors.RangeWarning")
@FUZZ
@given(value=codes)
def test_any_code_is_accepted_or_an_input_error(demo_renderer, value):
    try:
        out = demo_renderer._codes(value)
    except InputError:
        return
    assert out.dtype == torch.float32 and out.device.type == "cpu" and out.ndim == 2 and out.shape[1] == 8
    assert bool(((out >= 0) & (out <= 1)).all())  # finite, and clamped into the synthetic head's [0, 1]
    try:
        plain = as_codes(value)  # the validator alone (no length, no names): accepts no less
    except InputError:
        assert isinstance(value, dict) or isinstance(value, list) and isinstance(value[0], dict)
        return
    assert plain.shape == out.shape


@FUZZ
@given(value=st.lists(st.floats(-1e6, 1e6, width=32), min_size=8, max_size=8))
def test_numbers_come_through_clamped_into_the_head_models_range(demo_renderer, value):
    demo_renderer._warned.clear()  # as a new renderer's
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = demo_renderer._codes(value)
    expected = np.clip(np.asarray(value, np.float32), 0, 1)
    np.testing.assert_array_equal(out.numpy(), expected[None])
    outside = [x for x in value if not -CODE_SLACK <= x <= 1 + CODE_SLACK]  # the warning's tolerance
    assert len([w for w in record if issubclass(w.category, RangeWarning)]) == (1 if outside else 0)


finite = st.floats(-1e6, 1e6)
anything = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 10**6), st.booleans(),
                     st.text(max_size=2), st.none())
quaternions = st.tuples(finite, finite, finite, finite)
matrices = st.one_of(
    arrays(np.float64, (3, 3), elements=st.floats(allow_nan=True, allow_infinity=True)),
    arrays(np.float64, array_shapes(min_dims=0, max_dims=3, max_side=4), elements=finite),
    st.lists(anything, max_size=4),
    quaternions.map(lambda q: _rotation(q) * 1.01),
    quaternions.map(lambda q: -_rotation(q)),
)
WILD = {"R": matrices, "t": st.one_of(st.lists(anything, max_size=4), matrices), "fx": anything, "fy": anything,
        "cx": anything, "cy": anything, "width": anything, "height": anything}


def _rotation(q):
    """A rotation matrix from a quaternion (any non-zero 4-vector); the identity for a zero one."""
    w, x, y, z = q
    n = math.sqrt(w * w + x * x + y * y + z * z)
    if n == 0:
        return np.eye(3)
    w, x, y, z = w / n, x / n, y / n, z / n
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


@st.composite
def camera_args(draw):
    """A valid camera's fields (a random pose, mostly near the head, some looking at it), then up to two of them
    replaced by anything."""
    eye = np.array(draw(st.tuples(*[st.floats(-3, 3)] * 3)))
    if draw(st.booleans()):
        try:
            c = Camera.look_at(eye, (0, 0, 0), width=128, height=128, fov_deg=draw(st.floats(1, 120)))
        except InputError:  # at the origin, or right above or below it: no view direction or no up
            assume(False)
        args = {k: getattr(c, k) for k in ("R", "t", "fx", "fy", "cx", "cy", "width", "height")}
    else:
        R = _rotation(draw(quaternions))
        args = {"R": R, "t": -R @ eye, "fx": draw(st.floats(1e-3, 1e4)), "fy": draw(st.floats(1e-3, 1e4)),
                "cx": draw(st.floats(-1e3, 1e3)), "cy": draw(st.floats(-1e3, 1e3)),
                "width": draw(st.sampled_from([128, 64])), "height": 128}
    for name in sorted(draw(st.sets(st.sampled_from(sorted(WILD)), max_size=2))):
        args[name] = draw(WILD[name])
    return args


@pytest.mark.filterwarnings("ignore::engine.errors.RangeWarning")
@FUZZ
@given(args=camera_args())
def test_any_camera_is_accepted_or_an_input_error(demo_renderer, args):
    try:
        camera = Camera(**args)
    except InputError:
        return
    Rd = camera.R.double()
    assert float((Rd @ Rd.T - torch.eye(3, dtype=torch.float64)).abs().max()) <= 1e-4 and torch.linalg.det(Rd) > 0
    assert camera.fx > 0 and camera.fy > 0 and math.isfinite(camera.cx) and math.isfinite(camera.cy)
    assert isinstance(camera.width, int) and camera.width > 0 and isinstance(camera.height, int)
    assert Camera.from_dict(camera.to_dict()).to_dict() == camera.to_dict()
    try:  # the renderer's checks of a camera: its size, that it sees the head, the recorded view range
        demo_renderer._frame_inputs(camera, torch.zeros(8), None)
    except InputError:
        pass


@FUZZ
@given(d=st.dictionaries(st.sampled_from(["R", "t", "fx", "fy", "cx", "cy", "width", "height", "k"]),
                         st.one_of(anything, matrices), max_size=9))
def test_any_camera_dict_is_a_camera_or_a_project_error(d):
    try:
        Camera.from_dict(d)
    except (FormatError, InputError):
        pass


@FUZZ
@given(yaw=st.floats(-180, 180), pitch=st.floats(-89, 89), distance=st.floats(0.3, 4.0), fov=st.floats(4, 60))
def test_orbit_cameras_against_the_far_plane_and_the_recorded_range(demo_renderer, neutral, yaw, pitch, distance,
                                                                    fov):
    """An orbit camera looks at the head's centre (inside the head), so it sees the head unless all of it lies
    beyond the far plane: its nearest vertex, at depth distance - v . (eye / |eye|), farther than zfar. It warns once
    for each orbit coordinate beyond the recorded range plus its margin."""
    r = demo_renderer
    record, zfar = r.config.trained_on, r.config.conditioning.zfar
    (a0, a1), (e0, e1), (d0, d1) = record.azimuth_deg, record.elevation_deg, record.distance
    far = {"azimuth": (a0 - VIEW_MARGIN_DEG, a1 + VIEW_MARGIN_DEG, yaw),
           "elevation": (e0 - VIEW_MARGIN_DEG, e1 + VIEW_MARGIN_DEG, pitch),
           "distance": (d0 * (1 - DISTANCE_MARGIN), d1 * (1 + DISTANCE_MARGIN), distance)}
    assume(all(min(abs(v - lo), abs(v - hi)) > 1e-2 for lo, hi, v in far.values()))  # clear of the edges
    y, p = math.radians(yaw), math.radians(pitch)
    eye = np.array([math.cos(p) * math.sin(y), math.sin(p), math.cos(p) * math.cos(y)])
    nearest = float((distance - neutral @ eye).min())
    assume(abs(nearest - zfar) > 1e-3)
    camera = orbit_camera(yaw, pitch, size=128, distance=distance, fov_deg=fov)
    r._warned.clear()  # as a new renderer's
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            r._frame_inputs(camera, torch.zeros(8), None)
        except AvatarError as e:
            assert isinstance(e, InputError) and nearest > zfar and "beyond the far plane" in str(e)
            return
        assert nearest < zfar
        r._frame_inputs(camera, torch.zeros(8), None)  # once per cause
    warned = [str(w.message).split(" at ")[1].split()[0] for w in caught if issubclass(w.category, RangeWarning)]
    assert warned == [name for name, (lo, hi, v) in far.items() if not lo <= v <= hi]


@pytest.fixture(scope="module")
def neutral(demo):
    return demo.head_model.posed_mesh(None).vertices.double().numpy()
