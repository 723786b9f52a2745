import pytest
import torch
from diffusers import UNet2DConditionModel

from engine.config import ARKIT8, from_preset
from engine.errors import ConfigError, InputError
from engine.init import tensor_seed, uniform_like
from engine.model import Avatar


def _inputs(avatar, batch=2, seed=0):
    c = avatar.config
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(batch, c.vae.latent_channels, c.latent_size, c.latent_size, generator=g)
    condition = torch.rand(batch, c.condition_channels, c.image_size, c.image_size, generator=g) * 2 - 1
    codes = torch.rand(batch, c.expression_dim, generator=g)
    return latent, torch.tensor(999), condition, avatar.expression_tokens(codes)


# stabilityai/stable-diffusion-2-1's published unet/config.json and vae/config.json (the fields that size weights),
# written out here so the counts below come from diffusers and the model card, not from this project's config.
SD21_UNET = dict(
    in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, norm_num_groups=32, use_linear_projection=True,
    upcast_attention=True, sample_size=96,
)
SD21_VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=768,
)


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_sd21_structure_on_meta_allocates_nothing():
    from diffusers import AutoencoderKL, ControlNetModel

    with torch.device("meta"):
        avatar = Avatar.from_preset("sd21")
        unet = UNet2DConditionModel(**SD21_UNET)
        controlnet = ControlNetModel(**{k: v for k, v in SD21_UNET.items() if k not in ("out_channels",
                                        "up_block_types", "sample_size")}, conditioning_channels=73,
                                     conditioning_embedding_out_channels=(16, 32, 96, 256))
        vae = AutoencoderKL(**SD21_VAE)
    assert all(p.is_meta for p in avatar.parameters()) and avatar.is_meta
    counts = avatar.parameter_counts()
    assert counts["unet"] == _numel(unet) == 865_910_724  # SD 2.1's UNet (the model card's count), no expression
    assert counts["controlnet"] == _numel(controlnet)  # a ControlNet of that UNet with 73 conditioning channels
    assert counts["vae_decoder"] == _numel(vae.decoder) + _numel(vae.post_quant_conv)
    assert counts["vae_encoder"] == _numel(vae.encoder) + _numel(vae.quant_conv)
    # expression attention, counted by hand: in each of the 15 transformer blocks of the cross-attention down (2 per
    # level) and up (3 per level) blocks of width d, to_q d x d and to_out d x d + d against the hidden states, to_k
    # and to_v 1024 x d against the 1024-wide tokens (no q/k/v biases, as SD's attn2)
    widths = [320, 320, 640, 640, 1280, 1280] + [1280] * 3 + [640] * 3 + [320] * 3
    assert counts["expression_attention"] == sum(2 * d * d + d + 2 * 1024 * d for d in widths) == 44_452_800
    assert counts["expression_projection"] == 206 * 4 * 1024 + 4 * 1024  # 206 code values -> 4 tokens of 1024
    assert counts["textures"] == 4 * 16 * 512 * 512  # 3 planes + the ambient map, 16 features, 512 x 512
    assert sum(counts.values()) == sum(p.numel() for p in avatar.parameters())
    paths = avatar.expression_attention_paths()
    assert len(paths) == 15 and not any(p.startswith("mid_block") for p in paths)
    assert avatar.config.condition_channels == 73 == avatar.controlnet.config.conditioning_channels
    assert avatar.prompt_embedding.shape == (1, 77, 1024)
    # the head model is real data, not meta, and no part of the weights
    assert not avatar.head_model.mesh.vertices.is_meta
    assert not any(k.startswith("head_model") for k in avatar.state_dict())


def test_unknown_preset_and_init():
    with pytest.raises(ConfigError, match="nope"):
        Avatar.from_preset("nope")
    with pytest.raises(ConfigError, match="init"):
        Avatar.from_preset("tiny", init="zeros")


