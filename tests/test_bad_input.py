"""Every bad input of the command line gets `avatar <command>: error: <what> (<how to fix>)`, exit code 2, no
traceback, and leaves nothing behind; found before any frame is rendered. Signals end a render cleanly."""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import engine.evaluation.cli
import engine.renderer
from engine.cli import main
from engine.command_options import device
from engine.errors import BackendError, CheckpointError, InputError
from engine.geometry import Camera
from engine.model import Avatar
from engine.sequence import orbit, write_sequence
from engine.video import FrameWriter

ROOT = Path(__file__).resolve().parents[1]


def _run(argv, capsys) -> tuple[int, str]:
    """`avatar ...` in this process -> (exit code, stderr); argparse's refusals arrive as SystemExit."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def _error(argv, capsys, command="render") -> str:
    """The one error line of a refused command (exit 2)."""
    code, err = _run(argv, capsys)
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"avatar {command}: error: "), err
    return line


def _writable(folder: Path) -> bool:
    try:
        fd, name = tempfile.mkstemp(dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True


@pytest.fixture
def locked(tmp_path_factory):
    """A folder nothing can be written to: a read-only one, or (as root, whom permissions do not stop) /sys."""
    own = tmp_path_factory.mktemp("locked")
    own.chmod(0o555)
    folder = own
    if _writable(own):
        folder = Path("/sys")
        if not folder.is_dir() or _writable(folder):
            pytest.skip("no unwritable folder on this machine")
    yield folder
    own.chmod(0o755)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with a 3-frame sequence for the tiny avatar and a saved tiny avatar."""
    root = tmp_path_factory.mktemp("bad-input")
    write_sequence(root / "seq.json", orbit(Avatar.from_preset("tiny").config, frames=3))
    Avatar.from_preset("tiny").save_pretrained(root / "avatar")
    return root


def _render(work, *more) -> list[str]:
    return ["render", "--avatar", "tiny", "--sequence", str(work / "seq.json"), "--steps", "1", "--sampler", "ddim",
            *more]


@pytest.fixture
def no_rendering(monkeypatch):
    """Any bad input must be refused before the first frame: rendering one fails the test."""
    def refuse(*args, **kwargs):
        pytest.fail("a frame was rendered before the bad input was found")

    monkeypatch.setattr(engine.renderer.Renderer, "stream", refuse)


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# -- outputs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["o.mp4", "frames", "sub/o.mp4"])
def test_an_unwritable_out(work, locked, capsys, no_rendering, name):
    line = _error(_render(work, "--out", str(locked / name)), capsys)
    assert re.search(rf"cannot write {re.escape(str(locked / name))}: {re.escape(str(locked))} is not writable", line)
    assert "(choose a writable folder)" in line


def test_an_out_below_a_file(work, tmp_path, capsys, no_rendering):
    (tmp_path / "afile").write_text("mine")
    line = _error(_render(work, "--out", str(tmp_path / "afile" / "o.mp4")), capsys)
    assert f"{tmp_path / 'afile'} is a file, not a folder" in line
    assert _listing(tmp_path) == ["afile"] and (tmp_path / "afile").read_text() == "mine"


def test_an_unwritable_sheet_is_found_before_the_video_is_written(work, tmp_path, locked, capsys, no_rendering):
    line = _error(_render(work, "--out", str(tmp_path / "o.mp4"), "--sheet", str(locked / "s.png")), capsys)
    assert f"cannot write the contact sheet {locked / 's.png'}" in line
    assert _listing(tmp_path) == []  # no video, no temporary


def test_a_sheet_that_fails_late_leaves_no_video(work, tmp_path, capsys, monkeypatch):
    def broken(path, image):
        raise InputError("the disk is full")

    monkeypatch.setattr("engine.video.write_png", broken)
    _error(_render(work, "--out", str(tmp_path / "o.mp4"), "--sheet", str(tmp_path / "s.png")), capsys)
    assert _listing(tmp_path) == []


def test_an_unwritable_orbit_out(locked, tmp_path, capsys):
    line = _error(["orbit", "--avatar", "tiny", "--out", str(locked / "seq.json")], capsys, "orbit")
    assert f"cannot write the sequence {locked / 'seq.json'}: {locked} is not writable" in line
    (tmp_path / "afile").write_text("")
    line = _error(["orbit", "--avatar", "tiny", "--out", str(tmp_path / "afile" / "s.json")], capsys, "orbit")
    assert "is a file, not a folder" in line


def test_an_unwritable_eval_out_is_found_before_evaluating(locked, capsys, monkeypatch):
    monkeypatch.setattr(engine.evaluation.cli, "evaluate", lambda *a, **k: pytest.fail("evaluated first"))
    line = _error(["eval", "--avatar", "tiny", "--out", str(locked / "eval")], capsys, "eval")
    assert f"cannot write the evaluation folder {locked / 'eval'}: {locked} is not writable" in line


