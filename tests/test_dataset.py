"""The training-data format: writer -> AvatarDataset round trip, splits, collate, and FormatError on every kind of
corrupt or incomplete dataset (on open, on read, and by `check`)."""

import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from engine.data.dataset import AvatarDataset, check, collate
from engine.data.writer import DatasetWriter
from engine.errors import FormatError, InputError
from engine.geometry import Camera, Mesh

SIZE = 16
E = 4


def _tetra() -> Mesh:
    v = np.array([[0, 0, 0.05], [0.05, 0, -0.03], [-0.05, 0, -0.03], [0, 0.06, 0]], dtype=np.float32)
    f = np.array([[0, 1, 3], [1, 2, 3], [2, 0, 3], [0, 2, 1]])
    return Mesh(v, f, np.concatenate([v * 4, np.zeros((4, 2), np.float32)], axis=1))


def _write(root, shared=True, frames=3):
    """2 cameras x 2 sequences x `frames` frames; returns the arrays written, to compare against."""
    cams = {"camA": Camera.look_at((0, 0, 1), width=SIZE, height=SIZE),
            "camB": Camera.look_at((0.3, 0, 0.95), width=SIZE, height=SIZE)}
    topo = _tetra()
    w = DatasetWriter(root, cameras=cams, expression_dim=E, expression_names=list("abcd"),
                      topology=topo if shared else None, canonical_dims=5, source="test")
    rng = np.random.default_rng(0)
    written = {}
    for s in ("s0", "s1"):
        codes = rng.uniform(0, 1, (frames, E)).astype(np.float32)
        verts = topo.vertices.numpy()[None] + rng.normal(0, 0.01, (frames, 4, 3)).astype(np.float32)
        for t in range(frames):
            if not shared:
                w.write_mesh(s, t, topo.with_vertices(torch.from_numpy(verts[t])))
            for c in cams:
                rgb = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
                alpha = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
                w.write_image(s, c, t, rgb, alpha)
                written[(s, c, t)] = (rgb, alpha)
        w.write_sequence(s, codes, vertices=verts if shared else None)
        written[s] = (codes, verts)
    w.finish(eval_cameras=["camB"], eval_sequences=["s1"])
    return written


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds") / "data"
    return root, _write(root)


def _copy(tiny_root, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(tiny_root[0], dst)
    return dst


@pytest.mark.parametrize("shared", [True, False])
def test_round_trip_splits_and_collate(tmp_path, shared):
    root = tmp_path / "d"
    written = _write(root, shared=shared)
    train, ev, every = (AvatarDataset(root, split=s) for s in ("train", "eval", "all"))
    assert (len(train), len(ev), len(every)) == (3, 9, 12)
    assert {(s, c) for s, c, _ in train.samples} == {("s0", "camA")}
    assert {(s, c) for s, c, _ in ev.samples} == {("s0", "camB"), ("s1", "camA"), ("s1", "camB")}
    assert train.image_size == (SIZE, SIZE) and train.expression_dim == E and train.canonical_dims == 5
    assert train.expression_names == tuple("abcd")
    for ds in (train, ev):
        for item in ds:
            rgb, alpha = written[(item["sequence"], item["camera_name"], item["frame"])]
            assert item["image"].shape == (3, SIZE, SIZE) and item["image"].dtype == torch.float32
            assert torch.allclose(item["image"], torch.tensor(rgb).permute(2, 0, 1) / 255 * 2 - 1, atol=1e-6)
            assert torch.allclose(item["mask"][0], torch.tensor(alpha) / 255, atol=1e-6)
            codes, verts = written[item["sequence"]]
            assert torch.equal(item["expression"], torch.from_numpy(codes[item["frame"]]))
            assert torch.allclose(item["mesh"].vertices, torch.from_numpy(verts[item["frame"]]))
            assert item["camera"] is ds.cameras[item["camera_name"]]
    holdouts = {(it["sequence"], it["camera_name"]): it["holdout"] for it in ev}
    assert holdouts == {("s0", "camB"): "camera", ("s1", "camA"): "sequence", ("s1", "camB"): "both"}
    loader = torch.utils.data.DataLoader(ev, batch_size=4, collate_fn=collate)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, SIZE, SIZE) and batch["mask"].shape == (4, 1, SIZE, SIZE)
    assert batch["expression"].shape == (4, E) and batch["frame"].dtype == torch.int64
    assert len(batch["mesh"]) == len(batch["camera"]) == 4
    clone = pickle.loads(pickle.dumps(ev))  # what DataLoader workers get
    assert torch.equal(clone[5]["image"], ev[5]["image"])
    assert check(root).frames == {"s0": 3, "s1": 3}