def test_seeded_init_is_reproducible_and_seed_dependent():
    a, b, c = (Avatar.from_preset("tiny", seed=s).state_dict() for s in (0, 0, 1))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    differs = [k for k in a if not torch.equal(a[k], c[k])]
    # only tensors that the rule fills with a constant (norm weights) are the same for every seed
    assert len(differs) > 0.5 * len(a)
    assert "unet.conv_in.weight" in differs and "textures.planes" in differs


def test_seeded_init_follows_its_definition():
    """The same weights on every machine and torch version: a tensor's seed is the first 8 bytes of
    sha256("{seed}:{name}") as a little-endian integer, halved (hashlib, not the code under test), and its values are
    torch's CPU uniform draws, which are MT19937 (seeded with the low 32 bits) outputs keeping 24 bits:
    u = (x mod 2^24) / 2^24, drawn here by numpy's independent MT19937; then (u - 0.5) std sqrt(12)."""
    import hashlib

    import numpy as np

    for seed, name in ((0, "unet.conv_in.weight"), (7, "textures.planes")):
        want = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1
        assert tensor_seed(seed, name) == want
    raw = np.random.RandomState(tensor_seed(0, "y") & 0xFFFFFFFF).randint(0, 2**32, size=10_000, dtype=np.uint64)
    u = (raw % 2**24).astype(np.float32) / np.float32(2**24)
    want = (u - np.float32(0.5)) * np.float32(2.0 * 12**0.5)
    torch.testing.assert_close(uniform_like((10_000,), 2.0, 0, "y"), torch.from_numpy(want), rtol=0, atol=1e-6)


def test_random_init_is_not_degenerate(tiny_avatar):
    avatar = tiny_avatar
    assert avatar.controlnet.controlnet_mid_block.weight.abs().mean() > 0
    path = avatar.expression_attention_paths()[0]
    assert avatar.unet.get_submodule(path)._expression_attention.to_out[0].weight.abs().mean() > 0
    latent, t, condition, tokens = _inputs(avatar)
    with torch.no_grad():
        v = avatar.predict(latent, t, condition, tokens)
        assert v.shape == latent.shape and torch.isfinite(v).all() and 0.05 < v.std() < 20
        other_code = avatar.predict(latent, t, condition, tokens.flip(0))
        other_condition = avatar.predict(latent, t, condition.flip(0), tokens)
        image = avatar.decode(latent)
    assert (v - other_code).abs().mean() > 1e-3 * v.abs().mean()
    assert (v - other_condition).abs().mean() > 1e-3 * v.abs().mean()
    assert image.shape == (2, 3, 128, 128) and torch.isfinite(image).all()
    assert (image.abs() < 1).float().mean() > 0.5  # not saturated at +-1 everywhere
    assert image.std() > 0.05


