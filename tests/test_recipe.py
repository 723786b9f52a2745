"""The recipe recorded with an avatar, its tiny decoder and the one-frame-in-flight stream (issue 14)."""

import json

import numpy as np
import pytest
import torch

from engine.cli import main
from engine.config import from_preset
from engine.errors import ConfigError
from engine.frame import to_pixels
from engine.model import CONFIG_FILE, FORMAT_VERSION, Avatar
from engine.pipeline import RenderPipeline
from engine.recipe import Recipe, TinyDecoderConfig, parse_recipe, parse_recipes
from engine.renderer import Renderer
from engine.sequence import orbit
from engine.tiny_decoder import build_tiny_decoder
from engine.training.decoder import DistillConfig, distill_decoder

# The tiny preset's VAE downsamples by 8: a tiny decoder needs four stages (three upsamplings by 2).
SMALL = TinyDecoderConfig(latent_channels=4, channels=8, blocks=(1, 1, 1, 1))


@pytest.fixture(scope="module")
def recipe_avatar():
    config = from_preset("tiny").replace(tiny_decoder=SMALL, recipe=Recipe("ddim", 2, "tiny"))
    return Avatar(config, seed=3)


@pytest.fixture(scope="module")
def frames(recipe_avatar):
    return orbit(recipe_avatar.config, frames=3)


def test_parse_recipe():
    assert parse_recipe("ddim:2") == Recipe("ddim", 2, "vae")
    assert parse_recipe(" ddpm:20+tiny ") == Recipe("ddpm", 20, "tiny")
    assert parse_recipe("ddim:1", decoder="tiny") == Recipe("ddim", 1, "tiny")
    assert [str(r) for r in parse_recipes("ddim:1,ddpm:20", "vae,tiny")] == [
        "ddim:1+vae", "ddim:1+tiny", "ddpm:20+vae", "ddpm:20+tiny"]
    assert parse_recipes("ddim:1+tiny,ddim:1", "tiny") == [Recipe("ddim", 1, "tiny")]  # no duplicates


@pytest.mark.parametrize("text", ["ddim", "ddim:", "euler:2", "ddim:0", "ddim:51", "ddim:2+big", "ddim:two", ""])
def test_unknown_recipes_are_clear_errors(text):
    with pytest.raises(ConfigError, match="recipe"):
        parse_recipes(text) if text == "" else parse_recipe(text)


def test_tiny_decoder_of_the_wrong_latent_shape_is_refused():
    base = from_preset("tiny")
    with pytest.raises(ConfigError, match="8-channel latents"):
        base.replace(tiny_decoder=TinyDecoderConfig(latent_channels=8, channels=8, blocks=(1, 1, 1, 1)))
    with pytest.raises(ConfigError, match="upsamples by 4"):
        base.replace(tiny_decoder=TinyDecoderConfig(latent_channels=4, channels=8, blocks=(1, 1, 1)))
    with pytest.raises(ConfigError, match="has none"):
        base.replace(recipe=Recipe("ddim", 1, "tiny"))


def test_tiny_decoder_maps_the_latent_to_the_image_size():
    out = build_tiny_decoder(SMALL)(torch.randn(2, 4, 16, 16))
    assert out.shape == (2, 3, 128, 128)


