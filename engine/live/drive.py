"""`avatar drive`: expression transfer from a video or a webcam to an avatar.

Each source frame is tracked (`engine.live.tracking.Tracker`), mapped to the avatar's code (`ExpressionMap`) and
camera (`camera_from_pose`: the head pose orbits the base camera), rendered by `Renderer.stream` and written to an
mp4 / PNG folder (`engine.video.FrameWriter`) and/or a virtual camera (`engine.live.sinks`). Frames without a face
keep the last code and camera and are counted. `Driver` is the reusable part for any live source: it turns a
frame into a `Frame` (camera + code), which is all a renderer needs.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import BackendError, InputError
from ..geometry import Camera
from ..renderer import Frame
from .expression_map import ExpressionMap, camera_from_pose
from .tracking import Tracker


def base_camera(size: int, distance: float = 1.0, fov_deg: float = 16.0) -> Camera:
    """The neutral-pose camera: on the +z axis at `distance` metres, looking at the head centre (the origin),
    `size` x `size` pixels with a horizontal field of view of `fov_deg` (the `avatar orbit` default)."""
    fx = 0.5 * size / math.tan(math.radians(fov_deg) / 2)
    return Camera.look_at(eye=(0.0, 0.0, distance), target=(0.0, 0.0, 0.0), fx=fx, width=size, height=size)


class Driver:
    """Source frames -> avatar `Frame`s: track, map the expression, turn the camera with the head pose.

    Args:
        expression_map: tracker output -> code (`ExpressionMap`).
        camera: the camera of the neutral pose (`base_camera(...)`).
        tracker: a `Tracker` (default: a video-mode one with smoothing); closed by `close()`.
        follow_pose: turn the camera with the head (False: a fixed camera, expression only).
        centre: the head centre the camera orbits (world metres).
    Counters: `frames` seen, `tracked` with a face.
    """

    def __init__(self, expression_map: ExpressionMap, camera: Camera, tracker: Tracker | None = None,
                 follow_pose: bool = True, centre=(0.0, 0.0, 0.0)):
        self.map, self.camera, self.follow_pose, self.centre = expression_map, camera, follow_pose, centre
        self.tracker = tracker if tracker is not None else Tracker()
        self.frames = self.tracked = 0
        self._last = Frame(camera, torch.from_numpy(expression_map.neutral_code()))

    def __call__(self, rgb: np.ndarray, timestamp: float | None = None) -> Frame:
        """One RGB source frame [H, W, 3] uint8 -> the avatar's Frame (the last one again when no face is found)."""
        self.frames += 1
        result = self.tracker.track(rgb, timestamp)
        if result is not None:
            self.tracked += 1
            camera = camera_from_pose(result.pose, self.camera, self.centre) if self.follow_pose else self.camera
            self._last = Frame(camera, torch.from_numpy(self.map(result)))
        return self._last

    def close(self) -> None:
        self.tracker.close()


def side_by_side(source: np.ndarray, rendered: np.ndarray) -> np.ndarray:
    """[H, W', 3] uint8: the source resized to the rendered frame's height (aspect kept, even width) | rendered."""
    h = rendered.shape[0]
    w = max(2, int(round(source.shape[1] * h / source.shape[0] / 2)) * 2)  # H.264 needs even sizes
    small = np.asarray(Image.fromarray(np.ascontiguousarray(source)).resize((w, h), Image.BILINEAR))
    return np.concatenate([small, rendered[..., :3]], axis=1)


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


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`avatar drive`'s arguments."""
    from ..cli import AVATAR_HELP, add_render_options

    p.add_argument("--avatar", required=True, help=AVATAR_HELP)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--video", help="source video file (anything ffmpeg reads)")
    src.add_argument("--webcam", type=int, metavar="N", help="webcam index (Linux: /dev/videoN); stop with Ctrl-C")
    p.add_argument("--out", help="OUT.mp4 for a video, anything else is a folder of PNG frames")
    p.add_argument("--virtual-camera", nargs="?", const="", default=None, metavar="DEVICE",
                   help="also send frames to a virtual webcam (pyvirtualcam; Linux: v4l2loopback, optional device "
                        "such as /dev/video4)")
    p.add_argument("--side-by-side", action="store_true", help="write source | avatar")
    p.add_argument("--map", default=None, help="expression map from `avatar fit-driver` (default: by ARKit names, "
                   "for avatars whose code is ARKit-named)")
    p.add_argument("--frames", type=int, default=None, help="stop after this many source frames")
    p.add_argument("--fps", type=float, default=None, help="output frame rate (default: the source's)")
    p.add_argument("--mirror", action="store_true",
                   help="flip the source left-right before tracking (for mirrored selfie recordings)")
    p.add_argument("--fixed-camera", action="store_true", help="ignore the head pose: expression only")
    p.add_argument("--no-smooth", action="store_true", help="no One Euro smoothing of the tracked values")
    p.add_argument("--distance", type=float, default=1.0, help="camera distance in metres (default: 1.0)")
    p.add_argument("--fov", type=float, default=16.0, help="horizontal field of view in degrees (default: 16)")
    add_render_options(p)


