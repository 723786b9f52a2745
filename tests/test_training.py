import argparse
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from engine.config import from_preset
from engine.data.dataset import AvatarDataset, collate
from engine.errors import ConfigError
from engine.geometry import Camera
from engine.heads import builtin_head_mesh
from engine.model import Avatar
from engine.raster import rasterize
from engine.training import TrainConfig, train
from engine.training.cli import add_arguments, run
from engine.training.loop import StepBatches, parameter_groups, resolve_mixed_precision
from engine.training.objectives import TrainingModule, crop_batch, crop_camera, draw, rasterize_batch


def tiny_config(size=32):
    c = from_preset("tiny")
    return c.replace(image_size=size, conditioning=dataclasses.replace(c.conditioning, texture_resolution=16))


def write_dataset(root, size=32, sequences=2, frames=3, cameras=3, seed=0, synthetic_version=None):
    """A small dataset of the built-in head, shaded by its normals and tinted by the first 3 code values; camera
    cam1 and the last sequence held out."""
    from engine.data.writer import DatasetWriter

    mesh = builtin_head_mesh(2)
    cams = {f"cam{i}": Camera.look_at(eye=(math.sin(a), 0.0, math.cos(a)), width=size, height=size, fov_deg=16)
            for i, a in enumerate(np.radians(np.linspace(-20, 20, cameras)))}
    writer = DatasetWriter(root, cameras=cams, expression_dim=8, topology=mesh, source="test",
                           synthetic_version=synthetic_version)
    rng = np.random.default_rng(seed)
    for s in range(sequences):
        codes = rng.uniform(0, 1, (frames, 8)).astype(np.float32)
        for t in range(frames):
            for name, cam in cams.items():
                r = rasterize(mesh, cam)
                m = r.mask[0]
                shade = (0.5 + 0.4 * r.normals[0]) * (0.6 + 0.4 * torch.from_numpy(codes[t, :3]))
                writer.write_image(f"seq{s}", name, t, (m * shade.clamp(0, 1) + 1 - m).numpy(), m[..., 0].numpy())
        writer.write_sequence(f"seq{s}", codes, vertices=np.stack([mesh.vertices.numpy()] * frames))
    return writer.finish(eval_cameras=["cam1"], eval_sequences=[f"seq{sequences - 1}"]).parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "d")


def _avatar(seed=0):
    return Avatar(tiny_config(), init="training", seed=seed).train()


def test_train_config_json_round_trip_and_validation():
    c = TrainConfig(recipe="scratch", steps=5, crop_min=0.7, sd_dir="/x")
    assert TrainConfig.from_dict(json.loads(c.to_json())) == c
    with pytest.raises(ConfigError, match="recipe"):
        TrainConfig(recipe="lora")
    with pytest.raises(ConfigError, match="no field"):
        TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(ConfigError, match="crop_min"):
        TrainConfig(crop_min=0.0)
    with pytest.raises(ConfigError, match="CUDA"):
        resolve_mixed_precision("fp16", cpu=True)
    assert resolve_mixed_precision("auto", cpu=True) == "no"


def test_parameter_groups_follow_the_recipe():
    avatar = _avatar()
    release = parameter_groups(avatar, "release")
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    unet_plain = {id(p) for n, p in avatar.unet.named_parameters() if "_expression_attention" not in n}
    assert not ids(release["networks"]) & unet_plain  # the base UNet stays frozen
    assert ids(avatar.controlnet.parameters()) == ids(release["clipped"])
    assert ids(avatar.expression_proj.parameters()) <= ids(release["networks"])
    scratch = parameter_groups(avatar, "scratch")
    assert unet_plain <= ids(scratch["networks"]) and ids(scratch["clipped"]) == ids(scratch["networks"])
    assert not ids(scratch["networks"]) & ids(avatar.vae.parameters())


