import argparse
import hashlib
import json
import math
import sys
import types

import numpy as np
import pytest
import torch

from engine.data.synthetic import SYNTHETIC_VERSION, SyntheticHead, default_rig_cameras
from engine.data.synthetic_dataset import write_synthetic_dataset
from engine.errors import BackendError, CheckpointError, ConfigError
from engine.evaluation import evaluate
from engine.evaluation.cli import add_arguments, format_table, run
from engine.evaluation.held_out import held_out_cameras, turn_camera
from engine.evaluation.scores import (
    LPIPS,
    autoencoder_images,
    expression_gain,
    expressive_half,
    flicker_scores,
    frame_scores,
    weights_sha256,
)
from engine.model import Avatar
from test_training import tiny_config, write_dataset

KEYS = {"avatar", "data", "frames", "sampler", "steps", "decoder", "psnr", "psnr_mask", "ssim", "autoencoder",
        "flicker", "neutral", "per_frame", "weights"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("eval") / "d")


def _synthetic_avatar(version=SYNTHETIC_VERSION):
    return Avatar(tiny_config().replace(head_model="synthetic", synthetic_version=version), seed=0)


def test_frame_scores_and_mask():
    target = torch.rand(2, 3, 16, 16)
    mask = torch.zeros(2, 1, 16, 16)
    mask[0, :, 4:12, 4:12] = 1
    pred = target.clone()
    pred[:, :, :2] += 0.1  # error outside the mask only
    scores = frame_scores(pred.clamp(0, 1), target, mask)
    assert math.isinf(scores[0]["psnr_mask"]) and math.isfinite(scores[0]["psnr"])
    assert math.isnan(scores[1]["psnr_mask"])  # empty mask


def test_expression_gain_of_known_errors():
    """Frames whose in-mask error is a constant d have head-mask PSNR -20 log10(d) exactly (whatever lies outside
    the mask): true-code errors 0.01 and 0.02 on the two most expressive of four frames against neutral-code errors
    0.1 and 0.2 give a gain of 20 dB; the two less expressive frames (large errors) are not counted."""
    g = torch.Generator().manual_seed(0)
    truth = torch.rand(4, 3, 16, 16, generator=g, dtype=torch.float64) * 0.2 + 0.3
    mask = torch.zeros(4, 1, 16, 16, dtype=torch.float64)
    for i in range(4):
        mask[i, :, 2 + i:10 + i, 3:12 - i] = 1
    codes = torch.tensor([[0.1, 0.0], [0.0, 3.0], [0.5, 0.0], [-2.0, 0.0]])  # norms 0.1, 3, 0.5, 2

    def with_error(frames, inside, outside):
        m = mask[frames]
        return truth[frames] + torch.tensor(inside, dtype=torch.float64).view(-1, 1, 1, 1) * m + outside * (1 - m)

    assert expressive_half(codes) == [1, 3] and expressive_half(codes[:1]) == [0]
    pred = with_error([0, 1, 2, 3], [0.4, 0.01, 0.3, 0.02], 0.3)
    neutral = with_error([1, 3], [0.1, 0.2], 0.05)
    scores = frame_scores(pred, truth, mask)
    assert [s["psnr_mask"] for s in scores] == pytest.approx([-20 * math.log10(d) for d in (0.4, 0.01, 0.3, 0.02)])
    gain = expression_gain(scores, frame_scores(neutral, truth[[1, 3]], mask[[1, 3]]), [1, 3])
    assert gain["frames"] == [1, 3]
    assert gain["psnr_mask"] == pytest.approx(40 - 10 * math.log10(2), abs=1e-9)
    assert gain["psnr_mask_neutral"] == pytest.approx(20 - 10 * math.log10(2), abs=1e-9)
    assert gain["gain"] == pytest.approx(20.0, abs=1e-9)