def run(args) -> None:
    """`avatar drive`: track -> map -> render -> write; prints how many frames were tracked."""
    from tqdm import tqdm

    from ..avatars import load_avatar
    from ..renderer import Renderer
    from ..video import FrameWriter
    from .sinks import VirtualCameraSink

    if args.out is None and args.virtual_camera is None:
        raise InputError("give --out OUT.mp4 (or a PNG folder) and/or --virtual-camera; nothing would be written")
    if args.frames is not None and args.frames < 1:
        raise InputError(f"--frames must be >= 1, got {args.frames}")
    if args.video is not None:  # the source first: a missing file or camera fails before a model loads
        source, fps, total = read_video(args.video)
    else:
        source, fps = read_webcam(args.webcam)
        total = None
    avatar = load_avatar(args.avatar, device=args.device)
    expression_map = ExpressionMap.for_avatar(avatar.config, args.map)
    total = args.frames if total is None else min(total, args.frames or total)
    fps = args.fps or fps
    renderer = Renderer(avatar, device=args.device, sampler=args.sampler, steps=args.steps, seed=args.seed,
                        dtype=args.dtype, raster_backend=args.raster, backend=args.backend)
    camera = base_camera(avatar.config.image_size, args.distance, args.fov)
    driver = Driver(expression_map, camera, Tracker(smooth=not args.no_smooth, fps=fps),
                    follow_pose=not args.fixed_camera)
    pending: deque[np.ndarray] = deque()  # source frames whose renders are still in flight

    def frames():
        for i, rgb in enumerate(source):
            if args.frames is not None and i >= args.frames:
                return
            rgb = np.ascontiguousarray(rgb[:, ::-1]) if args.mirror else rgb
            frame = driver(rgb, timestamp=i / fps)
            pending.append(rgb)
            yield frame

    with contextlib.ExitStack() as stack:  # on an error the writer discards its partial output
        stack.callback(driver.close)
        writer = stack.enter_context(FrameWriter(args.out, fps=max(1, round(fps)))) if args.out else None
        vcam = None
        with tqdm(total=total, desc="drive", unit="frame") as bar:
            try:
                for image in renderer.stream(frames()):
                    out = side_by_side(pending.popleft(), image) if args.side_by_side else image
                    if writer is not None:
                        writer.write(out)
                    if args.virtual_camera is not None:
                        if vcam is None:
                            vcam = stack.enter_context(VirtualCameraSink(out.shape[1], out.shape[0], fps,
                                                                         args.virtual_camera or None))
                            print(f"sending frames to virtual camera {vcam.device}")
                        vcam.write(out)
                    bar.update()
            except KeyboardInterrupt:  # the way to end a webcam session: keep what was written
                pass
    print(f"tracked {driver.tracked} of {driver.frames} frames"
          + (f" ({driver.frames - driver.tracked} without a face kept the last expression)"
             if driver.tracked < driver.frames else ""))
    if args.out:
        print(f"wrote {writer.count} frames to {Path(args.out).resolve()}")
