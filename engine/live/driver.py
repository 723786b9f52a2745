"""`Driver`: source frames -> avatar `Frame`s (track, map the expression, turn the camera with the head pose).

The reusable part of expression transfer for any live source (`avatar drive`'s video or webcam, the viewer's
webcam stream): it turns an RGB frame into a `Frame` (camera + code), which is all a renderer needs.
"""

from __future__ import annotations

import numpy as np
import torch

from ..frame import Frame
from ..geometry import Camera
from .expression_map import ExpressionMap, camera_from_pose
from .tracking import Tracker


class Driver:
    """Source frames -> avatar `Frame`s: track, map the expression, turn the camera with the head pose.

    Args:
        expression_map: tracker output -> code (`ExpressionMap`).
        camera: the camera of the neutral pose (e.g. `engine.orbit.orbit_camera(size=...)`, frontal).
        tracker: a `Tracker` (default: a video-mode one with smoothing); closed by `close()`.
        follow_pose: turn the camera with the head (False: a fixed camera, expression only).
        centre: the head centre the camera orbits (world metres).
    Counters: `frames` seen, `tracked` with a face; `pose` the last tracked `HeadPose` (None before a face).
    """

    def __init__(self, expression_map: ExpressionMap, camera: Camera, tracker: Tracker | None = None,
                 follow_pose: bool = True, centre=(0.0, 0.0, 0.0)):
        self.map, self.camera, self.follow_pose, self.centre = expression_map, camera, follow_pose, centre
        self.tracker = tracker if tracker is not None else Tracker()
        self.frames = self.tracked = 0
        self.pose = None
        self._last = Frame(camera, torch.from_numpy(expression_map.neutral_code()))

    def __call__(self, rgb: np.ndarray, timestamp: float | None = None) -> Frame:
        """One RGB source frame [H, W, 3] uint8 -> the avatar's Frame (the last one again when no face is found)."""
        self.frames += 1
        result = self.tracker.track(rgb, timestamp)
        if result is not None:
            self.tracked += 1
            self.pose = result.pose
            camera = camera_from_pose(result.pose, self.camera, self.centre) if self.follow_pose else self.camera
            self._last = Frame(camera, torch.from_numpy(self.map(result)))
        return self._last

    def close(self) -> None:
        self.tracker.close()
