"""The release's tracked-data layout (NeRSemble): a small fixture written here in that layout (2 cameras, 2 sequences x
3 timesteps, tiny meshes as .ply / .npz / OpenCTM MG1 stand-ins for .CTM), read back and converted to a dataset."""

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from engine.data.dataset import AvatarDataset, check
from engine.data.import_nersemble import add_arguments, run
from engine.data.meshio import read_mesh_file
from engine.data.nersemble import NersemblePerson, dequantize_canonical, euler_xyz, rodrigues
from engine.data.nersemble_dataset import convert_nersemble
from engine.errors import FormatError
from release_layout import ctm_bytes, ply_bytes

SERIALS = ["222200037", "222200038"]
SEQS = ["EMO-1-shout+laugh", "EXP-2-eyes"]
STEPS = [0, 3, 6]
W, H = 64, 48  # full resolution; images are stored at half (images-2x)


def grid_mesh(t: int):
    """A 4 x 4 vertex sheet in NPHM space (x 4) and quantised canonical coordinates; the bottom row lies below
    the fixture's neck plane (canonical y = -0.5)."""
    xs, ys = np.meshgrid(np.linspace(-0.4, 0.4, 4), np.linspace(-0.8, 0.4, 4))
    v = np.stack([xs.ravel(), ys.ravel(), np.full(16, 0.2 + 0.01 * t)], axis=-1).astype(np.float32)
    faces = np.array([[r * 4 + c, r * 4 + c + 1, (r + 1) * 4 + c] for r in range(3) for c in range(3)]
                     + [[r * 4 + c + 1, (r + 1) * 4 + c + 1, (r + 1) * 4 + c] for r in range(3) for c in range(3)])
    canon = np.concatenate([v, np.full((16, 2), 0.1 * (t % 2), np.float32)], axis=1)
    lo, hi = np.array([-1, -1, -1.5, -0.2, -0.2]), np.array([1, 1, 0.5, 0.2, 0.2])
    q = np.round((canon - lo) / (hi - lo) * 65535).astype(np.uint16)
    return v, faces, q


