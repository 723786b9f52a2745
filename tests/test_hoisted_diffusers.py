"""The hoisted forward (`engine/backends/hoisted.py`) pinned to diffusers' own forward, on the CPU in float32.

`HoistedNetworks.prepare` + `.predict` re-implement diffusers' `ControlNetModel.forward` and
`UNet2DConditionModel.forward` with the per-run constants taken out (time-embedding tables, cached text and
expression keys/values, fused self-attention q/k/v, the conditioning embedding once per frame). The reference here
is diffusers' forward itself, called as the unbound class methods on the same modules with
`down_block_additional_residuals` / `mid_block_additional_residual` and the expression tokens in
`cross_attention_kwargs`, not `Avatar.predict` (the project's own code is no independent reference).

Two network shapes: the `tiny` preset, and one Stable Diffusion 2.1-shaped level (the sd21 preset's block settings:
linear projections, head width 64, upcast attention, 2 layers per block, 32 norm groups, 1024-wide text and
tokens, 77 prompt tokens, the (16, 32, 96, 256) conditioning embedding) at 128 channels, so it runs in about a
second. Every step of a 4-step sampler is compared, so a wrong step index or time table is caught, not only
step 0.

Tolerance: float32, max |hoisted - diffusers| <= tol * max |diffusers| with tol = 1e-5 for contiguous weights and
3e-5 channels-last. Measured (this CPU, diffusers 0.42.1, torch 2.13): 4e-7 .. 7e-7 contiguous, 1.3e-6 .. 3.2e-6
channels-last (max abs 1e-6 .. 6e-6 on |v| ~2-4): float32 rounding of GEMMs and convolutions split or laid out
differently (the fused q/k/v GEMM, the time table computed as one [N, D] batch, channels-last conv kernels), so the
bounds leave ~10x for other CPUs' kernels. Structural drift is 3e-2 .. 1 relative, three orders of magnitude over
them (tried by hand: down or mid residual adds dropped, conditioning embedding dropped, time table zero / always
row 0 / step index off by one, expression K/V cached once and never refreshed: each fails).
"""

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from engine.backends.hoisted import HoistedNetworks
from engine.conditioning import build_condition
from engine.config import AvatarConfig, ConditioningConfig, UNetConfig, VAEConfig, from_preset
from engine.expression import TOKENS_KWARG
from engine.model import Avatar
from engine.raster import rasterize
from engine.sampling import NoiseSchedule, make_sampler
from engine.sequence import orbit

REL_TOL = {False: 1e-5, True: 3e-5}  # by channels_last
STEPS = 4


def sd21_level_config() -> AvatarConfig:
    """One down/up level of the sd21 preset's UNet (plus its last, attention-free level and the cross-attention
    mid block), at 128 channels: 2 heads of width 64 (sd21: 5/10/20 heads of 64); every other block setting is
    the sd21 preset's."""
    sd21 = from_preset("sd21")
    unet = UNetConfig(
        block_out_channels=(128, 128),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=sd21.unet.layers_per_block,
        attention_head_dim=(2, 2),
        cross_attention_dim=sd21.unet.cross_attention_dim,
        norm_num_groups=sd21.unet.norm_num_groups,
        use_linear_projection=sd21.unet.use_linear_projection,
        upcast_attention=sd21.unet.upcast_attention,
    )
    return sd21.replace(
        name="sd21-level",
        image_size=128,
        unet=unet,
        vae=VAEConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=8),
        conditioning=ConditioningConfig(texture_resolution=8),
    )


@pytest.fixture(scope="module")
def sd21_level():
    return Avatar(sd21_level_config(), init="random", seed=3).eval().requires_grad_(False)


def test_the_sd21_level_keeps_the_sd21_block_settings(sd21_level):
    """The small network really has the sd21 block settings the hoisted code must handle (not the tiny's)."""
    avatar = sd21_level
    sd21 = from_preset("sd21")
    cfg = avatar.unet.config
    assert cfg.use_linear_projection and cfg.upcast_attention and cfg.layers_per_block == 2
    assert cfg.cross_attention_dim == 1024 and cfg.norm_num_groups == 32
    block = avatar.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    for attn in (block.attn1, block.attn2, block._expression_attention):
        assert attn.heads == 2 and attn.inner_dim // attn.heads == 64 and attn.upcast_attention
    assert avatar.config.conditioning_embedding_channels == sd21.conditioning_embedding_channels
    assert avatar.prompt_embedding.shape == (1, 77, 1024)
    assert len(avatar.expression_attention_paths()) == 2 * 1 + 3 * 1  # down: 2 layers; up: 3 layers