def test_flicker_of_known_frame_differences():
    """Frames base + c_k * (+-1 per pixel): consecutive frames differ by |c_k+1 - c_k| at every pixel, so the
    flicker is the mean of those steps; the ratio is the prediction's over the truth's (None for a still truth)."""
    g = torch.Generator().manual_seed(1)
    base = torch.rand(1, 3, 8, 8, generator=g) * 0.4 + 0.3
    sign = torch.randint(0, 2, (1, 3, 8, 8), generator=g) * 2.0 - 1
    pred = base + torch.tensor([0.0, 0.1, -0.05, 0.25]).view(-1, 1, 1, 1) * sign  # steps 0.1, 0.15, 0.3
    truth = base + torch.tensor([0.0, 0.03, 0.0, 0.03]).view(-1, 1, 1, 1) * sign  # steps 0.03 each
    result = flicker_scores(pred, truth)
    assert result["frames"] == 4
    assert result["prediction"] == pytest.approx(0.55 / 3, rel=1e-6)
    assert result["ground_truth"] == pytest.approx(0.03, rel=1e-5)
    assert result["ratio"] == pytest.approx(0.55 / 3 / 0.03, rel=1e-5)
    assert flicker_scores(pred, base.expand(4, -1, -1, -1))["ratio"] is None


def test_autoencoder_images_round_trip_the_vae():
    """A lossless stand-in VAE gives back the target; a real one is scored the same way inside `evaluate`."""
    from types import SimpleNamespace

    class Lossless(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.ones(()))

        def encode(self, x):
            return SimpleNamespace(latent_dist=SimpleNamespace(mean=x * self.gain))

        def decode(self, z):
            return SimpleNamespace(sample=z / self.gain)

    target = torch.rand(5, 3, 8, 8)
    assert torch.allclose(autoencoder_images(Lossless(), target, batch_size=2), target, atol=1e-6)
    avatar = _synthetic_avatar()
    size = avatar.config.image_size
    real = autoencoder_images(avatar.vae, torch.rand(2, 3, size, size))
    assert real.shape == (2, 3, size, size) and 0 <= real.min() and real.max() <= 1


def test_held_out_cameras_are_not_rig_cameras():
    rig = default_rig_cameras(12, 32)
    held = held_out_cameras(rig)
    assert len(held) >= 6
    centres = torch.stack([c.center for c in rig])
    for cam in held:
        assert (centres - cam.center).norm(dim=1).min() > 0.05  # no training camera
        assert float(cam.center.norm()) == pytest.approx(float(rig[0].center.norm()), abs=1e-5)
    turned = turn_camera(rig[0], math.radians(10))
    origin = torch.zeros(1, 3)
    assert torch.allclose(turned.project(origin), rig[0].project(origin), atol=1e-3)  # still looks at the head


def test_held_out_frames_follow_the_recorded_rig():
    """The held-out cameras are placed between the avatar's own training cameras (its `trained_on.rig`)."""
    from engine.evaluation.held_out import synthetic_frames, training_rig
    from engine.orbit import orbit_angles, orbit_camera
    from engine.trained_on import TrainedOn

    def with_rig(rig):
        record = TrainedOn(azimuth_deg=(0.0, 0.0), elevation_deg=(0.0, 0.0), distance=(1.0, 1.0),
                           code_min=(0.0,) * 8, code_max=(1.0,) * 8, rig=tuple(c.to_dict() for c in rig))
        avatar = _synthetic_avatar()
        avatar.config = avatar.config.replace(trained_on=record)
        return avatar

    # one frontal training camera: no neighbour, so the default spacing of 10 degrees; turned by half of it, to
    # the first side tried (+yaw) as both are equally clear
    held, _ = synthetic_frames(with_rig([orbit_camera(size=32)]), frames=2)
    assert [f.label["camera"] for f in held] == ["heldout00", "heldout00"]
    assert orbit_angles(held[0].camera) == pytest.approx((5.0, 0.0, 1.0), abs=1e-4)
    # a different recorded camera count changes the held-out cameras; an avatar recording none gets the 12-camera
    # default rig of the synthetic generator
    six, twelve = default_rig_cameras(6, 32), default_rig_cameras(12, 32)

    def centres(cameras):
        return torch.stack([c.center for c in cameras])

    assert torch.equal(centres(training_rig(with_rig(six).config)), centres(six))
    assert torch.equal(centres(training_rig(_synthetic_avatar().config)), centres(twelve))
    # the frontal camera's held-out twin is turned by half the rig's spacing, which the camera count sets
    twin_yaw = [orbit_angles(held_out_cameras(rig)[0])[0] for rig in (six, twelve)]
    assert twin_yaw[0] > 0 and twin_yaw[1] > 0 and abs(twin_yaw[0] - twin_yaw[1]) > 0.5