def write_person(root, ctm_method="MG1"):
    rng = np.random.default_rng(0)
    calib = root / "calibration"
    calib.mkdir(parents=True)
    rs = [[0.0, np.pi, 0.0], [0.0, np.pi - 0.3, 0.0]]  # cameras on +z looking back at the head
    ts = [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]
    (calib / "calibration_result.json").write_text(json.dumps({
        "params_result": {"rs": rs, "ts": ts, "intrinsics": [{"fx": 120.0, "fy": 118.0, "cx": 32.0, "cy": 24.0}]},
        "runtime": 1.0}))
    (calib / "config.json").write_text(json.dumps({"serials": SERIALS, "image_size": {"w": W, "h": H}}))
    flame = np.zeros((3311, 3), np.float32)
    flame[3276], flame[3207], flame[3310] = (0, -0.5, 0), (0, -0.5, 1), (1, -0.5, 0)  # plane y = -0.5, normal +y
    (root / "flame.ply").write_bytes(ply_bytes(flame, np.array([[0, 1, 2]]), binary=True))
    for s, seq in enumerate(SEQS):
        base = root / "sequences" / seq
        nphm = base / "annotations" / "tracking" / "NPHM_run"
        flame_dir = base / "annotations" / "tracking" / "FLAME_run"
        nphm.mkdir(parents=True)
        flame_dir.mkdir(parents=True)
        np.savez(flame_dir / "tracked_flame_params.npz", rotation=rng.normal(0, 0.1, (3, 3)),
                 translation=rng.normal(0, 0.01, (3, 3)), scale=np.array([[1.5]]), eyes=rng.normal(0, 1, (3, 6)))
        cc = base / "annotations" / "color_correction"
        cc.mkdir(parents=True)
        np.save(cc / f"{SERIALS[1]}.npy", np.diag([0.5, 0.5, 0.5, 1.0]))
        for i, t in enumerate(STEPS):
            v, f, q = grid_mesh(t)
            stem = nphm / f"{t:05d}_local_new"
            if i == 0:
                (stem.parent / (stem.name + ".ply")).write_bytes(ply_bytes(v, f))
            elif i == 1:
                np.savez(stem.parent / (stem.name + ".npz"), vertices=v, faces=f)
            else:
                (stem.parent / (stem.name + ".CTM")).write_bytes(ctm_bytes(v, f, ctm_method))
            np.savez(nphm / f"{t:05d}_canonical_vertices_uint16.npz", q)
            np.savez(nphm / f"{t:05d}_ex_code.npz", np.full((1, 200), s + 0.01 * t, np.float32))
            frame = base / "timesteps" / f"frame_{t:05d}"
            (frame / "images-2x").mkdir(parents=True)
            (frame / "alpha_map").mkdir()
            img = rng.integers(0, 256, (H // 2, W // 2, 3), dtype=np.uint8)
            Image.fromarray(img).save(frame / "images-2x" / f"cam_{SERIALS[0]}.png")
            Image.fromarray(img).save(frame / "images-2x" / f"cam_{SERIALS[1]}.jpg", quality=95)
            alpha = np.zeros((H, W), np.uint8)
            alpha[8:40, 16:48] = 255
            for serial in SERIALS:
                Image.fromarray(alpha).save(frame / "alpha_map" / f"cam_{serial}.png")
            (frame / "facer_segmentation_masks").mkdir()
            seg = np.full((H // 2, W // 2), 2, np.uint8)
            seg[16:, :] = 3  # torso in the bottom third
            Image.fromarray(seg).save(frame / "facer_segmentation_masks" / f"segmentation_cam_{SERIALS[0]}.png")


@pytest.fixture(scope="module")
def person_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("nersemble") / "037"
    write_person(root)
    return root


def test_mesh_file_readers_agree(tmp_path):
    v, f, _ = grid_mesh(0)
    paths = {"a.ply": ply_bytes(v, f), "b.ply": ply_bytes(v, f, binary=True),
             "c.ctm": ctm_bytes(v, f, "RAW"), "d.ctm": ctm_bytes(v, f, "MG1")}
    tri = {tuple(np.roll(x, -int(np.argmin(x)))) for x in f}  # triangles up to rotation (MG1 reorders them)
    for name, data in paths.items():
        (tmp_path / name).write_bytes(data)
        rv, rf = read_mesh_file(tmp_path / name)
        assert np.allclose(rv, v, atol=1e-6), name
        assert {tuple(np.roll(x, -int(np.argmin(x)))) for x in rf} == tri and len(rf) == len(f), name
    (tmp_path / "q.obj").write_text("v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nf 1/1 2/2 3/3 4/4\n")
    rv, rf = read_mesh_file(tmp_path / "q.obj")
    assert rf.tolist() == [[0, 1, 2], [0, 2, 3]]
    (tmp_path / "m.ctm").write_bytes(ctm_bytes(v, f, "MG2")[:60])
    with pytest.raises(FormatError, match="MG2.*ctmconv m.ctm m.ply"):
        read_mesh_file(tmp_path / "m.ctm")
    (tmp_path / "t.ctm").write_bytes(ctm_bytes(v, f, "MG1")[:-20])
    with pytest.raises(FormatError, match="t.ctm"):
        read_mesh_file(tmp_path / "t.ctm")


def test_reader_cameras_meshes_codes_images(person_root):
    person = NersemblePerson(person_root)
    assert person.person_id == 37 and person.sequences == sorted(SEQS)
    cam = person.cameras[SERIALS[0]]
    assert torch.allclose(cam.R, torch.diag(torch.tensor([-1.0, 1.0, -1.0])), atol=1e-6)
    assert torch.allclose(cam.center, torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)
    assert np.allclose(rodrigues([0, 0, np.pi / 2]) @ [1, 0, 0], [0, 1, 0])
    seq = person.sequence(SEQS[0])
    assert seq.timesteps == STEPS and seq.image_factor == 2
    half = seq.camera(SERIALS[0])
    assert (half.width, half.height, half.fx, half.fy, half.cx, half.cy) == (32, 24, 60.0, 59.0, 16.0, 12.0)

    code = seq.expression(3)
    assert code.shape == (206,) and np.allclose(code[:200], 0.03)
    assert np.allclose(code[200:], seq.flame_params["eyes"][1])  # row = position of t among the timesteps
    assert seq.expression(3, include_eyes=False).shape == (200,)

    v, f, q = grid_mesh(6)
    full = seq.mesh(6, cut_neck=False)  # from the MG1 .CTM
    M = euler_xyz(seq.flame_params["rotation"][2]) * 1.5
    assert np.allclose(full.vertices.numpy(), (v / 4) @ M.T + seq.flame_params["translation"][2], atol=1e-6)
    assert np.allclose(full.canonical.numpy(), dequantize_canonical(q)) and full.canonical_dims == 5
    assert np.abs(dequantize_canonical(q)[:, :3] - v).max() < 2.0 / 65535 + 1e-7
    cut = seq.mesh(6)
    assert cut.num_vertices == 12 and (cut.canonical[:, 1] > -0.55).all() and cut.num_faces == 12

    rgb, alpha = seq.image(0, SERIALS[0])
    src = np.asarray(Image.open(person_root / "sequences" / SEQS[0] / "timesteps" / "frame_00000" / "images-2x"
                                / f"cam_{SERIALS[0]}.png")) / 255.0
    assert rgb.shape == (24, 32, 3) and alpha.shape == (24, 32)
    assert (alpha[16:] == 0).all() and np.allclose(rgb[16:], 1.0)  # torso removed, white
    assert np.allclose(alpha[5:15, 9:23], 1.0) and (alpha[:3] == 0).all()  # matted (alpha map resized from 64x48)
    assert np.allclose(rgb[5:15, 9:23], src[5:15, 9:23], atol=1e-6) and np.allclose(rgb[:3], 1.0)
    cc, _ = seq.image(0, SERIALS[1], matting=False)  # colour correction 0.5, jpeg
    jpg = np.asarray(Image.open(person_root / "sequences" / SEQS[0] / "timesteps" / "frame_00000" / "images-2x"
                                / f"cam_{SERIALS[1]}.jpg")) / 255.0
    assert np.allclose(cc, jpg * 0.5, atol=1e-6)
    assert seq.image(0, "999") is None


def test_convert_to_dataset_and_train_eval_split(person_root, tmp_path):
    dst = tmp_path / "ds"
    convert_nersemble(person_root, dst, progress=False)
    doc = json.loads((dst / "dataset.json").read_text())
    assert doc["split"] == {"eval_cameras": ["222200037"], "eval_sequences": ["EMO-1-shout+laugh"]}
    assert doc["topology"] is None and doc["expression_dim"] == 206 and doc["canonical_dims"] == 5
    assert doc["sequences"]["EXP-2-eyes"] == {"frames": 3, "source_frames": STEPS}
    train = AvatarDataset(dst)
    assert {(s, c) for s, c, _ in train.samples} == {("EXP-2-eyes", "222200038")} and len(train) == 3
    item = train[1]
    seq = NersemblePerson(person_root).sequence("EXP-2-eyes")
    assert torch.allclose(item["expression"], torch.from_numpy(seq.expression(3)))
    assert torch.allclose(item["mesh"].vertices, seq.mesh(3).vertices)
    assert item["image"].shape == (3, 24, 32) and item["camera"].fx == 60.0
    assert len(AvatarDataset(dst, split="eval")) == 9
    check(dst)
    small = tmp_path / "small"
    p = argparse.ArgumentParser()
    add_arguments(p)
    run(p.parse_args([str(person_root), "--out", str(small), "--downscale", "2", "--every", "2", "--no-eyes",
                      "--sequences", "EXP-2-eyes", "--eval-cameras", "222200038"]))
    ds = AvatarDataset(small, split="all")
    assert ds.image_size == (16, 12) and ds.expression_dim == 200 and ds.sequences == {"EXP-2-eyes": 2}
    assert ds.index.eval_cameras == ("222200038",) and ds.cameras["222200037"].fx == 30.0


def test_malformed_release_data_raises_format_errors(tmp_path, person_root):
    with pytest.raises(FormatError, match="no calibration/ folder"):
        NersemblePerson(tmp_path)
    root = tmp_path / "037"
    write_person(root, ctm_method="MG2")
    seq = NersemblePerson(root).sequence(SEQS[1])
    with pytest.raises(FormatError, match="MG2.*ctmconv"):
        seq.mesh(6)
    nphm = root / "sequences" / SEQS[1] / "annotations" / "tracking" / "NPHM_run"
    np.savez(nphm / "00003_canonical_vertices_uint16.npz", np.zeros((5, 5), np.uint16))
    with pytest.raises(FormatError, match=r"uint16 \[16, 5\]"):
        seq.mesh(3)
    (root / "sequences" / SEQS[1] / "timesteps" / "frame_00000" / "alpha_map" / f"cam_{SERIALS[0]}.png").unlink()
    with pytest.raises(FormatError, match="matting mask .* is missing.*--no-matting"):
        seq.image(0, SERIALS[0])
    flame = root / "sequences" / SEQS[1] / "annotations" / "tracking" / "FLAME_run" / "tracked_flame_params.npz"
    np.savez(flame, rotation=np.zeros((2, 3)), translation=np.zeros((3, 3)))
    with pytest.raises(FormatError, match=r"'rotation' must be \[T, 3\] with T = 3"):
        NersemblePerson(root).sequence(SEQS[1])
    (root / "calibration" / "config.json").write_text(json.dumps({"serials": SERIALS[:1], "image_size": [W, H]}))
    with pytest.raises(FormatError, match="calibration .* is malformed"):
        NersemblePerson(root)


def test_the_neck_cut_is_snapped_to_a_plane_in_posed_space():
    """On a closed head (the synthetic head in NPHM space, x 4) cut by a tilted canonical plane: every kept vertex
    lies above the plane fitted in posed space and the new boundary lies on it; the canonical cut alone leaves a
    jagged boundary (the release's cut_throat_and_move_vertices)."""
    from engine.data.nersemble import NECK_MARGIN, cut_neck_snapped
    from engine.data.synthetic import synthetic_head

    mesh = synthetic_head().posed_mesh(torch.tensor([0.6, 0, 0, 0, 0, 0, 0, 0]))
    v, f, c = mesh.vertices.double().numpy() * 4, mesh.faces.numpy(), mesh.canonical.numpy()
    n = np.array([0.0, 1.0, 0.3]) / np.linalg.norm([0.0, 1.0, 0.3])
    plane = (np.array([0.0, -0.3 - NECK_MARGIN, 0.0]), n)
    cut_v, cut_f, keep = cut_neck_snapped(v, f, c, plane)
    assert 0.5 * len(v) < keep.sum() < len(v) and cut_f.max() < len(cut_v)

    def ring(vertices, faces):
        edges = np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
        unique, counts = np.unique(edges, axis=0, return_counts=True)
        return vertices[np.unique(unique[counts == 1])]

    snapped = ring(cut_v, cut_f)
    centre = snapped.mean(0)
    normal = np.linalg.svd(snapped - centre)[2][2]
    assert np.abs((snapped - centre) @ normal).max() < 1e-9  # the boundary is flat
    side = (cut_v - centre) @ normal
    assert (side * np.sign(side.mean()) > -1e-9).all()  # nothing below the posed plane
    plain = ring(v, f[((c[:, :3] - plane[0]) @ n > NECK_MARGIN)[f].all(axis=1)])
    assert np.abs((plain - plain.mean(0)) @ np.linalg.svd(plain - plain.mean(0))[2][2]).max() > 1e-3