def test_tiny_decoder_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    decoder = build_tiny_decoder(TinyDecoderConfig(latent_channels=4, channels=8, blocks=(1, 1, 1)))
    latents = torch.randn(4, 4, 8, 8)
    target = torch.rand(4, 3, 32, 32) * 2 - 1
    optimiser = torch.optim.Adam(decoder.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(decoder(latents), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


def test_folder_round_trips_and_renders_with_the_recipe(recipe_avatar, frames, tmp_path):
    recipe_avatar.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert meta["format_version"] == FORMAT_VERSION == 3
    assert meta["recipe"] == {"sampler": "ddim", "steps": 2, "decoder": "tiny", "denoiser": "own"}
    loaded = Avatar.from_pretrained(tmp_path)
    assert loaded.config == recipe_avatar.config
    for key, value in recipe_avatar.tiny_decoder.state_dict().items():
        torch.testing.assert_close(loaded.tiny_decoder.state_dict()[key], value, rtol=0, atol=0)
    renderer = Renderer(loaded)
    assert renderer.recipe == Recipe("ddim", 2, "tiny") and renderer.sampler.num_steps == 2
    f = frames[0]
    frame = renderer.render(f.camera, f.expression)
    # independently: the final latent through the stored tiny decoder, to 8 bits
    latent = renderer.latents([f.camera], torch.as_tensor(f.expression)[None].float())
    with torch.no_grad():
        expected = to_pixels(loaded.tiny_decoder(latent))[0].numpy()
    np.testing.assert_array_equal(frame, expected)
    vae = Renderer(loaded, decoder="vae", steps=1)  # every argument overrides the recipe
    assert vae.recipe == Recipe("ddim", 1, "vae")
    assert np.abs(vae.render(f.camera, f.expression).astype(int) - frame).mean() > 1


def test_older_folders_load_with_the_release_recipe(tmp_path):
    Avatar.from_preset("tiny").save_pretrained(tmp_path)
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    for key in ("recipe", "tiny_decoder"):
        del meta[key]
    meta["format_version"] = 2
    (tmp_path / CONFIG_FILE).write_text(json.dumps(meta))
    avatar = Avatar.from_pretrained(tmp_path)
    assert avatar.config.recipe is None and avatar.tiny_decoder is None
    assert Renderer(avatar).recipe == Recipe("ddpm", 20, "vae")
    with pytest.raises(ConfigError, match="no tiny decoder"):
        Renderer(avatar, decoder="tiny")


def test_depth_1_stream_yields_the_frames_of_render(recipe_avatar, frames):
    renderer = Renderer(recipe_avatar)
    rendered = [renderer.render(f.camera, f.expression) for f in frames]
    for streamed in (list(renderer.stream(frames, depth=1)), list(RenderPipeline(renderer, depth=1).run(frames))):
        assert len(streamed) == len(rendered)
        for a, b in zip(streamed, rendered):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ConfigError, match="depth"):
        list(renderer.stream(frames, depth=4))


def _synthetic_tiny(tmp_path):
    """A random-weight tiny avatar on the synthetic head (which renders the truth the decoder trains toward)."""
    config = from_preset("tiny").replace(head_model="synthetic", synthetic_version=1)
    return Avatar(config, seed=1).save_pretrained(tmp_path / "synthetic-tiny")


def test_distill_decoder_resumes_to_the_uninterrupted_run(tmp_path):
    avatar = Avatar.from_pretrained(_synthetic_tiny(tmp_path))
    config = DistillConfig(decoder=SMALL, recipes=("ddim:1",), frames=4, steps=4, batch_size=2, crop=8)
    whole = distill_decoder(avatar, tmp_path / "whole", config, held_out=2)
    assert whole["done"] and set(whole["result"]) >= {"encoder", "ddim:1"}
    part = distill_decoder(avatar, tmp_path / "part", config, held_out=2, max_minutes=0)
    assert part == {"done": False, "step": 1}
    with pytest.raises(Exception, match="--resume"):
        distill_decoder(avatar, tmp_path / "part", config, held_out=2)
    assert distill_decoder(avatar, tmp_path / "part", config, held_out=2, resume=True)["done"]
    a, b = (Avatar.from_pretrained(tmp_path / name) for name in ("whole", "part"))
    assert a.config.tiny_decoder == SMALL
    for key, value in a.tiny_decoder.state_dict().items():
        torch.testing.assert_close(b.tiny_decoder.state_dict()[key], value, rtol=0, atol=0)


def test_cli_distill_decoder_and_eval_recipes(tmp_path, capsys):
    folder = _synthetic_tiny(tmp_path)
    out = tmp_path / "with-tiny"
    assert main(["distill-decoder", "--avatar", str(folder), "--out", str(out), "--frames", "4", "--steps", "2",
                 "--batch-size", "2", "--crop", "8", "--channels", "8", "--blocks", "1,1,1,1", "--recipes", "ddim:1",
                 "--held-out", "2", "--record", "ddim:1+tiny"]) == 0
    assert Avatar.from_pretrained(out).config.recipe == Recipe("ddim", 1, "tiny")
    stem = tmp_path / "recipes"
    assert main(["eval", "--avatar", str(out), "--frames", "2", "--recipes", "ddim:1", "--decoders", "vae,tiny",
                 "--out", str(stem), "--device", "cpu"]) == 0
    result = json.loads(stem.with_suffix(".json").read_text())
    assert [r["recipe"] for r in result["recipes"]] == ["ddim:1+vae", "ddim:1+tiny"]
    assert stem.with_suffix(".png").read_bytes()[:4] == b"\x89PNG" and stem.with_suffix(".md").is_file()
    capsys.readouterr()
    assert main(["eval", "--avatar", str(out), "--recipes", "ddim:x", "--out", str(stem)]) == 2
    assert "avatar eval: error: unknown recipe 'ddim:x'" in capsys.readouterr().err
    assert main(["distill-decoder", "--avatar", str(folder), "--out", str(tmp_path / "bad"), "--blocks", "1,1"]) == 2
    assert "upsamples by 2" in capsys.readouterr().err


def test_the_shipped_demo_carries_its_recipe_and_tiny_decoder():
    from engine.avatars import SHIPPED, resolve_avatar

    config = resolve_avatar("demo").config()
    assert config.recipe == Recipe("ddim", 1, "tiny")  # README, "The real-time recipe": why DDIM 1 + tiny
    assert config.tiny_decoder == TinyDecoderConfig(latent_channels=4, channels=(48, 16, 8), blocks=(4, 3, 1))
    assert sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file()) <= 30 * 10**6  # 30 MB, as the README counts


def test_the_compiled_backend_decodes_with_the_trained_tiny_decoder(recipe_avatar, frames):
    ref = Renderer(recipe_avatar)  # the recipe: DDIM 2 + the tiny decoder
    fast = Renderer(recipe_avatar, backend="compiled", dtype="float32", backend_options={"graphs": False})
    assert fast.recipe == ref.recipe and fast.backend.nets.decoder_name == "tiny"
    f = frames[1]
    a, b = (r.render(f.camera, f.expression).astype(int) for r in (ref, fast))
    assert np.abs(a - b).max() <= 1  # float32 on both sides: rounding only (a random decoder differs by far more)
