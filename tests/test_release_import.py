"""`avatar import-release`: a run folder written in the release's layout (tests/release_layout.py) on a tiny SD folder
becomes an avatar folder that loads, with what was found printed; a folder that is not a run is refused naming the
missing file, with nothing written."""

import argparse

import pytest
import torch

from engine.cli import main
from engine.model import Avatar
from release_layout import RUN_FILES, R, release_state, write_release_run, write_sd_folder


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    state = release_state(seed=3, code_size=206, people=2)
    return write_release_run(root / "run", state), write_sd_folder(root / "sd"), state


def test_import_release_writes_an_avatar_and_says_what_it_found(release, tmp_path, capsys):
    run, sd, state = release
    out = tmp_path / "avatar"
    assert main(["import-release", "--run", str(run), "--sd", str(sd), "--person", "1", "--out", str(out),
                 "--preset", "tiny"]) == 0
    printed = capsys.readouterr().out
    assert "ckpt-2000.pt (step 2000), person 1" in printed
    assert "206 values -> 4 tokens" in printed
    assert f"3 planes {R}x{R}x16, ambient map {R}x{R}x16" in printed
    avatar = Avatar.from_pretrained(out)
    assert avatar.config.expression_dim == 206
    assert torch.equal(avatar.expression_proj.weight, state["expression_codes_mlp.weight"])
    row = state["neural_texture_lookup_uw.weight"][1]
    assert avatar.textures.planes[1, 5, 3, 9] == row[(3 * R + 9) * 16 + 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["avatar"]  # no temporary folder left


@pytest.mark.parametrize("missing", [RUN_FILES[2], "checkpoints"])
def test_a_folder_that_is_not_a_release_run_is_refused(release, tmp_path, capsys, missing):
    run, sd, _ = release
    broken = tmp_path / "run"
    broken.mkdir()
    for name in RUN_FILES:
        if name != missing:
            (broken / name).write_text("{}")
    out = tmp_path / "avatar"
    code = main(["import-release", "--run", str(broken), "--sd", str(sd), "--out", str(out), "--preset", "tiny"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("avatar import-release: error: ")
    assert f"{broken / missing}" in err and "missing" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_pickle_that_is_not_plain_tensors_is_refused(release, tmp_path, capsys):
    _, sd, _ = release
    run = write_release_run(tmp_path / "run", {"controlnet.x": torch.zeros(1)})
    torch.save({"a": argparse.Namespace(code=1)}, run / "checkpoints" / "ckpt-9000.pt")
    code = main(["import-release", "--run", str(run), "--sd", str(sd), "--out", str(tmp_path / "a"),
                 "--preset", "tiny"])
    assert code == 2 and "ckpt-9000.pt is not a readable torch state dict" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
