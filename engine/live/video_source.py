"""Live frame sources: a video file or a webcam as an iterator of RGB frames (what `Driver` consumes)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import BackendError, InputError


def read_video(path: str | Path) -> tuple[Iterator[np.ndarray], float, int | None]:
    """(frames [H, W, 3] uint8 RGB, fps, frame count or None) of a video file, through imageio's ffmpeg plugin."""
    import imageio.v2 as imageio

    path = Path(path)
    if not path.is_file():
        raise InputError(f"video {path} does not exist; pass an existing file to --video")
    try:
        reader = imageio.get_reader(path, format="FFMPEG")
        fps = float(reader.get_meta_data().get("fps") or 30.0)
        count = reader.count_frames()
    except (OSError, RuntimeError, ValueError) as e:
        raise InputError(f"cannot read video {path} ({e}); pass a video ffmpeg can decode (e.g. H.264 mp4)") from e

    def frames():
        with reader:
            for image in reader:
                yield np.asarray(image)[..., :3]

    return frames(), fps, count


def read_webcam(index: int) -> tuple[Iterator[np.ndarray], float]:
    """(endless frames [H, W, 3] uint8 RGB, fps) from webcam `index`, through OpenCV when present, else imageio."""
    if sys.platform.startswith("linux") and not Path(f"/dev/video{index}").exists():
        raise BackendError(f"no camera /dev/video{index}; plug in a webcam (or pick another with --webcam N), or "
                           "drive from a file with --video IN.mp4")
    try:
        import cv2
    except ImportError:
        cv2 = None
    if cv2 is not None:
        cap = cv2.VideoCapture(index)
        if not cap.isOpened():
            raise BackendError(f"camera {index} could not be opened; check that no other program uses it, or pick "
                               "another with --webcam N")
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 30.0)

        def frames():
            try:
                while True:
                    ok, bgr = cap.read()
                    if not ok:
                        return
                    yield bgr[..., ::-1].copy()
            finally:
                cap.release()

        return frames(), fps
    import imageio.v2 as imageio

    try:
        reader = imageio.get_reader(f"<video{index}>", format="FFMPEG")
    except (OSError, RuntimeError, ValueError, IndexError) as e:
        raise BackendError(f"camera {index} could not be opened ({e}); pick another with --webcam N") from e
    fps = float(reader.get_meta_data().get("fps") or 30.0)

    def frames():
        with reader:
            for image in reader:
                yield np.asarray(image)[..., :3]

    return frames(), fps