def test_training_init_is_the_release_start():
    avatar = Avatar.from_preset("tiny", init="training", seed=3)
    cn, unet = avatar.controlnet, avatar.unet
    assert torch.equal(cn.down_blocks[0].resnets[0].conv1.weight, unet.down_blocks[0].resnets[0].conv1.weight)
    assert torch.equal(cn.mid_block.attentions[0].proj_in.weight, unet.mid_block.attentions[0].proj_in.weight)
    assert torch.equal(cn.time_embedding.linear_1.weight, unet.time_embedding.linear_1.weight)
    assert not any(p.any() for m in (cn.controlnet_down_blocks, cn.controlnet_mid_block) for p in m.parameters())
    assert not cn.controlnet_cond_embedding.conv_out.weight.any()  # diffusers' zero_module, as from_unet
    assert cn.controlnet_cond_embedding.conv_in.weight.any()
    for path in avatar.expression_attention_paths():
        block = unet.get_submodule(path)
        assert torch.equal(block._expression_attention.to_v.weight, block.attn2.to_v.weight)
        assert not block._expression_attention.to_out[0].weight.any()

    # so predict is the plain UNet on the empty prompt, whatever the condition and code
    plain = UNet2DConditionModel(**avatar.config.unet.diffusers_kwargs(avatar.config.latent_size)).eval()
    plain.load_state_dict({k: v for k, v in unet.state_dict().items() if "_expression_attention" not in k})
    latent, t, condition, tokens = _inputs(avatar)
    with torch.no_grad():
        got = avatar.predict(latent, t, condition, tokens)
        want = plain(latent, t, encoder_hidden_states=avatar.prompt_embedding.expand(2, -1, -1)).sample
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_expression_tokens(tiny_avatar):
    avatar = tiny_avatar
    code = torch.linspace(0, 1, 8)
    tokens = avatar.expression_tokens(code)
    assert tokens.shape == (1, 4, 32) and tokens.dtype == torch.float32
    want = (code @ avatar.expression_proj.weight.T + avatar.expression_proj.bias).view(1, 4, 32)
    torch.testing.assert_close(tokens, want)
    assert avatar.expression_tokens(torch.stack([code, code.flip(0)])).shape == (2, 4, 32)
    with pytest.raises(InputError, match=r"7 values, avatar 'tiny' expects 8 \(jawOpen, mouthSmileLeft"):
        avatar.expression_tokens(torch.zeros(7))
    with pytest.raises(InputError, match="NaN or Inf"):
        avatar.expression_tokens(torch.tensor([float("nan")] + [0.0] * 7))
    with pytest.raises(InputError, match="expects 8"):
        avatar.expression_tokens(torch.zeros(2, 2, 8))
    assert avatar.config.expression_names == ARKIT8


def test_predict_and_decode_reject_bad_shapes(tiny_avatar):
    avatar = tiny_avatar
    latent, t, condition, tokens = _inputs(avatar)
    with pytest.raises(InputError, match="condition must be"):
        avatar.predict(latent, t, condition[:, :9], tokens)
    with pytest.raises(InputError, match="tokens must be"):
        avatar.predict(latent, t, condition, tokens[:1])
    with pytest.raises(InputError, match="latent must be"):
        avatar.predict(latent[:, :3], t, condition, tokens)
    with pytest.raises(InputError, match="timestep"):
        avatar.predict(latent, torch.tensor([1, 2, 3]), condition, tokens)
    with pytest.raises(InputError, match="decode needs"):
        avatar.decode(latent[0])


@pytest.mark.parametrize("vae_blocks, channels, embedding", [
    ((16, 32, 32, 32), 8, (16, 16, 32, 32)),  # an 8-channel latent at 1/8 of the image
    ((16, 32, 64), 4, (16, 32, 32)),  # the demo avatar's shape: a 4-channel latent at 1/4
])
def test_latent_shape_follows_the_vae(vae_blocks, channels, embedding):
    """The VAE's latent channels and downsampling size the UNet's and ControlNet's ends, the ControlNet's
    conditioning embedding and the sampler's noise, and a frame renders through them."""
    import dataclasses

    from engine.renderer import Renderer
    from engine.sequence import orbit

    tiny = from_preset("tiny")
    vae = dataclasses.replace(tiny.vae, block_out_channels=vae_blocks, latent_channels=channels)
    avatar = Avatar(tiny.replace(vae=vae, conditioning_embedding_channels=embedding)).eval()
    side = tiny.image_size // 2 ** (len(vae_blocks) - 1)
    assert avatar.config.latent_size == side
    assert avatar.unet.config.in_channels == avatar.unet.config.out_channels == channels
    assert avatar.controlnet.config.in_channels == channels
    latent, t, condition, tokens = _inputs(avatar)
    assert latent.shape[1:] == (channels, side, side)
    with torch.no_grad():
        assert avatar.predict(latent, t, condition, tokens).shape == latent.shape
        assert avatar.decode(latent).shape == (2, 3, tiny.image_size, tiny.image_size)
    frame = orbit(avatar.config, frames=1)[0]
    assert Renderer(avatar, steps=2).render(frame.camera, frame.expression).shape == (tiny.image_size,) * 2 + (3,)


def test_head_model_spec_none():
    avatar = Avatar(from_preset("tiny").replace(head_model="none"))
    assert avatar.head_model is None
