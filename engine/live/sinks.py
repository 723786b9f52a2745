"""Live frame sinks beyond files (`engine.video.FrameWriter` writes mp4 / PNG frames): a virtual camera.

`VirtualCameraSink` sends frames to a virtual webcam through `pyvirtualcam` (the `live` extra), so video-call
programs can pick the avatar as their camera. On Linux it needs the `v4l2loopback` kernel module:

    sudo modprobe v4l2loopback devices=1 exclusive_caps=1 card_label="Avatar"

(on Windows/macOS: OBS's virtual camera). Without a device it raises `BackendError` saying so.
"""

from __future__ import annotations

import sys

import numpy as np

from ..errors import BackendError, InputError

_LINUX_FIX = ("load the v4l2loopback kernel module first: `sudo modprobe v4l2loopback devices=1 exclusive_caps=1` "
              "(package v4l2loopback-dkms)")
_OTHER_FIX = "install OBS Studio and start its virtual camera once"


def _fix() -> str:
    return _LINUX_FIX if sys.platform.startswith("linux") else _OTHER_FIX


class VirtualCameraSink:
    """`with VirtualCameraSink(width, height, fps) as cam: cam.write(rgb)`: frames [H, W, 3] uint8 to a virtual webcam.

    Args: `width`, `height` (pixels; every frame must have this size), `fps`, `device` (e.g. "/dev/video4" on
    Linux; default: the first loopback device).
    """

    def __init__(self, width: int, height: int, fps: float = 30.0, device: str | None = None):
        try:
            import pyvirtualcam
        except ImportError as e:  # pyvirtualcam's import itself can fail where its native backend cannot load
            raise BackendError(f"the virtual camera needs pyvirtualcam ({e}): pip install pyvirtualcam (the live "
                               f"extra); then {_fix()}") from e
        self.width, self.height = int(width), int(height)
        try:
            self._cam = pyvirtualcam.Camera(width=self.width, height=self.height, fps=float(fps), device=device,
                                            fmt=pyvirtualcam.PixelFormat.RGB)
        except (RuntimeError, ValueError, OSError) as e:
            where = f" {device}" if device else ""
            raise BackendError(f"no virtual camera device{where} could be opened ({e}); {_fix()}") from e
        self.device = self._cam.device

    def write(self, image: np.ndarray) -> None:
        """Send one frame [height, width, 3] uint8 (RGB); paces to the camera's frame rate."""
        if image.dtype != np.uint8 or image.shape != (self.height, self.width, 3):
            raise InputError(f"virtual camera frames must be uint8 [{self.height}, {self.width}, 3], got "
                             f"{image.dtype} {image.shape}")
        self._cam.send(np.ascontiguousarray(image))
        self._cam.sleep_until_next_frame()

    def close(self) -> None:
        if self._cam is not None:
            self._cam.close()
            self._cam = None

    def __enter__(self) -> "VirtualCameraSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
