import json
import logging

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import engine.model
from engine.config import AvatarConfig, from_preset
from engine.errors import CheckpointError, ConfigError, InputError
from engine.geometry import Mesh
from engine.heads import builtin_head_mesh
from engine.model import Avatar
from engine.orbit import orbit_camera
from engine.trained_on import TrainedOn
from release_layout import TINY_BLOCKS, C, R, release_state, write_release_run, write_sd_folder

TINY = from_preset("tiny")


def _inputs(avatar):
    g = torch.Generator().manual_seed(0)
    c = avatar.config
    latent = torch.randn(1, 4, c.latent_size, c.latent_size, generator=g)
    condition = torch.rand(1, c.condition_channels, c.image_size, c.image_size, generator=g) * 2 - 1
    return latent, torch.tensor(499), condition, avatar.expression_tokens(torch.rand(8, generator=g))


# -- the avatar folder -------------------------------------------------------------------------------
def test_round_trip_gives_identical_predictions(tiny_avatar, tmp_path):
    folder = tiny_avatar.save_pretrained(tmp_path / "a")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]  # no temp files
    meta = json.loads((folder / "config.json").read_text())
    assert meta["format"] == "diffusion-avatars-engine/avatar" and meta["format_version"] == 3
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    loaded = Avatar.from_pretrained(folder)
    assert loaded.config == tiny_avatar.config
    assert not loaded.training
    with torch.no_grad():
        inputs = _inputs(tiny_avatar)
        assert torch.equal(loaded.predict(*inputs), tiny_avatar.predict(*inputs))
        assert torch.equal(loaded.decode(inputs[0]), tiny_avatar.decode(inputs[0]))
    half = Avatar.from_pretrained(folder, dtype=torch.float16)
    assert half.unet.conv_in.weight.dtype == torch.float16 and half.textures.planes.dtype == torch.float16


def test_mesh_head_model_is_copied(tmp_path):
    mesh = builtin_head_mesh(subdivisions=1)
    mesh_path = Mesh(mesh.vertices * 1.5, mesh.faces, mesh.canonical).save(tmp_path / "src" / "my_head.npz")
    avatar = Avatar(TINY.replace(head_model=f"mesh:{mesh_path}"))
    folder = avatar.save_pretrained(tmp_path / "a")
    assert (folder / "my_head.npz").is_file()
    loaded = Avatar.from_pretrained(folder)
    assert loaded.config.head_model == "mesh:my_head.npz"
    torch.testing.assert_close(loaded.head_model.mesh.vertices, mesh.vertices * 1.5)
    loaded.save_pretrained(folder)  # saving into its own folder again keeps the mesh
    assert Avatar.from_pretrained(folder).head_model.mesh.vertices.shape == mesh.vertices.shape


