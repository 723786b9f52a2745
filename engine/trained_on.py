"""`TrainedOn`: what an avatar was trained on (views and codes), recorded in its config (`AvatarConfig.trained_on`).

The live viewer clamps its orbit to it, the renderer warns outside it, `avatar eval` places held-out cameras in
its rig. A plain frozen dataclass, JSON round-trippable through `AvatarConfig`; it knows nothing of torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError, InputError
from .schema import is_finite_number

CAMERA_KEYS = ("R", "t", "fx", "fy", "cx", "cy", "width", "height")  # `engine.geometry.Camera.to_dict()`
# Slack of `TrainedOn.contains_*`: a camera or code rebuilt from float32 values lands a few ulps off a bound.
ANGLE_SLACK_DEG, DISTANCE_SLACK, CODE_SLACK = 1e-3, 1e-5, 1e-6


@dataclass(frozen=True)
class TrainedOn:
    """What an avatar was trained on, recorded from its dataset by training (`engine.training.train`).

    Angles are `engine.orbit`'s, in degrees about the world origin (the head centre): azimuth = yaw (0 in front of
    the face, +z; > 0 toward +x, the subject's left), elevation = pitch (> 0 up). Ranges are closed (low, high).

    azimuth_deg, elevation_deg, distance: the ranges of the training cameras' positions (the cameras of the
        dataset's train split; distance in metres). A rig all around the head spans (-180, 180) in azimuth.
    code_min, code_max: per code dimension, the lowest and the highest value of the training frames' codes.
    rig: every camera of the dataset as `Camera.to_dict()` (its eval cameras too), in the dataset's order: where
        `avatar eval` places a synthetic avatar's held-out cameras (between these).
    """

    azimuth_deg: tuple[float, float]
    elevation_deg: tuple[float, float]
    distance: tuple[float, float]
    code_min: tuple[float, ...]
    code_max: tuple[float, ...]
    rig: tuple[dict, ...]

    def __post_init__(self):
        for name in ("azimuth_deg", "elevation_deg", "distance", "code_min", "code_max"):
            values = getattr(self, name)
            if not isinstance(values, (list, tuple)) or not all(is_finite_number(v) for v in values):
                raise ConfigError(f"trained_on.{name} must be a list of finite numbers, got {values!r}")
            object.__setattr__(self, name, tuple(float(v) for v in values))
        for name in ("azimuth_deg", "elevation_deg", "distance"):
            values = getattr(self, name)
            if len(values) != 2 or values[0] > values[1]:
                raise ConfigError(f"trained_on.{name} must be a [low, high] pair with low <= high, got {list(values)}")
        if self.distance[0] <= 0:
            raise ConfigError(f"trained_on.distance must be > 0 metres, got {list(self.distance)}")
        if not self.code_min or len(self.code_min) != len(self.code_max):
            raise ConfigError(f"trained_on.code_min and code_max need one value per code dimension each, got "
                              f"{len(self.code_min)} and {len(self.code_max)}")
        if any(lo > hi for lo, hi in zip(self.code_min, self.code_max)):
            raise ConfigError("trained_on.code_min must not exceed code_max in any dimension")
        if not isinstance(self.rig, (list, tuple)) or not self.rig or not all(
                isinstance(c, dict) and sorted(c) == sorted(CAMERA_KEYS) for c in self.rig):
            raise ConfigError(f"trained_on.rig must be a non-empty list of camera objects with the keys {CAMERA_KEYS}")
        object.__setattr__(self, "rig", tuple(self.rig))

    def contains_camera(self, camera, angle_margin_deg: float = 0.0, distance_margin: float = 0.0) -> bool:
        """Whether an `engine.geometry.Camera`'s position lies inside the trained azimuth, elevation and distance
        ranges, each widened by a margin: `angle_margin_deg` degrees on both sides of the angle ranges and
        `distance_margin` (a fraction: 0.05 = 5 %) of the distance range's ends (where it looks is not checked)."""
        return not self.camera_outside(camera, angle_margin_deg, distance_margin)

    def camera_outside(self, camera, angle_margin_deg: float = 0.0,
                       distance_margin: float = 0.0) -> dict[str, tuple[float, tuple[float, float]]]:
        """The coordinates of `camera`'s position outside the trained ranges widened by the margins (see
        `contains_camera`): {"azimuth_deg" | "elevation_deg" | "distance": (its value, the recorded (low, high))}."""
        from .orbit import orbit_angles

        (a0, a1), (e0, e1), (d0, d1) = self.azimuth_deg, self.elevation_deg, self.distance
        widened = {"azimuth_deg": (a0 - angle_margin_deg, a1 + angle_margin_deg),
                   "elevation_deg": (e0 - angle_margin_deg, e1 + angle_margin_deg),
                   "distance": (d0 * (1 - distance_margin), d1 * (1 + distance_margin))}
        slack = {"azimuth_deg": ANGLE_SLACK_DEG, "elevation_deg": ANGLE_SLACK_DEG, "distance": DISTANCE_SLACK}
        values = dict(zip(widened, orbit_angles(camera)))
        return {k: (v, getattr(self, k)) for k, v in values.items() if not _inside(v, widened[k], slack[k])}

    def contains_code(self, code) -> bool:
        """Whether every value of `code` (E numbers) lies inside its dimension's trained range."""
        values = [float(v) for v in code]
        if len(values) != len(self.code_min):
            raise InputError(f"the code has {len(values)} values, the avatar was trained on {len(self.code_min)}")
        return all(_inside(v, r, CODE_SLACK) for v, r in zip(values, zip(self.code_min, self.code_max)))


def _inside(value: float, bounds: tuple[float, float], slack: float) -> bool:
    return bounds[0] - slack <= value <= bounds[1] + slack