def _edit_index(root, **changes):
    doc = json.loads((root / "dataset.json").read_text())
    doc.update(changes)
    (root / "dataset.json").write_text(json.dumps(doc))


def test_missing_or_foreign_index(tmp_path, tiny_root):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match=r"not a dataset folder \(no dataset.json\).*avatar make-data"):
        AvatarDataset(tmp_path / "empty")
    with pytest.raises(FormatError, match="does not exist"):
        AvatarDataset(tmp_path / "nowhere")
    root = _copy(tiny_root, tmp_path)
    _edit_index(root, format="something-else")
    with pytest.raises(FormatError, match="not a dataset index"):
        AvatarDataset(root)
    _edit_index(root, format="diffusion-avatars-dataset", version=99)
    with pytest.raises(FormatError, match="version 99.*upgrade"):
        AvatarDataset(root)
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        AvatarDataset(root)


@pytest.mark.parametrize("change, match", [
    ({"expression_dim": 5, "expression_names": None}, r"codes.npy holds .*\[3, 4\].* 3 frames x 5"),
    ({"sequences": {"s0": {"frames": 4}, "s1": {"frames": 3}}}, "codes.npy holds"),
    ({"split": {"eval_cameras": ["camZ"], "eval_sequences": []}}, "camZ"),
    ({"image_size": [SIZE, SIZE + 1]}, "every camera must render image_size"),
    ({"canonical_dims": 3}, "canonical"),
    ({"sequences": {"../x": {"frames": 3}}}, "not a valid name"),
    ({"cameras": {}}, "no cameras"),
    ({"synthetic_version": "1"}, "synthetic_version"),
    ({"topology": "../elsewhere.npz"}, "topology"),
    ({"topology": "missing.npz"}, "does not exist"),
])
def test_inconsistent_index(tmp_path, tiny_root, change, match):
    root = _copy(tiny_root, tmp_path)
    _edit_index(root, **change)
    with pytest.raises(FormatError, match=match):
        AvatarDataset(root)


def test_missing_and_corrupt_arrays(tmp_path, tiny_root):
    root = _copy(tiny_root, tmp_path)
    (root / "s1" / "codes.npy").unlink()
    with pytest.raises(FormatError, match=r"s1/codes.npy is missing"):
        AvatarDataset(root)
    codes = np.zeros((3, E), np.float32)
    codes[2, 1] = np.nan
    np.save(root / "s1" / "codes.npy", codes)
    with pytest.raises(FormatError, match="NaN.*frame 2"):
        AvatarDataset(root)
    np.save(root / "s1" / "codes.npy", np.zeros((3, E), np.float32))
    np.save(root / "s1" / "vertices.npy", np.zeros((3, 5, 3), np.float32))
    with pytest.raises(FormatError, match=r"vertices.npy has shape \[3, 5, 3\].*topology 4 vertices"):
        AvatarDataset(root)
    (root / "s1" / "vertices.npy").write_bytes(b"garbage")
    with pytest.raises(FormatError, match="not a readable .npy"):
        AvatarDataset(root)
    shutil.rmtree(root / "s1")
    with pytest.raises(FormatError, match="missing"):
        AvatarDataset(root)


def test_missing_camera_folder_and_mesh_files(tmp_path, tiny_root):
    root = _copy(tiny_root, tmp_path)
    shutil.rmtree(root / "s0" / "camB")
    with pytest.raises(FormatError, match="image folder .*camB is missing"):
        AvatarDataset(root)
    per_frame = tmp_path / "pf"
    _write(per_frame, shared=False)
    (per_frame / "s1" / "meshes" / "00001.npz").unlink()
    with pytest.raises(FormatError, match="1 mesh file.*s1"):
        AvatarDataset(per_frame)


