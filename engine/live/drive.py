"""`avatar drive`: expression transfer from a video or a webcam to an avatar.

Each source frame (`engine.live.video_source`) is tracked and turned into the avatar's code and camera by a
`engine.live.driver.Driver` (the head pose orbits the base camera), rendered by `Renderer.stream` and written to an
mp4 / PNG folder (`engine.video.FrameWriter`) and/or a virtual camera (`engine.live.sinks`). Frames without a face
keep the last code and camera and are counted.
"""

from __future__ import annotations

import argparse
import contextlib
from collections import deque
from pathlib import Path

import numpy as np

from ..command_options import AVATAR_HELP, add_render_options, render_backend
from ..errors import InputError
from ..orbit import DEFAULT_FOV_DEG


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`avatar drive`'s arguments."""
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
    p.add_argument("--fov", type=float, default=DEFAULT_FOV_DEG,
                   help=f"horizontal field of view in degrees (default: {DEFAULT_FOV_DEG:g})")
    add_render_options(p)


def run(args) -> None:
    """`avatar drive`: track -> map -> render -> write; prints how many frames were tracked."""
    from tqdm import tqdm

    from ..avatars import load_avatar
    from ..orbit import orbit_camera
    from ..renderer import Renderer
    from ..video import FrameWriter, side_by_side
    from .driver import Driver
    from .expression_map import ExpressionMap
    from .sinks import VirtualCameraSink
    from .tracking import Tracker
    from .video_source import read_video, read_webcam

    if args.out is None and args.virtual_camera is None:
        raise InputError("give --out OUT.mp4 (or a PNG folder) and/or --virtual-camera; nothing would be written")
    if args.frames is not None and args.frames < 1:
        raise InputError(f"--frames must be >= 1, got {args.frames}")
    backend = render_backend(args)
    if args.video is not None:  # the source first: a missing file or camera fails before a model loads
        source, fps, total = read_video(args.video)
    else:
        source, fps = read_webcam(args.webcam)
        total = None
    avatar = load_avatar(args.avatar, device=args.device)
    expression_map = ExpressionMap.for_avatar(avatar.config, args.map)
    total = args.frames if total is None else min(total, args.frames or total)
    fps = args.fps or fps
    renderer = Renderer(avatar, device=args.device, sampler=args.sampler, steps=args.steps, decoder=args.decoder,
                        seed=args.seed, dtype=args.dtype, raster_backend=args.raster, **backend)
    camera = orbit_camera(size=avatar.config.image_size, distance=args.distance, fov_deg=args.fov)
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
                for image in renderer.stream(frames(), depth=1):  # one frame in flight: the lowest latency
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
