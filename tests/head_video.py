"""A driving video of the synthetic head for the `avatar drive` tests."""

from pathlib import Path

import numpy as np
import torch


def write_jaw_video(path: Path, jaws) -> Path:
    """The synthetic head from the front at 256 px (MediaPipe's face mesh finds it), jawOpen taking each value of
    `jaws` in turn, as an H.264 mp4 at 12 fps (lossy, as a recorded video is)."""
    import imageio.v2 as imageio

    from engine.config import ARKIT8
    from engine.data.synthetic import SyntheticHead, default_camera

    head, camera = SyntheticHead(), default_camera(256)
    with imageio.get_writer(path, fps=12, codec="libx264", macro_block_size=1, ffmpeg_log_level="error") as w:
        for jaw in jaws:
            code = torch.zeros(len(ARKIT8))
            code[ARKIT8.index("jawOpen")] = float(jaw)
            rgb, _ = head.render(camera, code, supersample=1)
            w.append_data((rgb.numpy() * 255).round().astype(np.uint8))
    return path
