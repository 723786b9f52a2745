"""The published avatars end to end, on fixtures in the release's layouts: the synthetic head's tracked frames
(tests/release_layout.py) -> `import-nersemble` -> `fit-head`; a tiny release run -> `import-release --head-model`;
`render --dataset` from the recorded (cropped) and novel views; a new code posed by the learned head and rendered."""

import numpy as np
import pytest
import torch

from engine.cli import main
from engine.data.views import novel_view, square_crop
from engine.geometry import Camera
from engine.model import Avatar
from engine.renderer import Renderer
from release_layout import release_state, write_release_run, write_sd_folder, write_synthetic_person


def test_novel_view_and_square_crop_intrinsics():
    cam = Camera(R=np.eye(3), t=[0, 0, 1.0], fx=1000.0, fy=990.0, cx=549.5, cy=801.5, width=1100, height=1604)
    view = novel_view(cam, 512)  # the release: fx, fy * 512 / 2200 at full resolution 2200 wide; cx = cy = 256
    assert (view.fx, view.fy, view.cx, view.cy) == pytest.approx((1000 * 512 / 1100, 990 * 512 / 1100, 256, 256))
    crop, (left, top, side) = square_crop(cam, torch.tensor([0.0, 0.0, 0.0]), 550)
    assert (left, top, side) == (0, 252, 1100)  # centred on the head's projection (549.5, 801.5) -> rows 252..1351
    assert crop.cy == pytest.approx((801.5 - 252 + 0.5) / 2 - 0.5) and crop.fx == pytest.approx(500.0)
    _, (_, top, _) = square_crop(cam, torch.tensor([0.0, 0.8, 0.0]), 550)  # far below (OpenCV y down): clamped
    assert top == 1604 - 1100


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    write_synthetic_person(root / "person", sequences=2, frames=4, cameras=2, size=160)
    assert main(["import-nersemble", str(root / "person"), "--out", str(root / "ds")]) == 0
    assert main(["fit-head", "--dataset", str(root / "ds"), "--out", str(root / "head.npz"), "--kind", "linear"]) == 0
    run = write_release_run(root / "run", release_state(seed=4, code_size=206, people=2, scale=0.02))
    assert main(["import-release", "--run", str(run), "--sd", str(write_sd_folder(root / "sd")), "--person", "0",
                 "--out", str(root / "avatar"), "--preset", "tiny", "--head-model", str(root / "head.npz")]) == 0
    return root


def test_render_a_tracked_sequence_from_recorded_and_novel_views(published, tmp_path):
    for name, view in (("recorded", ["--camera", "222200037"]), ("orbit", ["--orbit", "25"])):
        assert main(["render", "--avatar", str(published / "avatar"), "--dataset", str(published / "ds"),
                     "--sequence", "EXP-1-synthetic", "--steps", "1", "--out", str(tmp_path / name), *view]) == 0
        assert len(list((tmp_path / name).glob("*.png"))) == 4
    assert main(["render", "--avatar", str(published / "avatar"), "--dataset", str(published / "ds"),
                 "--sequence", "nope", "--out", str(tmp_path / "x")]) == 2


def test_a_new_code_poses_the_imported_avatar(published):
    avatar = Avatar.from_pretrained(published / "avatar")
    assert avatar.config.head_model == "learned:head.npz" and (published / "avatar" / "head.npz").is_file()
    codes = np.load(published / "ds" / "EXP-1-synthetic" / "codes.npy")
    new = torch.from_numpy(0.5 * (codes[1] + codes[3]))  # a code no tracked frame has
    a, b = avatar.head_model.posed_mesh(new), avatar.head_model.posed_mesh(torch.from_numpy(codes[1]))
    assert a.num_vertices == b.num_vertices and not torch.allclose(a.vertices, b.vertices)
    camera = Camera.look_at(eye=(0, 0, 1.0), target=(0, 0, 0), width=128, height=128, fov_deg=16)
    image = Renderer(avatar, steps=1).render(camera, new)
    assert image.shape == (128, 128, 3) and np.isfinite(image.astype(float)).all()


def test_eval_crops_recorded_images_to_the_avatars_square(published):
    from engine.evaluation import evaluate
    from test_training import tiny_config

    avatar = Avatar(tiny_config(16).replace(expression_dim=206, expression_names=None), seed=0)
    result = evaluate(avatar, data=published / "ds", frames=2, steps=1)
    assert result["frames"] == 2 and all(f["crop"][2] == 160 for f in result["per_frame"])  # 160x160 images: whole
    assert 0 < result["psnr"] < 60


def test_fit_driver_on_the_imported_data_then_drive_the_imported_avatar(published, tmp_path, capsys):
    import imageio.v2 as imageio

    avatar = str(published / "avatar")
    assert main(["fit-driver", "--avatar", avatar, "--data", str(published / "ds"), "--out",
                 str(tmp_path / "map.npz")]) == 0
    assert "tracked 16 of 16 images" in capsys.readouterr().out
    video = tmp_path / "webcam.mp4"  # the person's own recorded frames stand in for a webcam
    with imageio.get_writer(video, fps=12, codec="libx264", macro_block_size=1, ffmpeg_log_level="error") as w:
        for png in sorted((published / "ds" / "EXP-2-synthetic" / "222200038").glob("*.png")):
            w.append_data(np.asarray(imageio.imread(png))[..., :3])
    assert main(["drive", "--avatar", avatar, "--video", str(video), "--map", str(tmp_path / "map.npz"),
                 "--out", str(tmp_path / "frames"), "--frames", "3", "--fixed-camera", "--sampler", "ddim",
                 "--steps", "1"]) == 0
    assert "tracked 3 of 3 frames" in capsys.readouterr().out
    assert len(list((tmp_path / "frames").glob("*.png"))) == 3


def test_serve_renders_a_new_code_for_the_imported_avatar(published):
    import json

    pytest.importorskip("uvicorn", reason="the live extra is not installed (pip install -e '.[live]')")
    from websockets.sync.client import connect

    from engine.live.app import BackgroundServer
    from engine.live.protocol import unpack_binary
    from engine.live.worker import RenderWorker

    codes = np.load(published / "ds" / "EXP-1-synthetic" / "codes.npy")
    worker = RenderWorker(Avatar.from_pretrained(published / "avatar"), sampler="ddim", steps=1, max_steps=2)
    with BackgroundServer(worker) as server, connect(server.ws_url, max_size=None, open_timeout=30) as ws:
        assert json.loads(ws.recv(timeout=30))["expression_dim"] == 206
        ws.send(json.dumps({"type": "render", "id": 1, "code": (0.5 * (codes[0] + codes[2])).tolist()}))
        header, jpeg = unpack_binary(ws.recv(timeout=60))
        assert header["type"] == "frame" and jpeg[:2] == b"\xff\xd8"