def test_failed_save_leaves_no_half_written_files(tiny_avatar, tmp_path, monkeypatch):
    folder = tiny_avatar.save_pretrained(tmp_path / "a")
    before = (folder / "model.safetensors").read_bytes()

    def broken(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(engine.model, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        tiny_avatar.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert (folder / "model.safetensors").read_bytes() == before


@pytest.fixture(scope="module")
def saved(tiny_avatar, tmp_path_factory):
    return tiny_avatar.save_pretrained(tmp_path_factory.mktemp("saved") / "avatar")


def _copy(saved, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((saved / name).read_bytes())
    return folder


def test_missing_files(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        Avatar.from_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing.*save_pretrained"):
        Avatar.from_pretrained(folder)
    with pytest.raises(CheckpointError, match="config.json is missing"):
        Avatar.from_pretrained(tmp_path / "nowhere")


def test_wrong_format_field(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    meta = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**meta, "format": "something-else"}))
    with pytest.raises(CheckpointError, match="not an avatar config"):
        Avatar.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match="upgrade the engine"):
        Avatar.from_pretrained(folder)


def _record(**changes):
    """A TrainedOn of a tiny avatar (8-value code, 128 px): a rig of two cameras 20 degrees either side."""
    fields = {"azimuth_deg": (-20.0, 20.0), "elevation_deg": (-5.0, 10.0), "distance": (0.9, 1.1),
              "code_min": (0.0,) * 8, "code_max": (1.0,) * 7 + (0.5,),
              "rig": tuple(orbit_camera(yaw, size=128).to_dict() for yaw in (-20.0, 20.0))}
    return TrainedOn(**{**fields, **changes})


def test_trained_on_round_trips_through_the_avatar_folder(saved, tmp_path):
    avatar = Avatar.from_pretrained(saved)
    assert avatar.config.trained_on is None  # a preset records no training
    avatar.config = avatar.config.replace(trained_on=_record())
    folder = avatar.save_pretrained(tmp_path / "b")
    meta = json.loads((folder / "config.json").read_text())
    assert meta["format_version"] == 3
    assert meta["trained_on"]["azimuth_deg"] == [-20.0, 20.0] and meta["trained_on"]["code_max"][7] == 0.5
    assert len(meta["trained_on"]["rig"]) == 2 and meta["trained_on"]["rig"][0]["width"] == 128
    loaded = Avatar.from_pretrained(folder).config
    assert loaded.trained_on == _record() and loaded == avatar.config
    assert AvatarConfig.from_dict(json.loads(json.dumps(loaded.to_dict()))) == loaded


def test_a_format_version_1_folder_loads_with_the_range_unknown(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    meta = json.loads((folder / "config.json").read_text())
    del meta["trained_on"]  # version 1 folders have no such key
    (folder / "config.json").write_text(json.dumps({**meta, "format_version": 1}))
    assert Avatar.from_pretrained(folder).config.trained_on is None


def test_trained_on_is_validated():
    with pytest.raises(ConfigError, match="azimuth_deg"):
        _record(azimuth_deg=(20.0, -20.0))
    with pytest.raises(ConfigError, match="distance"):
        _record(distance=(0.0, 1.0))
    with pytest.raises(ConfigError, match="code_min"):
        _record(code_min=(0.0,) * 3)
    with pytest.raises(ConfigError, match="rig"):
        _record(rig=({"R": 1},))
    with pytest.raises(ConfigError, match="3 code dimensions"):
        TINY.replace(trained_on=_record(code_min=(0.0,) * 3, code_max=(1.0,) * 3))
    with pytest.raises(ConfigError, match="rig cameras render"):
        TINY.replace(trained_on=_record(rig=(orbit_camera(size=64).to_dict(),)))


def test_trained_on_tells_what_lies_inside_the_training_range():
    record = _record()
    assert record.contains_camera(orbit_camera(15.0, 5.0, size=128))
    assert record.contains_camera(orbit_camera(-20.0, 10.0, size=32, distance=1.1))  # bounds are inside
    for yaw, pitch, distance in ((25.0, 0.0, 1.0), (0.0, -6.0, 1.0), (0.0, 0.0, 1.2), (0.0, 0.0, 0.85)):
        assert not record.contains_camera(orbit_camera(yaw, pitch, size=128, distance=distance))
    assert record.contains_code([0.5] * 8) and record.contains_code([1.0] * 7 + [0.5])
    assert not record.contains_code([0.5] * 7 + [0.6]) and not record.contains_code([-0.1] + [0.0] * 7)
    with pytest.raises(InputError, match="8"):
        record.contains_code([0.0] * 3)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("unet.conv_in.weight"), r"missing tensor\(s\) \['unet.conv_in.weight'\]"),
        (lambda t: t.update(extra=torch.zeros(1)), r"unexpected tensor\(s\) \['extra'\]"),
        (lambda t: t.update({"textures.planes": torch.zeros(3, 16, 8, 8)}),
         r"textures.planes has shape \(3, 16, 8, 8\), expected \(3, 16, 64, 64\)"),
    ],
)
def test_tensor_mismatches(saved, tmp_path, edit, message):
    folder = _copy(saved, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=message):
        Avatar.from_pretrained(folder)


def test_corrupt_safetensors(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        Avatar.from_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        Avatar.from_pretrained(folder)


# -- a diffusers SD folder and the release layout --------------------------------------------------
def _write_text_encoder(folder):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    (folder / "vocab").mkdir()
    (folder / "vocab" / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2}))
    (folder / "vocab" / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab" / "vocab.json"), str(folder / "vocab" / "merges.txt")).save_pretrained(
        folder / "tokenizer")
    config = CLIPTextConfig(vocab_size=3, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=8, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1)
    CLIPTextModel(config).save_pretrained(folder / "text_encoder")


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    """A tiny diffusers Stable Diffusion folder (random weights, diffusers' own layout)."""
    return write_sd_folder(tmp_path_factory.mktemp("sd"))


def test_from_diffusers_without_text_encoder(sd_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="engine.release"):
        avatar = Avatar.from_diffusers(sd_dir, preset="tiny")
    assert "prompt embedding is zeros" in caplog.text
    assert not avatar.prompt_embedding.any()
    unet = load_file(sd_dir / "unet" / "diffusion_pytorch_model.safetensors")
    vae = load_file(sd_dir / "vae" / "diffusion_pytorch_model.safetensors")
    ours = avatar.state_dict()
    assert all(torch.equal(ours[f"unet.{k}"], v) for k, v in unet.items())
    assert all(torch.equal(ours[f"vae.{k}"], v) for k, v in vae.items())
    assert torch.equal(ours["controlnet.down_blocks.1.attentions.0.proj_in.weight"],
                       unet["down_blocks.1.attentions.0.proj_in.weight"])
    assert not ours["controlnet.controlnet_mid_block.weight"].any()
    block = TINY_BLOCKS[3][0]
    assert torch.equal(ours[f"unet.{block}._expression_attention.to_k.weight"], unet[f"{block}.attn2.to_k.weight"])
    assert not ours[f"unet.{block}._expression_attention.to_out.0.weight"].any()


