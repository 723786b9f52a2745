"""The learned head model on the synthetic head exported as tracked frames in the release's layout (remeshed per
frame, quantised canonical coordinates; tests/release_layout.py), imported with `import-nersemble`: fitted meshes
against the synthetic head's own posed surface (the truth the fixture rendered), the file's strict layout, and
`avatar fit-head`."""

import numpy as np
import pytest
import torch

from engine.cli import main
from engine.data.nersemble import euler_xyz
from engine.data.nersemble_dataset import convert_nersemble
from engine.data.synthetic import synthetic_head
from engine.errors import CheckpointError, InputError
from engine.heads import load_head_model
from engine.heads.fitting import fit_head
from engine.heads.learned import LearnedHead
from release_layout import synthetic_codes, write_synthetic_person


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    root = tmp_path_factory.mktemp("learned")
    truth = write_synthetic_person(root / "person", sequences=2, frames=10, cameras=2, size=24)
    convert_nersemble(root / "person", root / "ds", progress=False)
    head, report = fit_head(root / "ds", kind="auto", steps=200, progress=False)
    return root, truth, head, report


def test_the_fixture_changes_topology_per_frame(tracked):
    root, *_ = tracked
    counts = {np.load(p)["vertices"].shape[0] for p in (root / "ds" / "EXP-1-synthetic" / "meshes").glob("*.npz")}
    assert len(counts) > 5


def test_fitted_meshes_lie_on_the_true_surface(tracked):
    root, truth, head, report = tracked
    assert report["heldout_frames"] == 4 and set(report["kinds"]) == {"linear", "mlp"}
    def flame(seq):
        return np.load(root / "person" / "sequences" / seq / "annotations" / "tracking" / "FLAME2023_v2"
                       / "tracked_flame_params.npz")

    template_seq, template_frame = report["template"]
    placement = flame(template_seq)
    R0, t0 = euler_xyz(placement["rotation"][template_frame]), placement["translation"][template_frame]
    rest = synthetic_head()
    for frame in (2, 7):  # held-out frames
        code8 = truth["EXP-1-synthetic"][frame]
        fitted = head.posed_mesh(torch.from_numpy(synthetic_codes(code8[None])[0])).vertices.double().numpy()
        # the fitted mesh is the frame's shape in the template frame's placement: take it to the frame's own
        R, t = euler_xyz(flame("EXP-1-synthetic")["rotation"][frame]), flame("EXP-1-synthetic")["translation"][frame]
        true = rest.posed_mesh(torch.from_numpy(code8)).vertices.double().numpy() @ R.T + t
        world = (fitted - t0) @ R0 @ R.T + t
        d = torch.cdist(torch.from_numpy(world), torch.from_numpy(true)).min(1).values.numpy() * 1000
        assert np.median(d) < 1.0 and np.percentile(d, 90) < 3.0, (frame, np.median(d), np.percentile(d, 90))
    for r in report["kinds"].values():
        assert r["vertex_mm_mean"] < 2.0 and r["psnr_db"] > 25.0


def test_the_file_round_trips_and_is_read_strictly(tracked, tmp_path):
    _, _, head, _ = tracked
    path = head.save(tmp_path / "head.npz")
    again = load_head_model("learned:head.npz", tmp_path)
    code = torch.linspace(-1, 1, 206)
    assert torch.allclose(again.posed_mesh(code).vertices, head.posed_mesh(code).vertices, atol=1e-7)
    far = torch.full((206,), 50.0)  # outside the tracked range: clamped per dimension to it
    assert torch.equal(again.posed_mesh(far).vertices, again.posed_mesh(again.arrays["code_high"]).vertices)
    with pytest.raises(InputError, match="takes 206-value codes, got 200"):
        again.posed_mesh(torch.zeros(200))
    arrays = dict(np.load(path))
    np.savez(tmp_path / "extra.npz", **arrays, extra=np.zeros(1))
    with pytest.raises(CheckpointError, match=r"unexpected keys \['extra'\]"):
        LearnedHead.load(tmp_path / "extra.npz")
    np.savez(tmp_path / "short.npz", **{k: v for k, v in arrays.items() if k != "basis"})
    with pytest.raises(CheckpointError, match=r"missing keys \['basis'\]"):
        LearnedHead.load(tmp_path / "short.npz")
    np.savez(tmp_path / "shape.npz", **{**arrays, "code_std": arrays["code_std"][:5]})
    with pytest.raises(CheckpointError, match="code_std has shape"):
        LearnedHead.load(tmp_path / "shape.npz")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_head_model("learned:nowhere.npz", tmp_path)


def test_fit_head_command(tracked, tmp_path, capsys):
    root, *_ = tracked
    out = tmp_path / "head.npz"
    assert main(["fit-head", "--dataset", str(root / "ds"), "--out", str(out), "--kind", "linear"]) == 0
    printed = capsys.readouterr().out
    assert "linear" in printed and "<- written" in printed and "mlp" not in printed.split("map")[1]
    assert LearnedHead.load(out).kind == "linear"
    assert main(["fit-head", "--dataset", str(tmp_path / "none"), "--out", str(tmp_path / "x.npz")]) == 2
    assert "avatar fit-head: error: " in capsys.readouterr().err and not (tmp_path / "x.npz").exists()
