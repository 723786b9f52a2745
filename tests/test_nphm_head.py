"""The NPHM backward-field inversion on a `.tar` written in DPHM's layout (keys and shapes written out from
models/deformations.py and the n3dmm_anc39_iden1344_expr200 config), random weights scaled to small offsets."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.errors import CheckpointError, InputError
from engine.geometry import Mesh
from engine.heads import load_head_model
from engine.heads.nphm import load_tracking_model


def dphm_state(seed, scale=0.1):
    """ex_decoder: compressor.0 [32, 1461], defDeepSDF.lin0..lin6 (235 -> 512 x 6 -> 5, lin3 takes 512 + 235);
    id_decoder: mlp_pos (64 -> 64 -> 64 -> 117) plus a tensor of the SDF this head never uses; latent codes."""
    g = torch.Generator().manual_seed(seed)
    ex = {"compressor.0.weight": torch.randn(32, 1461, generator=g) * 0.02,
          "compressor.0.bias": torch.zeros(32)}
    dims = [235, 512, 512, 512, 512, 512, 512, 5]
    for i in range(7):
        fan_in = dims[i] + (235 if i == 3 else 0)
        ex[f"defDeepSDF.lin{i}.weight"] = torch.randn(dims[i + 1], fan_in, generator=g) / math.sqrt(fan_in)
        ex[f"defDeepSDF.lin{i}.bias"] = torch.zeros(dims[i + 1])
    ex["defDeepSDF.lin0.weight"][:, :3] *= 10  # offsets that vary with the point: the solve needs several passes
    ex["defDeepSDF.lin6.weight"] *= scale
    id_dec = {"mlp_pos.0.weight": torch.randn(64, 64, generator=g) * 0.1, "mlp_pos.0.bias": torch.zeros(64),
              "mlp_pos.2.weight": torch.randn(64, 64, generator=g) * 0.1, "mlp_pos.2.bias": torch.zeros(64),
              "mlp_pos.4.weight": torch.randn(117, 64, generator=g) * 0.01, "mlp_pos.4.bias": torch.zeros(117),
              "deepSDFensemble.layers.0.weight": torch.zeros(3, 3)}
    codes = {"codebook.geo.embedding.weight": torch.randn(3, 1344, generator=g) * 0.1,
             "codebook.exp.embedding.weight": torch.randn(5, 200, generator=g) * 0.1}
    return {"id_decoder": id_dec, "ex_decoder": ex, "latent_codes": codes}


def write_head(folder: Path, state) -> Path:
    torch.save(state, folder / "nphm.tar")
    np.save(folder / "anchors_39.npy", np.random.default_rng(0).normal(0, 0.3, (39, 3)))
    g = torch.Generator().manual_seed(1)
    v = torch.rand(200, 3, generator=g) - 0.5
    Mesh(v / 4, torch.tensor([[0, 1, 2], [2, 3, 4]]), torch.cat([v, torch.zeros(200, 2)], 1)).save(folder / "t.npz")
    (folder / "head.json").write_text(json.dumps({"checkpoint": "nphm.tar", "anchors": "anchors_39.npy",
                                                  "template": "t.npz", "identity": 1, "max_iterations": 30,
                                                  "tolerance": 1e-6}))
    return folder


def test_the_inversion_reproduces_the_canonical_points(tmp_path):
    head = load_head_model("nphm:head.json", write_head(tmp_path, dphm_state(0)))
    code = torch.randn(206, generator=torch.Generator().manual_seed(2)) * 0.1
    mesh = head.posed_mesh(code)
    first = head.last_solve
    x = mesh.vertices.double() * 4
    offsets, hyper = head.field(x.float(), head.identity, head.anchors, code[:200])
    assert (x + offsets.double() - head.target.double()).norm(dim=1).max() < 1e-5
    assert torch.allclose(mesh.canonical[:, 3:], hyper, atol=1e-6)  # ambient: the last evaluation's hyper outputs
    assert (offsets.norm(dim=1) > 1e-4).all()  # the field does move the points
    assert 2 <= first["iterations"] <= 30 and first["residual"] < 1e-6
    head.posed_mesh(code + 1e-3)  # warm-started from the last frame: fewer passes
    assert head.last_solve["iterations"] < first["iterations"]
    with pytest.raises(InputError, match="takes 200"):
        head.posed_mesh(torch.zeros(100))


def test_the_tar_is_read_with_strict_keys(tmp_path):
    state = dphm_state(0)
    field, _, codes = load_tracking_model(write_head(tmp_path, state) / "nphm.tar")
    assert torch.equal(field.defDeepSDF.lin3.weight, state["ex_decoder"]["defDeepSDF.lin3.weight"])
    assert codes["geo"].shape == (3, 1344)
    bad = {**state, "ex_decoder": {**state["ex_decoder"], "defDeepSDF.lin7.weight": torch.zeros(1)}}
    torch.save(bad, tmp_path / "bad.tar")
    with pytest.raises(CheckpointError, match=r"unexpected keys \['defDeepSDF.lin7.weight'\]"):
        load_tracking_model(tmp_path / "bad.tar")
    torch.save({k: v for k, v in state.items() if k != "latent_codes"}, tmp_path / "short.tar")
    with pytest.raises(CheckpointError, match="no 'latent_codes'"):
        load_tracking_model(tmp_path / "short.tar")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_tracking_model(tmp_path / "none.tar")


@pytest.mark.skipif(not os.environ.get("NPHM_TRACKED_FRAME"), reason="the real tracking model and a tracked frame "
                    "are not on this machine (set NPHM_TRACKED_FRAME to a head.json beside a tracked CTM frame)")
def test_on_real_data_the_field_maps_a_tracked_vertex_to_its_stored_canonical_point():
    """NPHM_TRACKED_FRAME: a head.json (checkpoint, anchors, identity) with "frame": the tracking folder's stem
    `<t:05d>`; the backward field of the frame's code applied to its CTM vertices (NPHM space) gives the stored
    canonical coordinates within the 16-bit quantisation step."""
    from engine.data.meshio import read_mesh_file
    from engine.data.nersemble import dequantize_canonical

    spec = Path(os.environ["NPHM_TRACKED_FRAME"])
    doc = json.loads(spec.read_text())
    head = load_head_model(f"nphm:{spec.name}", spec.parent)
    stem = spec.parent / doc["frame"]
    v, _ = read_mesh_file(Path(f"{stem}_local_new.CTM"))
    stored = dequantize_canonical(np.load(f"{stem}_canonical_vertices_uint16.npz")["arr_0"])
    code = torch.from_numpy(np.load(f"{stem}_ex_code.npz")["arr_0"].reshape(-1)).float()
    offsets, hyper = head.field(torch.from_numpy(v).float(), head.identity, head.anchors, code)
    step = (np.array([2, 2, 2, 0.4, 0.4]) / 65535)
    got = np.concatenate([v + offsets.numpy(), hyper.numpy()], 1)
    assert (np.abs(got - stored) <= step + 1e-6).mean() > 0.99