def test_the_demo_avatar_records_its_make_data_rig():
    """`avatar make-data --cameras 12 --size 128 --sequences 16 ...`: the rig is `default_rig_cameras(12, 128)`;
    cam09 (yaw 20.5, pitch -2.2) is held out, which leaves the lattice's ends: yaw +-45 (1 - 1/11), pitch from
    camera 10 (lattice point 9, v = frac(0.5 + 9 phi')) to camera 5 (point 4); every code dimension runs 0 -> 1."""
    from engine.avatars import resolve_avatar

    record = resolve_avatar("demo").config().trained_on
    expected = [c.to_dict() for c in default_rig_cameras(12, 128)]
    # the rig's rotations come out of float32 trigonometry, whose last bits differ between CPUs
    assert len(record.rig) == len(expected)
    for stored, camera in zip(record.rig, expected):
        assert stored.keys() == camera.keys()
        for key, value in camera.items():
            assert np.allclose(stored[key], value, atol=1e-6), (key, stored[key], value)
    golden = 0.6180339887498949
    pitch = [(2 * ((0.5 + j * golden) % 1.0) - 1) * 20.0 for j in (9, 4)]
    assert record.azimuth_deg == pytest.approx((-45.0 * 10 / 11, 45.0 * 10 / 11), abs=1e-4)
    assert record.elevation_deg == pytest.approx(tuple(pitch), abs=1e-4)
    assert record.distance == pytest.approx((1.0, 1.0), abs=1e-6)
    assert record.code_min == (0.0,) * 8 and record.code_max == (1.0,) * 8


def test_evaluate_regenerates_synthetic_frames(tmp_path):
    result = evaluate(_synthetic_avatar(), frames=3, sampler="ddim", steps=2, out=tmp_path)
    assert KEYS <= set(result) and len(result["per_frame"]) == 3
    assert result["flicker"]["frames"] == 3 and result["flicker"]["ground_truth"] > 0
    assert result["neutral"]["neutral_mesh"] is True and len(result["neutral"]["frames"]) == 1
    assert result["weights"]["of"] == "state dict" and len(result["weights"]["sha256"]) == 64
    assert set(result["autoencoder"]) == {"psnr", "psnr_mask", "ssim"} and 0 < result["autoencoder"]["psnr"] < 60
    assert all(0 < f["psnr"] < 60 and -1 <= f["ssim"] <= 1 for f in result["per_frame"])
    assert json.loads((tmp_path / "metrics.json").read_text())["psnr"] == result["psnr"]
    assert (tmp_path / "grid.png").is_file()
    # the same call gives the same numbers (fixed noise, fixed held-out seed)
    again = evaluate(_synthetic_avatar(), frames=3, sampler="ddim", steps=2)
    assert again["psnr"] == result["psnr"]


def test_evaluate_refuses_synthetic_version_mismatch(tmp_path):
    with pytest.raises(ConfigError, match=f"version {SYNTHETIC_VERSION + 1}"):
        evaluate(_synthetic_avatar(SYNTHETIC_VERSION + 1), frames=2, steps=1)
    with pytest.raises(ConfigError, match="synthetic_version"):
        evaluate(_synthetic_avatar(None), frames=2, steps=1)
    with pytest.raises(ConfigError, match="--data"):
        evaluate(Avatar(tiny_config(), seed=0), frames=2, steps=1)  # the built-in head renders no ground truth
    old = write_dataset(tmp_path / "old", sequences=2, frames=2, synthetic_version=SYNTHETIC_VERSION + 1)
    with pytest.raises(ConfigError, match=f"dataset {old}"):
        evaluate(_synthetic_avatar(), data=old, frames=2, steps=1)


def test_evaluate_on_a_dataset_eval_split(data):
    result = evaluate(Avatar(tiny_config(), seed=0), data=data, frames=4, sampler="ddim", steps=2)
    assert KEYS <= set(result) and result["frames"] == 4
    assert {f["camera"] for f in result["per_frame"]} >= {"cam1"}  # the held-out camera
    assert result["neutral"]["neutral_mesh"] is False  # a static head: only the tokens change
    with pytest.raises(ConfigError, match="64x64"):
        evaluate(Avatar(tiny_config(64), seed=0), data=data, frames=2, steps=1)