def test_an_out_folder_that_is_not_ours_is_refused_before_rendering(work, tmp_path, capsys, no_rendering):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    line = _error(_render(work, "--out", str(tmp_path / "mine")), capsys)
    assert "exists and is not a folder of PNG frames (choose a new --out path)" in line
    assert _listing(tmp_path) == ["mine", "mine/notes.txt"]


# -- options ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fps", ["0", "-5", "2.5", "many"])
def test_a_frame_rate_that_is_not_positive(work, tmp_path, capsys, fps):
    line = _error(_render(work, "--out", str(tmp_path / "o.mp4"), "--fps", fps), capsys)
    assert line.endswith(f"argument --fps: must be a positive integer, got '{fps}' (pass 1 or more)")
    assert _listing(tmp_path) == []
    with pytest.raises(InputError, match="frame rate must be a positive number"):
        FrameWriter(tmp_path / "o.mp4", fps=0)


def test_an_orbit_of_no_frames(tmp_path, capsys):
    line = _error(["orbit", "--avatar", "tiny", "--frames", "0", "--out", str(tmp_path / "s.json")], capsys, "orbit")
    assert line.endswith("argument --frames: must be a positive integer, got '0' (pass 1 or more)")
    assert _listing(tmp_path) == []


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.mark.parametrize("avatar", ["tiny", "demo"])
def test_cuda_without_cuda(work, tmp_path, capsys, no_cuda, avatar):
    argv = _render(work, "--out", str(tmp_path / "o.mp4"), "--device", "cuda")
    argv[2] = avatar
    line = _error(argv, capsys)
    assert "argument --device: 'cuda' is not available: " in line and line.endswith("(use cpu, or auto)")
    assert "checkpoint" not in line and "safetensors" not in line
    with pytest.raises(BackendError, match="'cuda' is not available: "):
        Avatar.from_pretrained(work / "avatar", device="cuda")


def test_a_malformed_device(work, tmp_path, capsys):
    line = _error(_render(work, "--out", str(tmp_path / "o.mp4"), "--device", "gpu0"), capsys)
    assert line.endswith("argument --device: unknown device 'gpu0' (use auto (CUDA when present, else cpu), cpu, "
                         "cuda or cuda:N)")
    line = _error(["eval", "--avatar", "tiny", "--device", "mps"], capsys, "eval")
    assert "unknown device 'mps'" in line


def test_auto_is_the_default_device_and_picks_cuda_when_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert device("auto") == "cuda" and device("cuda:0") == "cuda:0"
    with pytest.raises(Exception, match="this machine has 1 CUDA device"):
        device("cuda:1")


# -- files -----------------------------------------------------------------------------------------------
def _edited_sequence(work, tmp_path, edit) -> Path:
    doc = json.loads((work / "seq.json").read_text())
    edit(doc)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("version, message", [("1", "\"version\" must be a positive integer, got '1'"),
                                              (None, "\"version\" must be a positive integer, got None"),
                                              (2, "has sequence version 2; this engine reads up to 1")])
def test_a_sequence_version_that_is_not_a_known_integer(work, tmp_path, capsys, no_rendering, version, message):
    path = _edited_sequence(work, tmp_path, lambda d: d.update(version=version))
    line = _error(["render", "--avatar", "tiny", "--sequence", str(path), "--out", str(tmp_path / "o.mp4")], capsys)
    assert f"{path}" in line and message in line


def test_a_bad_frame_47_of_48_is_found_before_rendering(tmp_path, capsys, no_rendering):
    path = write_sequence(tmp_path / "long.json", orbit(Avatar.from_preset("tiny").config, frames=48))
    doc = json.loads(path.read_text())
    doc["frames"][47]["expression"] = doc["frames"][47]["expression"][:7]
    path.write_text(json.dumps(doc))
    line = _error(["render", "--avatar", "tiny", "--sequence", str(path), "--out", str(tmp_path / "o.mp4")], capsys)
    assert f"error: {path}: frame 47 of 48: the expression has 7 values, avatar 'tiny' expects 8 (jawOpen," in line
    assert line.endswith("(write the sequence for this avatar, e.g. with `avatar orbit`)")
    doc["frames"][47]["expression"] = [0.0] * 7 + [float("nan")]
    path.write_text(json.dumps(doc))
    line = _error(["render", "--avatar", "tiny", "--sequence", str(path), "--out", str(tmp_path / "o.mp4")], capsys)
    assert "frame 47 of 48: \"expression\" must be a non-empty list of finite numbers" in line
    assert _listing(tmp_path) == ["long.json"]