def _case(avatar):
    """(condition [2, C, H, W], tokens [2, T, D], latent [2, c, h, w]): two different frames in a batch."""
    gen = torch.Generator().manual_seed(11)
    if avatar.config.name == "tiny":
        frames = orbit(avatar.config, frames=4)
        conds, codes = [], []
        for f in frames[:2]:
            code = torch.as_tensor(f.expression)
            raster = rasterize(avatar.head_model.posed_mesh(code), f.camera)
            conds.append(build_condition(raster, avatar.textures, avatar.config.conditioning))
            codes.append(code)
        cond, codes = torch.cat(conds), torch.stack(codes)
        codes[0] += torch.rand(codes.shape[1], generator=gen)  # every code dimension live in one frame
    else:
        c = avatar.config
        cond = torch.rand(2, c.condition_channels, c.image_size, c.image_size, generator=gen) * 2 - 1
        codes = torch.randn(2, c.expression_dim, generator=gen)
    tokens = avatar.expression_tokens(codes)
    c = avatar.config
    latent = torch.randn(2, c.vae.latent_channels, c.latent_size, c.latent_size, generator=gen)
    return cond, tokens, latent


def diffusers_forward(avatar, x, t, cond, tokens):
    """v from diffusers' own forwards: ControlNet residuals into the UNet (conditioning scale 1, the release's)."""
    assert type(avatar.controlnet) is ControlNetModel and type(avatar.unet) is UNet2DConditionModel
    prompt = avatar.prompt_embedding.expand(x.shape[0], -1, -1)
    down, mid = ControlNetModel.forward(avatar.controlnet, x, t, encoder_hidden_states=prompt,
                                        controlnet_cond=cond, conditioning_scale=1.0, return_dict=False)
    return UNet2DConditionModel.forward(avatar.unet, x, t, encoder_hidden_states=prompt,
                                        down_block_additional_residuals=down, mid_block_additional_residual=mid,
                                        cross_attention_kwargs={TOKENS_KWARG: tokens}, return_dict=False)[0]


def _max_rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("name", ["tiny", "sd21-level"])
@torch.no_grad()
def test_hoisted_forward_is_diffusers_forward(request, tiny_avatar, name, channels_last):
    """Every step i of a 4-step DDPM run: `predict(i, x, prepare(cond, tokens), tokens)` equals diffusers'
    forward at t = timesteps[i] on a batch of two different frames (condition, tokens, latent), to float32
    rounding, contiguous and channels-last. Then a second frame's tokens: the per-frame expression K/V cache is
    refreshed by `prepare` (not stale), and the tokens change v."""
    avatar = tiny_avatar if name == "tiny" else request.getfixturevalue("sd21_level")
    cond, tokens, latent = _case(avatar)
    sampler = make_sampler("ddpm", NoiseSchedule(avatar.config.schedule), STEPS)
    nets = HoistedNetworks(avatar, sampler.timesteps, torch.float32, torch.device("cpu"), channels_last=channels_last)
    tol = REL_TOL[channels_last]
    emb = nets.prepare(cond, tokens)
    for i, t in enumerate(sampler.timesteps.tolist()):
        x = latent * (1 + i)  # a different sample per step
        ref = diffusers_forward(avatar, x, torch.tensor(t), cond, tokens)
        got = nets.predict(i, x, emb, tokens)
        assert got.shape == ref.shape and got.dtype == torch.float32
        err = _max_rel(got, ref)
        assert err <= tol, f"{name} step {i} (t={t}): max rel error {err:.2e} > {tol:.0e}"
    # A new frame's tokens (the batch's two swapped) through the same networks: the expression K/V cached by
    # `prepare` must be this frame's, and the swap must matter, or the check would not see stale K/V.
    swapped = tokens.flip(0)
    t0 = sampler.timesteps[:1]
    ref = diffusers_forward(avatar, latent, t0, cond, swapped)
    err = _max_rel(nets.predict(0, latent, nets.prepare(cond, swapped), swapped), ref)
    assert err <= tol, f"{name}, swapped tokens: max rel error {err:.2e} > {tol:.0e}"
    assert _max_rel(ref, diffusers_forward(avatar, latent, t0, cond, tokens)) > 1e-3