def test_lpips_needs_the_package_and_local_weights(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lpips", None)  # import fails
    with pytest.raises(CheckpointError, match="w.pth is not a readable LPIPS state dict"):
        LPIPS(tmp_path / "w.pth")
    torch.save({"net.slice1.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "vgg.pth")
    with pytest.raises(BackendError, match="pip install lpips"):  # only AlexNet runs without the package
        LPIPS(tmp_path / "vgg.pth")

    class FakeLPIPS(torch.nn.Module):
        def __init__(self, net, pretrained, pnet_rand, verbose):
            super().__init__()
            self.net = torch.nn.Module()
            self.net.slice1 = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 11 if net == "alex" else 3))

        def forward(self, a, b):
            return (a - b).abs().mean(dim=(1, 2, 3))

    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=FakeLPIPS))
    torch.save({"x": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="net.slice1.0.weight"):
        LPIPS(tmp_path / "bad.pth")
    torch.save(FakeLPIPS("alex", False, True, False).state_dict(), tmp_path / "alex.pth")
    values = LPIPS(tmp_path / "alex.pth")(torch.zeros(2, 3, 16, 16), torch.ones(2, 3, 16, 16))
    assert values == pytest.approx([2.0, 2.0])


def test_cli_prints_json_and_table(data, tmp_path, capsys):
    folder = Avatar(tiny_config(), seed=0).save_pretrained(tmp_path / "av")
    p = argparse.ArgumentParser()
    add_arguments(p)
    run(p.parse_args(["--avatar", str(folder), "--data", str(data), "--frames", "2", "--steps", "1", "--json"]))
    result = json.loads(capsys.readouterr().out)
    assert {"psnr", "ssim", "psnr_mask"} <= set(result)
    # the scored weights: the folder's model.safetensors, as sha256sum hashes it
    weights = folder / "model.safetensors"
    assert result["weights"] == {"sha256": hashlib.sha256(weights.read_bytes()).hexdigest(), "of": str(weights)}
    table = format_table({**result, "psnr_mask": None})
    assert "PSNR (head mask)" in table and "n/a" in table and "SSIM" in table and "flicker" in table
    assert result["weights"]["sha256"] in table


def test_state_dict_digest_follows_its_documented_recipe():
    """Without a weights file the digest is sha256 over (name NUL dtype shape NUL bytes) in sorted name order."""
    import struct

    class Weights(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.b = torch.nn.Parameter(torch.tensor([1.5, -2.0]))
            self.a = torch.nn.Parameter(torch.tensor([[0.25]], dtype=torch.float64))

    want = hashlib.sha256(b"a\0torch.float64(1, 1)\0" + struct.pack("<d", 0.25)
                          + b"b\0torch.float32(2,)\0" + struct.pack("<2f", 1.5, -2.0)).hexdigest()
    module = Weights()
    assert weights_sha256(module) == {"sha256": want, "of": "state dict"}
    with torch.no_grad():
        module.b[1] = -2.0000002
    assert weights_sha256(module)["sha256"] != want


def test_synthetic_data_trains_an_avatar_that_evaluates_by_name(tmp_path, capsys):
    """make-data -> train (scratch, a few steps) -> eval of the avatar folder without --data: the synthetic head
    model and synthetic_version travel with the avatar, and held-out frames are regenerated."""
    from test_training import _cli

    data = write_synthetic_dataset(tmp_path / "data", sequences=2, frames_per_sequence=2, cameras=2, size=32,
                                   eval_cameras=1, eval_sequences=1, progress=False).parent
    out = tmp_path / "run"
    _cli("--avatar", "tiny", "--data", data, "--out", out, "--recipe", "scratch", "--steps", "1", "--vae-steps", "1",
         "--batch-size", "2", "--validate-every", "0")
    folder = out / "avatar"
    config = Avatar.from_pretrained(folder).config
    assert config.head_model == "synthetic" and config.synthetic_version == SYNTHETIC_VERSION
    assert isinstance(Avatar.from_pretrained(folder).head_model, SyntheticHead)
    capsys.readouterr()
    p = argparse.ArgumentParser()
    add_arguments(p)
    run(p.parse_args(["--avatar", str(folder), "--frames", "2", "--steps", "1", "--json"]))
    result = json.loads(capsys.readouterr().out)
    assert result["data"].startswith("synthetic") and result["psnr"] is not None and result["ssim"] is not None