def test_overfits_one_fixed_batch(data):
    """The release recipe at its own learning rates halves the loss on one batch with fixed noise and timesteps."""
    dataset = AvatarDataset(data, "train")
    batch = collate([dataset[i] for i in range(4)])
    avatar = _avatar()
    groups = parameter_groups(avatar, "release")
    avatar.requires_grad_(False)
    for p in groups["networks"] + groups["textures"]:
        p.requires_grad_(True)
    module = TrainingModule(avatar)
    draws = draw(torch.Generator().manual_seed(0), 4, avatar.config)
    raster = rasterize_batch(batch["mesh"], batch["camera"], avatar.config, "cpu")
    config = TrainConfig()
    optimizer = torch.optim.AdamW([{"params": groups["networks"], "lr": config.lr},
                                   {"params": groups["textures"], "lr": config.texture_lr, "weight_decay": 0.0}],
                                  weight_decay=config.weight_decay)
    losses = []
    for _ in range(60):
        loss = module(batch["image"], raster, batch["expression"], draws)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(groups["clipped"], config.grad_clip)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_target_is_diffusers_velocity(data, monkeypatch):
    """The diffusion loss's noisy latent and target are diffusers' `DDPMScheduler.add_noise` and `get_velocity`
    (the scheduler configured as the avatar's schedule), at the zero-SNR end and the clean end of the schedule too:
    a model that predicts diffusers' velocity has zero loss, and one that predicts its negative 4 x mean(v^2)."""
    from diffusers import DDPMScheduler

    dataset = AvatarDataset(data, "train")
    batch = collate([dataset[i] for i in range(4)])
    avatar = _avatar()
    s = avatar.config.schedule
    scheduler = DDPMScheduler(num_train_timesteps=s.num_train_timesteps, beta_start=s.beta_start,
                              beta_end=s.beta_end, beta_schedule=s.beta_schedule, prediction_type=s.prediction_type,
                              rescale_betas_zero_snr=s.rescale_betas_zero_snr, timestep_spacing=s.timestep_spacing)
    raster = rasterize_batch(batch["mesh"], batch["camera"], avatar.config, "cpu")
    draws = draw(torch.Generator().manual_seed(0), 4, avatar.config)
    draws = dataclasses.replace(draws, timesteps=torch.tensor([999, 0, 500, 137]))
    with torch.no_grad():  # x0 as the module documents it: a posterior sample, scaled
        posterior = avatar.vae.encode(batch["image"]).latent_dist
        x0 = (posterior.mean + posterior.std * draws.posterior) * avatar.config.vae.scaling_factor
    velocity = scheduler.get_velocity(x0, draws.noise, draws.timesteps)
    assert velocity.abs().mean() > 0.1
    seen = {}

    def predict(noisy, t, condition, tokens, sign):
        seen["noisy"], seen["t"] = noisy, t
        return sign * velocity

    module = TrainingModule(avatar)
    for sign, want in ((1.0, 0.0), (-1.0, 4 * velocity.pow(2).mean().item())):
        monkeypatch.setattr(avatar, "predict", lambda *a, sign=sign: predict(*a, sign))
        with torch.no_grad():
            loss = module(batch["image"], raster, batch["expression"], draws).item()
        assert loss == pytest.approx(want, abs=1e-6 * (1 + want))
        assert torch.equal(seen["t"], draws.timesteps)
        torch.testing.assert_close(seen["noisy"], scheduler.add_noise(x0, draws.noise, draws.timesteps),
                                   rtol=0, atol=1e-5)


