"""`engine.orbit`: the one orbit camera (angles in degrees, everything after them by keyword) and its inverse."""

import math

import pytest
import torch

from engine.errors import InputError
from engine.geometry import Camera
from engine.orbit import DEFAULT_FOV_DEG, orbit_angles, orbit_camera


def test_angles_place_the_camera_on_the_sphere():
    # hand-derived centres: yaw 90 puts the camera on +x (the subject's left), pitch 30 lifts it by sin 30 = 0.5
    cases = [((0.0, 0.0, 1.0), (0.0, 0.0, 1.0)), ((90.0, 0.0, 2.0), (2.0, 0.0, 0.0)),
             ((0.0, 30.0, 1.0), (0.0, 0.5, math.sqrt(3) / 2)), ((-90.0, 0.0, 0.5), (-0.5, 0.0, 0.0)),
             ((180.0, -30.0, 1.0), (0.0, -0.5, -math.sqrt(3) / 2))]
    for (yaw, pitch, distance), centre in cases:
        cam = orbit_camera(yaw, pitch, size=16, distance=distance)
        torch.testing.assert_close(cam.center, torch.tensor(centre), atol=1e-6, rtol=0)
        # it looks at the origin: the head centre lands on the principal point
        torch.testing.assert_close(cam.project(torch.zeros(1, 3))[0], torch.tensor([cam.cx, cam.cy]), atol=1e-4,
                                   rtol=0)


def test_size_and_field_of_view():
    cam = orbit_camera(size=64, fov_deg=90.0)
    assert (cam.width, cam.height) == (64, 64)
    assert cam.fx == pytest.approx(32.0) and cam.fy == pytest.approx(32.0)  # tan(45 deg) = 1: fx = size / 2
    assert (cam.cx, cam.cy) == (31.5, 31.5)
    default = orbit_camera(size=100)
    assert default.fx == pytest.approx(50.0 / math.tan(math.radians(DEFAULT_FOV_DEG / 2)))
    assert isinstance(default, Camera)


def test_only_the_angles_are_positional():
    with pytest.raises(TypeError):
        orbit_camera(10.0, 5.0, 40)  # the old synthetic order (yaw, pitch, size): size must be named
    with pytest.raises(TypeError):
        orbit_camera(10.0, 5.0)  # no size: every caller says how large its image is


@pytest.mark.parametrize("kwargs, message", [
    ({"pitch_deg": 90.0}, "pitch_deg"), ({"pitch_deg": -95.0}, "pitch_deg"), ({"distance": 0.0}, "distance"),
    ({"distance": -1.0}, "distance"), ({"yaw_deg": math.nan}, "yaw_deg"), ({"distance": math.inf}, "distance"),
    ({"yaw_deg": True}, "yaw_deg"), ({"fov_deg": "16"}, "fov_deg"), ({"fov_deg": 180.0}, "fov_deg"),
])
def test_bad_arguments_name_the_problem(kwargs, message):
    with pytest.raises(InputError, match=message):
        orbit_camera(size=16, **kwargs)


def test_orbit_angles_invert_orbit_camera():
    for yaw, pitch, distance in ((0.0, 0.0, 1.0), (-120.0, 45.0, 1.5), (37.0, -12.0, 0.8), (179.0, 5.0, 1.0)):
        got = orbit_angles(orbit_camera(yaw, pitch, size=8, distance=distance))
        assert got == pytest.approx((yaw, pitch, distance), abs=1e-4)
    with pytest.raises(InputError, match="origin"):
        orbit_angles(Camera(torch.eye(3), torch.zeros(3), 10.0, 10.0, 3.5, 3.5, 8, 8))
