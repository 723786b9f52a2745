"""Frame sinks: an mp4 (H.264 through imageio-ffmpeg) or a folder of PNG frames, written whole or not at all; and
the frame layouts written to them (contact sheet, side by side)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import InputError
from .files import FILE_MODE, atomic_path


class FrameWriter:
    """`with FrameWriter("out.mp4") as w: w.write(rgb)`; a path without `.mp4` is a folder of `00000.png` frames.

    The video goes to a temp file renamed into place on success; PNG frames go to a temp folder that replaces
    the target folder on success. On error nothing half-written is left behind.
    """

    def __init__(self, path: str | Path, fps: int = 24, alpha: bool = False):
        self.path = Path(path)
        self.fps, self.alpha, self.count = fps, alpha, 0
        self.video = self.path.suffix.lower() == ".mp4"
        if self.video and alpha:
            raise InputError("mp4 has no alpha channel; write PNG frames (an --out folder) to keep alpha")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.video:
            import imageio.v2 as imageio

            fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.stem}.", suffix=".mp4")
            os.close(fd)
            self._writer = imageio.get_writer(self._tmp, fps=fps, codec="libx264", quality=8, macro_block_size=1,
                                              ffmpeg_log_level="error")
        else:
            self._tmp = tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.")

    def write(self, image: np.ndarray) -> None:
        """Append one frame [H, W, 3] (or [H, W, 4] with alpha) uint8."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
            raise InputError(f"frames must be uint8 [H, W, 3|4], got {image.dtype} {image.shape}")
        if self.video:
            self._writer.append_data(image[..., :3])
        else:
            Image.fromarray(image).save(Path(self._tmp) / f"{self.count:05d}.png")
        self.count += 1

    def __enter__(self) -> "FrameWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.video:
            self._writer.close()
        try:
            if exc_type is None:
                self._commit()
        finally:
            if Path(self._tmp).is_dir():
                shutil.rmtree(self._tmp, ignore_errors=True)
            else:
                Path(self._tmp).unlink(missing_ok=True)

    def _commit(self) -> None:
        if not self.video and self.path.exists():
            # a folder of earlier PNG frames may be replaced; anything else is the user's and stays
            if not (self.path.is_dir() and all(p.suffix == ".png" for p in self.path.iterdir())):
                raise InputError(f"--out {self.path} exists and is not a folder of PNG frames; choose a new path")
            shutil.rmtree(self.path)
        os.chmod(self._tmp, FILE_MODE | (0o111 if not self.video else 0))  # mkstemp/mkdtemp make them private
        os.replace(self._tmp, self.path)


def contact_sheet(frames: list[np.ndarray], columns: int = 8) -> np.ndarray:
    """Tile frames [H, W, C] uint8 row by row into one image (empty cells white)."""
    if not frames:
        raise InputError("a contact sheet needs at least one frame")
    h, w, c = frames[0].shape
    rows = -(-len(frames) // columns)
    sheet = np.full((rows * h, min(columns, len(frames)) * w, c), 255, np.uint8)
    for i, frame in enumerate(frames):
        r, k = divmod(i, columns)
        sheet[r * h:(r + 1) * h, k * w:(k + 1) * w] = frame
    return sheet


def side_by_side(source: np.ndarray, rendered: np.ndarray) -> np.ndarray:
    """[H, W', 3] uint8: the source resized to the rendered frame's height (aspect kept, even width) | rendered."""
    h = rendered.shape[0]
    w = max(2, round(source.shape[1] * h / source.shape[0] / 2) * 2)  # H.264 needs even sizes
    small = np.asarray(Image.fromarray(np.ascontiguousarray(source)).resize((w, h), Image.BILINEAR))
    return np.concatenate([small, rendered[..., :3]], axis=1)


def write_png(path: str | Path, image: np.ndarray) -> Path:
    """Write one uint8 image [H, W, 3|4] as a PNG, whole or not at all."""
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return Path(path)
