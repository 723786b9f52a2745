"""The reference `Renderer` against diffusers' own `StableDiffusionControlNetPipeline`: the same uint8 frame.

The pipeline is built from a `tiny` avatar's modules (UNet, ControlNet, VAE) with a `DDPMScheduler` /
`DDIMScheduler` configured like the project's schedule (`ScheduleConfig`: v-prediction, scaled-linear betas rescaled
to zero terminal SNR, trailing spacing; DDPM "fixed_small" variance, DDIM `set_alpha_to_one`, eta 0; no clipping),
the project's 73-channel condition image, `prompt_embeds=avatar.prompt_embedding`, guidance_scale 1 (no
classifier-free guidance, like the release) and a `torch.Generator().manual_seed(seed)`: diffusers draws the initial
latent and then every DDPM step's noise from it, which is what `FixedNoise` draws, in that order.

The frames must be IDENTICAL (0 levels): the pipeline's loop, schedulers, ControlNet call and decode are an
independent implementation of the release's recipe, and the project's numerics are written to follow diffusers'
order of operations. Its `output_type="pt"` image is already `(x * 0.5 + 0.5).clamp(0, 1)` (diffusers'
`denormalize`; x * 0.5 and x / 2 are the same float), so only `* 255`, round and uint8 remain, as in `to_pixels`.

Two cases:
- expression attention zeroed (output projection 0 on a copy of the avatar): the pipeline runs a plain diffusers
  `UNet2DConditionModel` holding the copy's UNet weights (no project code, no tokens) and equals the copy's frame.
  The avatar's own UNet cannot run without tokens (`ExpressionTransformerBlock` raises), hence the plain one.
- live expression attention: the avatar's UNet with `cross_attention_kwargs={TOKENS_KWARG: tokens}`, which the
  pipeline forwards to the UNet (and not to the ControlNet, which has no expression attention): equal frames, and
  two codes on the same mesh give two different frames.
"""

import copy

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionControlNetPipeline,
    UNet2DConditionModel,
)
from diffusers.utils.torch_utils import randn_tensor

from engine.conditioning import build_condition
from engine.expression import TOKENS_KWARG, ExpressionTransformerBlock
from engine.raster import rasterize
from engine.renderer import Renderer
from engine.sampling import FixedNoise
from engine.sequence import orbit

SEED = 5
REFERENCE = dict(raster_backend="torch", condition_backend="torch")  # the specification path, not the numba fast path


def diffusers_scheduler(name, schedule):
    """diffusers' scheduler configured from the project's `ScheduleConfig` (model.md, "Sampler")."""
    common = {
        "num_train_timesteps": schedule.num_train_timesteps,
        "beta_start": schedule.beta_start,
        "beta_end": schedule.beta_end,
        "beta_schedule": schedule.beta_schedule,
        "prediction_type": schedule.prediction_type,
        "rescale_betas_zero_snr": schedule.rescale_betas_zero_snr,
        "timestep_spacing": schedule.timestep_spacing,
        "clip_sample": False,
        "thresholding": False,
    }
    if name == "ddpm":
        return DDPMScheduler(variance_type="fixed_small", **common)
    return DDIMScheduler(set_alpha_to_one=True, steps_offset=0, **common)


def make_pipeline(unet, controlnet, vae, sampler, schedule):
    pipe = StableDiffusionControlNetPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet, controlnet=controlnet,
        scheduler=diffusers_scheduler(sampler, schedule), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_frame(pipe, avatar, condition, steps, seed=SEED, tokens=None):
    """The pipeline's frame as uint8 [H, W, 3], converted like `engine.frame.to_pixels`."""
    size = avatar.config.image_size
    kwargs = None if tokens is None else {TOKENS_KWARG: tokens}
    image = pipe(
        image=condition, prompt_embeds=avatar.prompt_embedding, num_inference_steps=steps, guidance_scale=1.0,
        generator=torch.Generator().manual_seed(seed), output_type="pt", height=size, width=size,
        cross_attention_kwargs=kwargs,
    ).images
    assert image.shape == (1, 3, size, size) and image.min() >= 0 and image.max() <= 1  # already denormalised
    return (image * 255).round().to(torch.uint8).permute(0, 2, 3, 1)[0].numpy()


@pytest.fixture(scope="module")
def scene(tiny_avatar):
    """A camera, two expression codes and one posed mesh (the first code's) for both, and its condition image."""
    frames = orbit(tiny_avatar.config, frames=4)
    camera = frames[1].camera
    codes = [torch.as_tensor(frames[1].expression), torch.linspace(0, 1, tiny_avatar.config.expression_dim)]
    assert not torch.equal(codes[0], codes[1])
    mesh = tiny_avatar.head_model.posed_mesh(codes[0])
    condition = build_condition(rasterize(mesh, camera), tiny_avatar.textures, tiny_avatar.config.conditioning)
    return camera, codes, mesh, condition


@pytest.fixture(scope="module")
def zeroed(tiny_avatar):
    """(avatar copy with every expression attention's output projection zero, a plain diffusers UNet with the
    copy's UNet weights)."""
    avatar = copy.deepcopy(tiny_avatar)
    with torch.no_grad():
        for path in avatar.expression_attention_paths():
            for p in avatar.unet.get_submodule(path)._expression_attention.to_out[0].parameters():
                p.zero_()
    cfg = avatar.config
    with torch.device("meta"):
        plain = UNet2DConditionModel(**cfg.unet.diffusers_kwargs(cfg.latent_size, cfg.vae.latent_channels))
    weights = {k: v for k, v in avatar.unet.state_dict().items() if "._expression_attention." not in k}
    plain.load_state_dict(weights, strict=True, assign=True)
    assert not any(isinstance(m, ExpressionTransformerBlock) for m in plain.modules())
    return avatar, plain.eval().requires_grad_(False)


