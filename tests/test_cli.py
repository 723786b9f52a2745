import json
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest

from engine.cli import main
from engine.sequence import orbit, read_sequence, write_sequence

ROOT = Path(__file__).resolve().parents[1]


def _pngs(folder):
    return sorted(Path(folder).glob("*.png"))


def test_orbit_render_twice_byte_identical_and_frames_differ(tmp_path):
    seq = tmp_path / "seq.json"
    assert main(["orbit", "--avatar", "tiny", "--frames", "4", "--out", str(seq)]) == 0
    assert len(read_sequence(seq)) == 4
    for name in ("a", "b"):
        assert main(["render", "--avatar", "tiny", "--sequence", str(seq), "--steps", "4",
                     "--out", str(tmp_path / name)]) == 0
    a, b = _pngs(tmp_path / "a"), _pngs(tmp_path / "b")
    assert len(a) == len(b) == 4
    for fa, fb in zip(a, b):
        assert fa.read_bytes() == fb.read_bytes()
    images = [np.asarray(imageio.imread(f)) for f in a]
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(images[i].astype(int) - images[j].astype(int)).mean() > 0.5


def test_render_mp4_and_alpha(tmp_path):
    seq = tmp_path / "seq.json"
    main(["orbit", "--avatar", "tiny", "--frames", "3", "--out", str(seq)])
    out = tmp_path / "video.mp4"
    assert main(["render", "--avatar", "tiny", "--sequence", str(seq), "--sampler", "ddim", "--steps", "1",
                 "--out", str(out)]) == 0
    reader = imageio.get_reader(out)
    assert sum(1 for _ in reader) == 3
    assert not list(tmp_path.glob(".video*"))  # no temp file left behind
    assert main(["render", "--avatar", "tiny", "--sequence", str(seq), "--sampler", "ddim", "--steps", "1",
                 "--alpha", "--out", str(tmp_path / "rgba")]) == 0
    frame = np.asarray(imageio.imread(_pngs(tmp_path / "rgba")[0]))
    assert frame.shape == (128, 128, 4) and set(np.unique(frame[..., 3])) == {0, 255}


def test_bad_arguments_get_clear_errors(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["render", "--avatar", "tiny", "--sequence", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["orbit", "--avatar", "nobody", "--out", str(tmp_path / "s.json")]) == 2
    assert "preset" in capsys.readouterr().err
    seq = tmp_path / "seq.json"
    main(["orbit", "--avatar", "tiny", "--frames", "1", "--out", str(seq)])
    assert main(["render", "--avatar", "tiny", "--sequence", str(seq), "--steps", "60", "--out",
                 str(tmp_path / "o")]) == 2
    assert "50" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # an existing folder that is not ours is never replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["render", "--avatar", "tiny", "--sequence", str(seq), "--steps", "1", "--sampler", "ddim",
                 "--out", str(tmp_path / "mine")]) == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(SystemExit):
        main(["render", "--help"])


def test_info_sd21_json_on_meta():
    out = subprocess.run([sys.executable, "-m", "engine.cli", "info", "--avatar", "sd21", "--json"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    info = json.loads(out)
    assert info["condition_channels"] == 73
    assert info["expression_tokens"] == [4, 1024]
    assert len(info["expression_attention"]) == 15
    assert sum(p.startswith("down_blocks") for p in info["expression_attention"]) == 6
    counts = info["parameters"]
    assert abs(counts["unet"] / 1e6 - 865.9) < 1
    assert abs(counts["controlnet"] / 1e6 - 364.2) < 1
    assert abs(counts["vae_decoder"] / 1e6 - 49.5) < 0.5


def test_sequence_round_trip_with_mesh(tmp_path, tiny_avatar):
    frames = orbit(tiny_avatar.config, frames=3)
    head = tiny_avatar.head_model.posed_mesh(frames[0].expression)
    for f in frames:
        f.mesh = head
    path = write_sequence(tmp_path / "s.json", frames, expression_names=tiny_avatar.config.expression_names)
    back = read_sequence(path)
    assert len(list((tmp_path / "s.meshes").glob("*.npz"))) == 1  # shared mesh written once
    for f, g in zip(frames, back):
        np.testing.assert_allclose(f.camera.R.numpy(), g.camera.R.numpy())
        np.testing.assert_array_equal(f.expression.numpy(), g.expression.numpy())
        np.testing.assert_array_equal(g.mesh.faces.numpy(), head.faces.numpy())


def test_orbit_sweeps_every_named_dimension(tiny_avatar):
    codes = np.stack([f.expression.numpy() for f in orbit(tiny_avatar.config, frames=96)])
    assert codes.shape == (96, 8)
    assert (codes.max(axis=0) > 0.95).all() and codes.min() >= 0


def test_shipped_demo_avatar_by_name(tmp_path):
    seq = tmp_path / "seq.json"
    assert main(["orbit", "--avatar", "demo", "--frames", "2", "--out", str(seq)]) == 0
    assert main(["render", "--avatar", "demo", "--sequence", str(seq), "--sampler", "ddim", "--steps", "2",
                 "--out", str(tmp_path / "frames"), "--sheet", str(tmp_path / "sheet.png")]) == 0
    assert len(_pngs(tmp_path / "frames")) == 2 and (tmp_path / "sheet.png").is_file()