def test_missing_and_corrupt_images(tmp_path, tiny_root):
    root = _copy(tiny_root, tmp_path)
    ds = AvatarDataset(root, split="all")
    i = ds.samples.index(("s0", "camA", 1))
    (root / "s0" / "camA" / "00001.png").unlink()
    with pytest.raises(FormatError, match="00001.png is missing"):
        ds[i]
    with pytest.raises(FormatError, match="00001.png is missing"):
        check(root)
    shutil.copy(tiny_root[0] / "s0" / "camA" / "00000.png", root / "s0" / "camA" / "00001.png")
    check(root)
    data = (root / "s0" / "camA" / "00002.png").read_bytes()
    (root / "s0" / "camA" / "00002.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="00002.png is corrupt"):
        ds[i + 1]
    with pytest.raises(FormatError, match="00002.png is corrupt"):
        check(root)
    from PIL import Image

    Image.new("RGB", (SIZE, SIZE)).save(root / "s0" / "camA" / "00002.png")
    with pytest.raises(FormatError, match="is RGB .*expected RGBA"):
        ds[i + 1]


def test_incomplete_write_is_rejected_and_writer_refuses_overwrite(tmp_path, tiny_root):
    root = _copy(tiny_root, tmp_path)
    with pytest.raises(InputError, match="already holds a dataset"):
        _write(root)
    (root / "dataset.json").unlink()  # what an interrupted writer leaves
    with pytest.raises(FormatError, match="no dataset.json"):
        AvatarDataset(root)
    cams = {"c": Camera.look_at(width=SIZE, height=SIZE)}
    w = DatasetWriter(tmp_path / "w", cameras=cams, expression_dim=E, topology=_tetra())
    w.write_sequence("s", np.zeros((2, E)), vertices=np.zeros((2, 4, 3)))
    with pytest.raises(InputError, match="was not written"):
        w.finish()
    assert not (tmp_path / "w" / "dataset.json").exists()


def test_empty_train_split_is_a_clear_error(tmp_path, tiny_root):
    root = _copy(tiny_root, tmp_path)
    _edit_index(root, split={"eval_cameras": ["camA", "camB"], "eval_sequences": []})
    with pytest.raises(FormatError, match="'train' split .* is empty"):
        AvatarDataset(root, split="train")
    assert len(AvatarDataset(root, split="eval")) == 12
    with pytest.raises(InputError, match="unknown split"):
        AvatarDataset(root, split="test")


def test_expression_sequences_cover_every_dimension():
    from engine.data.synthetic_dataset import expression_sequences, held_out

    seqs = expression_sequences(12, 24, 8, seed=3)
    assert len(seqs) == 12 and all(s.shape == (24, 8) and s.dtype == np.float32 for s in seqs)
    assert all(s.min() >= 0.0 and s.max() <= 1.0 for s in seqs)
    sweeps, combos = seqs[0::2], seqs[1::2]
    assert np.array_equal(np.max([s.max(0) for s in sweeps], axis=0), np.ones(8, np.float32))  # all at full strength
    assert all(((s > 0).sum(1) <= 1).all() for s in sweeps)  # one dimension at a time
    assert all(2 <= (s.max(0) > 0).sum() <= 4 for s in combos)  # several together
    assert all(np.abs(np.diff(s, axis=0)).max() < 0.5 for s in seqs)  # smooth
    assert all(np.array_equal(a, b) for a, b in zip(seqs, expression_sequences(12, 24, 8, seed=3)))
    assert held_out(12, 1) == [6] and held_out(12, 2) == [4, 8]


def test_write_synthetic_dataset_and_make_data_cli(tmp_path):
    import argparse

    from engine.config import ARKIT8
    from engine.data.synthetic_dataset import write_synthetic_dataset
    from engine.data.write_synthetic import add_arguments, run

    p = argparse.ArgumentParser()
    add_arguments(p)
    out = tmp_path / "syn"
    run(p.parse_args(["--out", str(out), "--sequences", "2", "--frames", "3", "--cameras", "2", "--size", "32",
                      "--eval-sequences", "1"]))
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["split"] == {"eval_cameras": ["cam01"], "eval_sequences": ["seq001"]}
    assert doc["source"] == "synthetic" and isinstance(doc["synthetic_version"], int)
    train, ev = AvatarDataset(out), AvatarDataset(out, split="eval")
    assert (len(train), len(ev)) == (3, 9) and train.expression_names == ARKIT8
    item = train[1]
    assert item["image"].shape == (3, 32, 32) and item["expression"].shape == (8,)
    assert 0.0 < float(item["mask"].mean()) < 1.0  # the head covers part of the image
    assert torch.allclose(item["image"][:, item["mask"][0] == 0], torch.ones(()))  # white background
    assert item["mesh"].num_vertices == train.index.topology.num_vertices
    check(out)
    with pytest.raises(InputError, match="already holds a dataset"):
        write_synthetic_dataset(out, sequences=2, frames_per_sequence=1, cameras=2, size=32, eval_sequences=1,
                                progress=False)
    with pytest.raises(InputError, match="eval_sequences"):
        write_synthetic_dataset(tmp_path / "bad", sequences=2, frames_per_sequence=1, cameras=2, size=32)