def test_a_camera_beyond_the_far_plane_is_found_before_rendering(tmp_path, capsys, no_rendering):
    frames = orbit(Avatar.from_preset("tiny").config, frames=4)
    frames[2].camera = Camera.look_at(eye=(0, 0, 3.0), target=(0, 0, 0), fov_deg=16, width=128, height=128)
    path = write_sequence(tmp_path / "far.json", frames)
    line = _error(["render", "--avatar", "tiny", "--sequence", str(path), "--out", str(tmp_path / "o.mp4")], capsys)
    assert f"error: {path}: frame 2: the camera sees nothing of the head: all of it lies beyond the far plane" in line
    assert line.endswith("move the camera closer than 2 m to the head")
    assert _listing(tmp_path) == ["far.json"]


def _avatar_folder(work, tmp_path, edit) -> Path:
    folder = tmp_path / "avatar"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((work / "avatar" / "model.safetensors").read_bytes())
    config = json.loads((work / "avatar" / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("field, value, message", [
    ("image_size", "128", "image_size must be an integer, got '128' (fix the value in the config)"),
    ("vae", 3, "vae must be a JSON object, got 3 (give an object of VAEConfig's fields)"),
    ("unet", {"block_out_channels": {"a": 1}}, "unet.block_out_channels must be a list, got {'a': 1}"),
    ("conditioning", {"znear": "near"}, "conditioning.znear must be a finite number, got 'near'"),
    ("version", "1", "avatar config version must be a positive integer, got '1'"),
])
def test_a_config_value_of_the_wrong_type(work, tmp_path, capsys, no_rendering, field, value, message):
    folder = _avatar_folder(work, tmp_path, lambda c: c.update({field: value}))
    for argv, command in ((["info", "--avatar", str(folder)], "info"),
                          (["render", "--avatar", str(folder), "--sequence", str(work / "seq.json"), "--out",
                            str(tmp_path / "o.mp4")], "render")):
        line = _error(argv, capsys, command)
        assert line.startswith(f"avatar {command}: error: {folder / 'config.json'}: {message}")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weights_are_found_at_load(work, tmp_path, capsys, no_rendering, bad):
    folder = _avatar_folder(work, tmp_path, lambda c: None)
    tensors = load_file(folder / "model.safetensors")
    tensors["vae.decoder.conv_out.weight"][0, 0, 0, 0] = bad
    save_file(tensors, folder / "model.safetensors")
    line = _error(["render", "--avatar", str(folder), "--sequence", str(work / "seq.json"), "--out",
                   str(tmp_path / "o.mp4")], capsys)
    nan, inf = (1, 0) if bad != bad else (0, 1)
    assert (f"{folder / 'model.safetensors'}: tensor vae.decoder.conv_out.weight holds {nan} NaN and {inf} Inf "
            "values of 432 (the weights are damaged") in line
    assert _listing(tmp_path) == ["avatar", "avatar/config.json", "avatar/model.safetensors"]


def test_weights_beyond_the_range_of_the_dtype(work, tmp_path):
    folder = _avatar_folder(work, tmp_path, lambda c: None)
    tensors = load_file(folder / "model.safetensors")
    tensors["textures.ambient"].view(-1)[3] = 1e6
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"tensor textures.ambient reaches 1e\+06, beyond the range of "
                                              r"torch.float16 \(load the avatar in float32 or bfloat16\)"):
        Avatar.from_pretrained(folder, dtype=torch.float16)
    assert Avatar.from_pretrained(folder, dtype=torch.bfloat16).textures.ambient.dtype == torch.bfloat16


# -- signals ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("signum, code, out", [(signal.SIGINT, 130, "frames"), (signal.SIGTERM, 143, "o.mp4")])
def test_a_signal_mid_render_removes_the_temporaries(tmp_path, signum, code, out):
    # long enough that the signal always comes mid-render
    seq = write_sequence(tmp_path / "seq.json", orbit(Avatar.from_preset("tiny").config, frames=3000))
    run = tmp_path / "run"
    run.mkdir()
    err = tmp_path / "stderr.txt"
    with open(err, "w") as stderr:
        p = subprocess.Popen([sys.executable, "-m", "engine.cli", "render", "--avatar", "tiny", "--sequence", str(seq),
                              "--steps", "1", "--sampler", "ddim", "--out", str(run / out), "--sheet",
                              str(run / "sheet.png")], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr,
                             env={**os.environ, "OMP_NUM_THREADS": "1"},
                             # a shell's background job inherits SIGINT ignored (then Python installs no handler)
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not re.search(r"\b[1-9]\d*/3000\b", err.read_text()):  # a frame is written: mid-render
            assert p.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.05)
        assert any(run.iterdir())  # the temporary is there
        p.send_signal(signum)
        assert p.wait(timeout=60) == code
    finally:
        p.kill()
    lines = err.read_text().strip().splitlines()
    assert lines[-1] == f"avatar render: interrupted ({signal.Signals(signum).name})"
    assert "Traceback" not in err.read_text()
    assert _listing(run) == []