def test_stage_one_vae_is_used_deterministically(data):
    """A VAE trained in stage 1 decodes and diffuses its posterior means (the posterior noise changes nothing);
    the release recipe's pretrained VAE is sampled as diffusers' SD training does."""
    import dataclasses

    from engine.training.objectives import measure_scaling_factor

    dataset = AvatarDataset(data, "train")
    batch = collate([dataset[i] for i in range(2)])
    avatar = _avatar()
    raster = rasterize_batch(batch["mesh"], batch["camera"], avatar.config, "cpu")
    draws = draw(torch.Generator().manual_seed(0), 2, avatar.config)
    other = dataclasses.replace(draws, posterior=torch.randn_like(draws.posterior))
    losses = {}
    for sample in (True, False):
        module = TrainingModule(avatar, sample_latents=sample)
        with torch.no_grad():
            losses[sample] = [module(batch["image"], raster, batch["expression"], d).item() for d in (draws, other)]
            vae = [module(batch["image"], None, batch["expression"], d, "vae").item() for d in (draws, other)]
        assert vae[0] == vae[1]
    assert losses[False][0] == losses[False][1] and losses[True][0] != losses[True][1]
    with torch.no_grad():
        means = avatar.vae.encode(batch["image"]).latent_dist.mean
    assert measure_scaling_factor(avatar.vae, batch["image"]) == pytest.approx(1 / means.std().item(), rel=1e-5)


def test_step_batches_resume_anywhere():
    full = list(StepBatches(5, 2, seed=3, start=0, end=7))
    assert list(StepBatches(5, 2, seed=3, start=4, end=7)) == full[4:]
    epoch0 = [i for b in full for i in b][:5]
    assert sorted(epoch0) == list(range(5))  # each epoch is a permutation
    ranks = [list(StepBatches(5, 2, 3, 0, 3, rank=r, world=2)) for r in range(2)]
    assert [i for step in zip(*ranks) for b in step for i in b] == [i for b in full[:6] for i in b]


def test_crop_moves_the_camera_with_the_image():
    cam = Camera.look_at(eye=(0.2, 0.1, 1.0), width=64, height=64, fov_deg=16)
    point = torch.tensor([[0.03, -0.02, 0.05]])
    u, v = cam.project(point)[0].tolist()
    cropped = crop_camera(cam, 10, 6, 40, 64)
    u2, v2 = cropped.project(point)[0].tolist()
    assert u2 == pytest.approx((u + 0.5 - 10) * 64 / 40 - 0.5, abs=1e-4)
    assert v2 == pytest.approx((v + 0.5 - 6) * 64 / 40 - 0.5, abs=1e-4)
    images = torch.rand(2, 3, 64, 64)
    out, cams = crop_batch(images, [cam, cam], torch.tensor([[0, 0, 64], [16, 16, 32]]))
    assert out.shape == images.shape and torch.allclose(out[0], images[0]) and cams[1].fx == pytest.approx(cam.fx * 2)


def test_resume_reproduces_the_uninterrupted_run(data, tmp_path):
    """Scratch recipe (stage 1, scaling factor, stage 2) for 6 steps, against 3 steps then a resume to 6."""
    dataset = AvatarDataset(data, "train")
    validation = [AvatarDataset(data, "eval")[0]]
    config = TrainConfig(recipe="scratch", steps=4, vae_steps=2, batch_size=2, checkpoint_every=2, log_every=1,
                         validate_every=2, validation_frames=1, validation_steps=2, crop_min=0.8)
    a = train(_avatar(), dataset, tmp_path / "a", config, validation=validation)
    train(_avatar(), dataset, tmp_path / "b", config.replace(steps=1), validation=validation)
    b = train(_avatar(), dataset, tmp_path / "b", config, validation=validation, resume=True)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # stage 1 measured the scaling factor and stored it in the config (not model.md's 0.18215)
    factor = a.config.vae.scaling_factor
    assert factor != 0.18215 and factor == b.config.vae.scaling_factor
    saved = Avatar.from_pretrained(tmp_path / "b" / "avatar")
    assert saved.config.vae.scaling_factor == factor
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-000004", "step-000006"]
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 7))  # the resumed part logged once
    assert any(r.get("event") == "vae_scaling_factor" for r in log)
    assert (tmp_path / "b" / "validation" / "step-000006.png").is_file()