def test_from_diffusers_prompt_from_text_encoder(sd_dir, tmp_path):
    pytest.importorskip("transformers")
    from transformers import CLIPTextModel

    folder = tmp_path / "sd"
    folder.mkdir()
    for sub in ("unet", "vae"):
        (folder / sub).symlink_to(sd_dir / sub)
    torch.manual_seed(1)
    _write_text_encoder(folder)
    avatar = Avatar.from_diffusers(folder, preset="tiny")
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    with torch.no_grad():  # [BOS, EOS, then EOS padding] to 8 tokens
        want = encoder(torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1]]))[0]
    torch.testing.assert_close(avatar.prompt_embedding, want)
    assert avatar.prompt_embedding.abs().mean() > 0.1


def test_from_diffusers_takes_the_folders_config_or_refuses(tmp_path):
    kwargs = TINY.unet.diffusers_kwargs(TINY.latent_size)
    torch.manual_seed(0)
    UNet2DConditionModel(**{**kwargs, "attention_head_dim": [4, 8, 8]}).save_pretrained(tmp_path / "a" / "unet")
    AutoencoderKL(**TINY.vae.diffusers_kwargs(TINY.image_size)).save_pretrained(tmp_path / "a" / "vae")
    avatar = Avatar.from_diffusers(tmp_path / "a", preset="tiny")
    assert avatar.config.unet.attention_head_dim == (4, 8, 8)
    assert avatar.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.heads == 4

    UNet2DConditionModel(**{**kwargs, "in_channels": 9}).save_pretrained(tmp_path / "b" / "unet")
    (tmp_path / "b" / "vae").symlink_to(tmp_path / "a" / "vae")
    with pytest.raises(ConfigError, match="in_channels=9"):
        Avatar.from_diffusers(tmp_path / "b", preset="tiny")
    with pytest.raises(CheckpointError, match="unet/config.json is missing"):
        Avatar.from_diffusers(tmp_path / "nowhere", preset="tiny")


def test_from_release_imports_every_tensor(sd_dir, tmp_path):
    state = release_state(seed=5)
    avatar = Avatar.from_release(write_release_run(tmp_path / "run", state), sd_dir, person=1, preset="tiny")
    ours = avatar.state_dict()
    for key, value in state.items():
        if key.startswith(("controlnet.", "unet.")):
            assert torch.equal(ours[key], value), key
    assert torch.equal(avatar.expression_proj.weight, state["expression_codes_mlp.weight"])
    assert torch.equal(avatar.expression_proj.bias, state["expression_codes_mlp.bias"])
    # texel (row v, column u), channel c of person 1 is row element (v * R + u) * C + c
    planes = avatar.textures.planes
    for plane, name in enumerate(("uv", "uw", "vw")):
        row = state[f"neural_texture_lookup_{name}.weight"][1]
        for c, v, u in ((0, 0, 0), (3, 5, 17), (15, 63, 1)):
            assert planes[plane, c, v, u] == row[(v * R + u) * C + c]
    row = state["ambient_texture_lookup.weight"][1]
    assert avatar.textures.ambient[7, 2, 40] == row[(2 * R + 40) * C + 7]
    base = load_file(sd_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert torch.equal(ours["unet.conv_in.weight"], base["conv_in.weight"])


def test_from_release_reports_bad_keys_and_person(sd_dir, tmp_path):
    state = release_state(seed=6)
    missing = "controlnet.controlnet_mid_block.weight"
    run = write_release_run(tmp_path / "a" / "run", {k: v for k, v in state.items() if k != missing})
    with pytest.raises(CheckpointError, match=missing):
        Avatar.from_release(run, sd_dir, preset="tiny")
    run = write_release_run(tmp_path / "b" / "run", {**state, "unet.mid_block.extra.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="unet.mid_block.extra.weight"):
        Avatar.from_release(run, sd_dir, preset="tiny")
    run = write_release_run(tmp_path / "c" / "run", state)
    with pytest.raises(InputError, match="3 people"):
        Avatar.from_release(run, sd_dir, person=3, preset="tiny")
    with pytest.raises(CheckpointError, match="checkpoints is missing"):
        Avatar.from_release(tmp_path / "nowhere", sd_dir, preset="tiny")
