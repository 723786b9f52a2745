"""Orbit cameras: the one way this engine places a camera on a sphere around the head, and its inverse.

Angles are degrees about the world origin (the head centre): yaw (azimuth) 0 is in front of the face (+z) and
yaw > 0 moves the camera toward +x (the subject's left), pitch (elevation) > 0 moves it up (+y). The camera looks
at the origin with world +y up in the image, so pitch stays strictly inside (-90, 90).
"""

from __future__ import annotations

import math

from .errors import InputError
from .geometry import Camera

DEFAULT_FOV_DEG = 16.0  # the horizontal field of view that frames the whole head and neck from 1 m


def orbit_camera(yaw_deg: float = 0.0, pitch_deg: float = 0.0, *, size: int, distance: float = 1.0,
                 fov_deg: float = DEFAULT_FOV_DEG) -> Camera:
    """A square `size` x `size` camera `distance` metres from the origin at (`yaw_deg`, `pitch_deg`), looking at
    the origin, with a horizontal field of view of `fov_deg` (see the module docstring for the angles).

    Only the angles are positional: the rest are keywords, so no caller can swap a size and a distance.
    """
    for name, value in (("yaw_deg", yaw_deg), ("pitch_deg", pitch_deg), ("distance", distance), ("fov_deg", fov_deg)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"orbit_camera: {name} must be a finite number, got {value!r}")
    if not -90.0 < pitch_deg < 90.0:
        raise InputError(f"orbit_camera: pitch_deg must be inside (-90, 90) (the camera keeps +y up), got {pitch_deg}")
    if distance <= 0:
        raise InputError(f"orbit_camera: distance must be > 0 metres, got {distance}")
    yaw, pitch = math.radians(yaw_deg), math.radians(pitch_deg)
    eye = (distance * math.cos(pitch) * math.sin(yaw), distance * math.sin(pitch),
           distance * math.cos(pitch) * math.cos(yaw))
    return Camera.look_at(eye, (0.0, 0.0, 0.0), width=size, height=size, fov_deg=fov_deg)


def orbit_angles(camera: Camera) -> tuple[float, float, float]:
    """(yaw_deg, pitch_deg, distance) of `camera`'s centre, the inverse of `orbit_camera` (where the camera
    looks does not enter). A camera at the origin has no angles: InputError."""
    x, y, z = (float(v) for v in camera.center.double())
    distance = math.sqrt(x * x + y * y + z * z)
    if distance == 0.0:
        raise InputError("orbit_angles: the camera sits at the origin (the head centre) and has no orbit angles")
    return math.degrees(math.atan2(x, z)), math.degrees(math.asin(max(-1.0, min(1.0, y / distance)))), distance
