"""The tiny decoder's per-stage widths (issue 14): a uniform-width one is diffusers' `DecoderTiny`, a narrowing one has
the hand-counted shape, and its avatar folder round-trips."""

import numpy as np
import pytest
import torch
from diffusers.models.autoencoders.vae import DecoderTiny

from engine.cli import main
from engine.config import from_preset
from engine.errors import ConfigError
from engine.evaluation.held_out import training_rig
from engine.model import Avatar
from engine.recipe import TinyDecoderConfig
from engine.schema import build_dataclass
from engine.tiny_decoder import build_tiny_decoder
from engine.training.decoder import DistillConfig, distill_decoder, training_frames, write_avatar


def test_a_uniform_width_decoder_is_diffusers_decoder_tiny():
    torch.manual_seed(0)
    theirs = DecoderTiny(in_channels=4, out_channels=3, num_blocks=(2, 1, 1), block_out_channels=(8, 8, 8),
                         upsampling_scaling_factor=2, act_fn="relu", upsample_fn="nearest").eval()
    ours = build_tiny_decoder(TinyDecoderConfig(latent_channels=4, channels=8, blocks=(2, 1, 1))).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(z), theirs(z), rtol=0, atol=0)


def test_per_stage_widths_have_the_hand_counted_shape():
    decoder = build_tiny_decoder(TinyDecoderConfig(latent_channels=4, channels=(8, 4, 2), blocks=(1, 1, 1)))
    convs = [m for m in decoder.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    # conv_in 4->8, block 3x(8->8), 8->4, block 3x(4->4), 4->2, block 3x(2->2), 2->3
    assert [(c.in_channels, c.out_channels) for c in convs] == [(4, 8), *[(8, 8)] * 3, (8, 4), *[(4, 4)] * 3, (4, 2),
                                                                *[(2, 2)] * 3, (2, 3)]
    # by hand: 296 + 3 * 584 + 288 + 3 * 148 + 72 + 3 * 38 + 57 (weights 9 * in * out, biases in the blocks, the
    # first conv and the last)
    assert sum(p.numel() for p in decoder.parameters()) == 3023
    assert decoder(torch.randn(1, 4, 5, 6)).shape == (1, 3, 20, 24)


def test_widths_are_read_from_json_as_an_integer_or_a_list():
    read = build_dataclass(TinyDecoderConfig, {"latent_channels": 4, "channels": [8, 4, 2], "blocks": [1, 1, 1]})
    assert read == TinyDecoderConfig(4, (8, 4, 2), (1, 1, 1)) and read.widths == (8, 4, 2)
    assert build_dataclass(TinyDecoderConfig, {"channels": 24, "blocks": [3, 3, 1]}).widths == (24, 24, 24)
    with pytest.raises(ConfigError, match=r"channels\[1\] must be an integer"):
        build_dataclass(TinyDecoderConfig, {"channels": [8, "4", 2], "blocks": [1, 1, 1]})
    with pytest.raises(ConfigError, match="channels must be an integer or a list"):
        build_dataclass(TinyDecoderConfig, {"channels": "8"})
    with pytest.raises(ConfigError, match="2 widths for 3 stages"):
        TinyDecoderConfig(4, (8, 4), (1, 1, 1))


def test_a_retrained_decoder_of_another_shape_replaces_the_old_one(tmp_path):
    old = TinyDecoderConfig(latent_channels=4, channels=8, blocks=(1, 1, 1, 1))
    avatar = Avatar(from_preset("tiny").replace(tiny_decoder=old), seed=0)
    shape = TinyDecoderConfig(latent_channels=4, channels=(8, 8, 4, 4), blocks=(2, 1, 1, 1))
    torch.manual_seed(1)
    decoder = build_tiny_decoder(shape)
    write_avatar(avatar, decoder, shape, tmp_path / "new", record=None)
    loaded = Avatar.from_pretrained(tmp_path / "new")
    assert loaded.config.tiny_decoder == shape
    for key, value in decoder.state_dict().items():
        torch.testing.assert_close(loaded.tiny_decoder.state_dict()[key], value, rtol=0, atol=0)


def test_a_fresh_run_remakes_a_bank_made_with_other_settings(tmp_path):
    config = from_preset("tiny").replace(head_model="synthetic", synthetic_version=1)
    avatar = Avatar(config, seed=1)
    shape = TinyDecoderConfig(latent_channels=4, channels=4, blocks=(1, 1, 1, 1))
    first = DistillConfig(decoder=shape, recipes=(), frames=2, steps=1, batch_size=1, crop=4)
    distill_decoder(avatar, tmp_path / "run", first, held_out=1)
    (tmp_path / "run" / "distill" / "checkpoint.pt").unlink()
    # the old bank holds 2 frames and no VAE images; this run needs 3 frames with them
    second = DistillConfig(decoder=shape, recipes=(), target="vae", frames=3, steps=1, batch_size=1, crop=4)
    assert distill_decoder(avatar, tmp_path / "run", second, held_out=1)["done"]
    bank = torch.load(tmp_path / "run" / "distill" / "bank.pt", weights_only=True)
    assert bank["images"].shape[0] == 3 and bank["vae_images"].shape[:2] == (1, 3)
    assert bank["made_by"]["frames"] == 3 and bank["made_by"]["vae_images"]


def test_cli_recipes_none_learns_from_the_encoders_latents_only(tmp_path):
    folder = Avatar(from_preset("tiny").replace(head_model="synthetic", synthetic_version=1), seed=1).save_pretrained(
        tmp_path / "avatar")
    assert main(["distill-decoder", "--avatar", str(folder), "--out", str(tmp_path / "out"), "--recipes", "none",
                 "--channels", "4", "--blocks", "1,1,1,1", "--frames", "2", "--steps", "1", "--batch-size", "1",
                 "--crop", "4", "--held-out", "1"]) == 0
    bank = torch.load(tmp_path / "out" / "distill" / "bank.pt", weights_only=True)
    assert bank["made_by"]["recipes"] == [] and bank["latents"].shape[:2] == (1, 2)


@pytest.mark.parametrize("flags, message", [(["--channels", "8,4"], "2 widths for 4 stages"),
                                            (["--channels", "8,x"], "comma-separated positive integers"),
                                            (["--blocks", "1,0,1,1"], "comma-separated positive integers")])
def test_cli_refuses_a_bad_decoder_shape(flags, message, tmp_path, capsys):
    assert main(["distill-decoder", "--avatar", "tiny", "--out", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("avatar distill-decoder: error:") and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def _nearest_rig_angle(camera, rig) -> float:
    d = camera.center.double().numpy() / np.linalg.norm(camera.center.double().numpy())
    return min(float(np.arccos(np.clip(d @ (c.center.double().numpy() / np.linalg.norm(c.center.double().numpy())),
                                       -1, 1))) for c in rig)


def test_around_cameras_lie_between_the_rigs_within_half_its_spacing():
    avatar = Avatar(from_preset("tiny").replace(head_model="synthetic", synthetic_version=1), seed=1)
    rig = training_rig(avatar.config)
    # the spacing by its definition: the median over cameras of the angle to the nearest other camera
    spacing = float(np.median([_nearest_rig_angle(c, [o for o in rig if o is not c]) for c in rig]))
    on_rig = [_nearest_rig_angle(f.camera, rig) for f in training_frames(avatar, 6, seed=3)]
    around = training_frames(avatar, 6, seed=3, cameras="around")
    angles = [_nearest_rig_angle(f.camera, rig) for f in around]
    assert max(on_rig) < 1e-5
    assert max(angles) <= spacing / 2 + 1e-5 and sum(a > 1e-3 for a in angles) >= 5
    for f in around:  # a turn about the head's centre keeps the distance to it and the view on it
        assert abs(float(f.camera.center.norm()) - float(rig[0].center.norm())) < 1e-4
        assert f.image.shape[-1] == avatar.config.image_size and f.mask.sum() > 0


def test_cli_refuses_around_cameras_for_a_dataset(tmp_path, capsys):
    assert main(["distill-decoder", "--avatar", "tiny", "--out", str(tmp_path / "out"), "--data", str(tmp_path),
                 "--cameras", "around"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("avatar distill-decoder: error:") and "a dataset's frames keep their own cameras" in err
    assert not (tmp_path / "out").exists()
