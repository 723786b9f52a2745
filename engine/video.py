"""Frame sinks: an mp4 (H.264 through imageio-ffmpeg) or a folder of PNG frames, written whole or not at all; and
the frame layouts written to them (contact sheet, side by side)."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import InputError
from .files import FILE_MODE, atomic_path, temp_beside


class FrameWriter:
    """`with FrameWriter("out.mp4") as w: w.write(rgb)`; a path without `.mp4` is a folder of `00000.png` frames.

    The video goes to a temp file renamed into place on success; PNG frames go to a temp folder that replaces
    the target folder on success. On error nothing half-written is left behind.
    """

    def __init__(self, path: str | Path, fps: float = 24, alpha: bool = False):
        self.path = Path(path)
        self.fps, self.alpha, self.count = fps, alpha, 0
        self.video = self.path.suffix.lower() == ".mp4"
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps < math.inf:
            raise InputError(f"the frame rate must be a positive number, got {fps!r} (e.g. 24)")
        if self.video and alpha:
            raise InputError("mp4 has no alpha channel (write PNG frames, an --out folder, to keep alpha)")
        self._check_target()
        self._tmp = temp_beside(self.path, ".mp4" if self.video else "", folder=not self.video)
        if self.video:
            import imageio.v2 as imageio

            try:
                self._writer = imageio.get_writer(self._tmp, fps=fps, codec="libx264", quality=8, macro_block_size=1,
                                                  ffmpeg_log_level="error")
            except BaseException:
                self._tmp.unlink()
                raise

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
        try:
            if self.video:
                self._close_video(failing=exc_type is not None)
            if exc_type is None:
                self._commit()
        finally:
            if self._tmp.is_dir():
                shutil.rmtree(self._tmp, ignore_errors=True)
            else:
                self._tmp.unlink(missing_ok=True)

    def _close_video(self, failing: bool) -> None:
        """Finish the ffmpeg process; when the frames are being abandoned anyway, its errors (e.g. a broken pipe to an
        ffmpeg that died) must not replace the error or interrupt that abandons them."""
        try:
            self._writer.close()
        except Exception:
            if not failing:
                raise

    def _check_target(self) -> None:
        """A folder of earlier PNG frames may be replaced; anything else at the path is the user's and stays."""
        if not self.video and self.path.exists() and not (
                self.path.is_dir() and all(p.suffix == ".png" for p in self.path.iterdir())):
            raise InputError(f"{self.path} exists and is not a folder of PNG frames (choose a new --out path)")

    def _commit(self) -> None:
        if not self.video and self.path.exists():
            self._check_target()
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