def test_the_condition_image_reaches_the_controlnet_untouched(tiny_avatar, scene):
    """The pipeline's control-image preprocessing, on a 4-D tensor whose channel count is not the VAE's latent
    channels, only resizes to (height, width) (nearest, here the same size) and does not normalise
    (`do_normalize=False`): the 73 channels in [-1, 1] arrive bit for bit, as the release feeds them."""
    _, _, _, condition = scene
    av = tiny_avatar
    pipe = make_pipeline(av.unet, av.controlnet, av.vae, "ddpm", av.config.schedule)
    size = av.config.image_size
    assert condition.shape == (1, 73, size, size) and condition.min() < 0
    prepared = pipe.prepare_image(condition, size, size, 1, 1, torch.device("cpu"), torch.float32)
    assert torch.equal(prepared, condition)


@pytest.mark.parametrize("steps", [1, 4, 20])
def test_fixed_noise_is_the_pipelines_draw_order(tiny_avatar, steps):
    """`FixedNoise` = what diffusers draws from one generator: `prepare_latents`' randn_tensor of the latent
    shape, then one randn_tensor of the sample's shape per DDPM step (every trailing timestep is > 0, so every
    step draws; DDIM with eta 0 draws none and uses only the latent)."""
    c = tiny_avatar.config
    shape = (1, c.vae.latent_channels, c.latent_size, c.latent_size)
    noise = FixedNoise(shape[1:], steps, SEED)
    gen = torch.Generator().manual_seed(SEED)
    assert torch.equal(noise.latent, randn_tensor(shape, generator=gen, dtype=torch.float32))
    for i in range(steps):
        assert torch.equal(noise.step_noise[i], randn_tensor(shape, generator=gen, dtype=torch.float32))
    ts = diffusers_scheduler("ddpm", c.schedule)
    ts.set_timesteps(steps)
    assert int(ts.timesteps.min()) > 0


@pytest.mark.parametrize("steps", [1, 4, 20])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_renderer_frame_is_diffusers_pipeline_frame(scene, zeroed, sampler, steps):
    """Expression attention zeroed: the Renderer's uint8 frame equals, to 0 levels, the frame of diffusers'
    pipeline running plain diffusers modules (no project code) with the same weights, seed and condition."""
    camera, codes, mesh, condition = scene
    avatar, plain = zeroed
    renderer = Renderer(avatar, sampler=sampler, steps=steps, seed=SEED, **REFERENCE)
    pipe = make_pipeline(plain, avatar.controlnet, avatar.vae, sampler, avatar.config.schedule)
    pipe.scheduler.set_timesteps(steps)
    assert torch.equal(pipe.scheduler.timesteps, renderer.sampler.timesteps)
    expected = pipeline_frame(pipe, avatar, condition, steps)
    frame = renderer.render(camera, codes[0], mesh=mesh)
    assert frame.dtype == np.uint8 and frame.shape == expected.shape
    assert expected.std() > 5  # a picture, not a constant: the equality below is not vacuous
    diff = np.abs(frame.astype(int) - expected.astype(int))
    assert diff.max() == 0, f"{sampler} {steps} steps: {(diff > 0).mean():.3%} of values differ, by up to {diff.max()}"


@pytest.mark.parametrize(("sampler", "steps"), [("ddpm", 4), ("ddim", 4)])
def test_expression_tokens_reach_the_pipelines_unet(tiny_avatar, scene, sampler, steps):
    """Live expression attention, tokens passed as the pipeline's `cross_attention_kwargs` (which it forwards
    to the UNet only; the ControlNet has no expression attention, as in the release): each code's frame equals
    the Renderer's, and the two codes on one mesh give different frames (the tokens do reach the UNet)."""
    camera, codes, mesh, condition = scene
    av = tiny_avatar
    assert type(av.controlnet) is ControlNetModel
    assert not any(hasattr(m, "_expression_attention") for m in av.controlnet.modules())
    renderer = Renderer(av, sampler=sampler, steps=steps, seed=SEED, **REFERENCE)
    pipe = make_pipeline(av.unet, av.controlnet, av.vae, sampler, av.config.schedule)
    frames = []
    for code in codes:
        expected = pipeline_frame(pipe, av, condition, steps, tokens=av.expression_tokens(code))
        frame = renderer.render(camera, code, mesh=mesh)
        assert np.array_equal(frame, expected), f"{sampler} {steps} steps, code {code.tolist()}"
        frames.append(frame)
    assert np.abs(frames[0].astype(int) - frames[1].astype(int)).max() > 2


def test_another_seed_gives_another_frame(tiny_avatar, scene):
    """Negative control for the equalities above: the pipeline with another generator seed (DDPM, so the latent
    and every step's noise change) does not reproduce the Renderer's frame."""
    camera, codes, mesh, condition = scene
    av = tiny_avatar
    renderer = Renderer(av, sampler="ddpm", steps=4, seed=SEED, **REFERENCE)
    pipe = make_pipeline(av.unet, av.controlnet, av.vae, "ddpm", av.config.schedule)
    other = pipeline_frame(pipe, av, condition, 4, seed=SEED + 1, tokens=av.expression_tokens(codes[0]))
    assert np.abs(renderer.render(camera, codes[0], mesh=mesh).astype(int) - other.astype(int)).max() > 2