def _cli(*argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    run(p.parse_args([str(a) for a in argv]))


def test_cli_trains_resumes_and_writes_a_loadable_avatar(data, tmp_path, capsys):
    spec = tmp_path / "avatar.json"
    spec.write_text(json.dumps(tiny_config(64).to_dict()))  # reshaped to the data's 32 px
    out = tmp_path / "run"
    common = ("--data", data, "--out", out, "--recipe", "scratch", "--batch-size", "2", "--validate-every", "2",
              "--validation-frames", "2", "--validation-steps", "2", "--checkpoint-every", "2")
    _cli("--avatar", spec, *common, "--steps", "2", "--vae-steps", "1")
    assert "trained avatar" in capsys.readouterr().out
    avatar = Avatar.from_pretrained(out / "avatar")
    assert avatar.config.image_size == 32 and avatar.config.vae.scaling_factor != 0.18215
    # what it was trained on: cameras cam0 and cam2 at -20 and +20 degrees of yaw, 1 m away, level (cam1 is held
    # out), and the codes of seq0 (seq1 is held out); the rig is all three cameras
    record = avatar.config.trained_on
    assert record.azimuth_deg == pytest.approx((-20.0, 20.0), abs=1e-4)
    assert record.elevation_deg == pytest.approx((0.0, 0.0), abs=1e-4)
    assert record.distance == pytest.approx((1.0, 1.0), abs=1e-6)
    codes = np.load(data / "seq0" / "codes.npy")
    assert record.code_min == tuple(codes.min(0).tolist()) and record.code_max == tuple(codes.max(0).tolist())
    assert [Camera.from_dict(c).center.tolist() for c in record.rig] == [
        cam.center.tolist() for cam in AvatarDataset(data, "all").cameras.values()]
    assert TrainConfig.from_dict(json.loads((out / "train.json").read_text())["train"]).steps == 2
    with pytest.raises(ConfigError, match="--resume"):
        _cli("--avatar", spec, *common, "--steps", "2")
    with pytest.raises(ConfigError, match="batch_size"):
        _cli("--out", out, "--resume", "--batch-size", "4")
    _cli("--out", out, "--resume", "--steps", "3")
    assert (out / "checkpoints" / "step-000004").is_dir()  # 1 VAE + 3 diffusion steps
    with pytest.raises(ConfigError, match="sd-dir"):
        _cli("--avatar", "tiny", "--data", data, "--out", tmp_path / "r2", "--steps", "1")
    with pytest.raises(ConfigError, match="does not fit"):
        _cli("--avatar", out / "avatar", "--data", write_dataset(tmp_path / "d64", size=64, frames=1),
             "--out", tmp_path / "r3", "--recipe", "scratch")
    assert not (tmp_path / "r3").exists()


def test_refuses_data_of_another_synthetic_version(tmp_path):
    from engine.data.synthetic import SYNTHETIC_VERSION

    old = write_dataset(tmp_path / "old", frames=1, synthetic_version=SYNTHETIC_VERSION + 1)
    with pytest.raises(ConfigError, match=f"version {SYNTHETIC_VERSION + 1}"):
        _cli("--avatar", "tiny", "--data", old, "--out", tmp_path / "run", "--recipe", "scratch")


def test_cli_release_recipe_keeps_the_sd_base_frozen(data, tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file

    tiny = tiny_config()
    torch.manual_seed(0)
    UNet2DConditionModel(**tiny.unet.diffusers_kwargs(tiny.latent_size)).save_pretrained(tmp_path / "sd" / "unet")
    AutoencoderKL(**tiny.vae.diffusers_kwargs(tiny.image_size)).save_pretrained(tmp_path / "sd" / "vae")
    out = tmp_path / "run"
    _cli("--avatar", "tiny", "--data", data, "--out", out, "--sd-dir", tmp_path / "sd", "--steps", "2",
         "--batch-size", "2", "--validate-every", "0", "--lr", "1e-3")
    trained = Avatar.from_pretrained(out / "avatar").state_dict()
    base = load_file(tmp_path / "sd" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(trained[f"unet.{k}"], v) for k, v in base.items())
    vae = load_file(tmp_path / "sd" / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(trained[f"vae.{k}"], v) for k, v in vae.items())
    assert trained["controlnet.controlnet_mid_block.weight"].any()  # zero-initialised, then trained
