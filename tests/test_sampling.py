"""Schedule, DDPM / DDIM and fixed noise, checked against diffusers' schedulers."""

import dataclasses
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from engine.config import ScheduleConfig
from engine.errors import ConfigError, InputError
from engine.sampling import (
    DDIMSampler,
    DDPMSampler,
    FixedNoise,
    NoiseSchedule,
    StepOutput,
    make_sampler,
)

SHAPE = (4, 6, 6)
SEED = 181998
EPS_CONFIG = ScheduleConfig(prediction_type="epsilon", rescale_betas_zero_snr=False, timestep_spacing="leading")


def _diffusers_kwargs(cfg: ScheduleConfig) -> dict:
    return dict(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule,
        rescale_betas_zero_snr=cfg.rescale_betas_zero_snr,
        timestep_spacing=cfg.timestep_spacing,
        prediction_type=cfg.prediction_type,
        clip_sample=False,
    )


def _ddpm(cfg: ScheduleConfig) -> DDPMScheduler:
    return DDPMScheduler(variance_type="fixed_small", **_diffusers_kwargs(cfg))


def _ddim(cfg: ScheduleConfig) -> DDIMScheduler:
    return DDIMScheduler(set_alpha_to_one=True, **_diffusers_kwargs(cfg))


def fake_model(sample: torch.Tensor, t: int) -> torch.Tensor:
    return 0.3 * sample + math.sin(t)


def test_schedule_equals_diffusers():
    cfg = ScheduleConfig()
    ours, ref = NoiseSchedule(cfg), _ddpm(cfg)
    assert ours.alphas_cumprod.dtype == torch.float32
    assert torch.equal(ours.betas, ref.betas)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    assert ours.alphas_cumprod[-1].item() == 0.0  # zero terminal SNR
    plain = ScheduleConfig(rescale_betas_zero_snr=False)
    assert torch.equal(NoiseSchedule(plain).alphas_cumprod, _ddpm(plain).alphas_cumprod)
    assert NoiseSchedule(plain).alphas_cumprod[-1].item() > 0


def test_release_timesteps():
    ts = NoiseSchedule(ScheduleConfig()).timesteps(20)
    assert ts.dtype == torch.int64
    assert ts.tolist() == list(range(999, 0, -50))


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_timesteps_equal_diffusers(spacing):
    cfg = ScheduleConfig(timestep_spacing=spacing)
    ours, ref = NoiseSchedule(cfg), _ddpm(cfg)
    for n in (1, 3, 7, 20, 50):
        ref.set_timesteps(n)
        assert ours.timesteps(n).tolist() == ref.timesteps.tolist(), n
        assert DDPMSampler(ours, n).timesteps.tolist() == ref.timesteps.tolist()


def _run_ours(sampler, batch: int = 1) -> torch.Tensor:
    noise = FixedNoise(SHAPE, sampler.num_steps, SEED, batch=batch)
    x = noise.latent
    for i, t in enumerate(sampler.timesteps.tolist()):
        x = sampler.step(i, fake_model(x, t), x, noise.step_noise[i]).prev_sample
    return x


def _run_diffusers(scheduler, steps: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(SEED)
    scheduler.set_timesteps(steps)
    x = torch.randn((1, *SHAPE), generator=gen, dtype=torch.float32)
    for t in scheduler.timesteps:
        if isinstance(scheduler, DDPMScheduler):  # DDPM draws its step noise from the same generator
            x = scheduler.step(fake_model(x, int(t)), t, x, generator=gen).prev_sample
        else:
            x = scheduler.step(fake_model(x, int(t)), t, x).prev_sample
    return x


@pytest.mark.parametrize("steps", [1, 3, 4, 7, 20])
@pytest.mark.parametrize("cfg", [ScheduleConfig(), EPS_CONFIG], ids=["v-zero-snr", "eps-leading"])
def test_ddpm_loop_equals_diffusers(steps, cfg):
    ours = _run_ours(DDPMSampler(NoiseSchedule(cfg), steps))
    ref = _run_diffusers(_ddpm(cfg), steps)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("steps", [1, 3, 4, 7, 20])
@pytest.mark.parametrize("cfg", [ScheduleConfig(), EPS_CONFIG], ids=["v-zero-snr", "eps-leading"])
def test_ddim_loop_equals_diffusers(steps, cfg):
    ours = _run_ours(DDIMSampler(NoiseSchedule(cfg), steps))
    ref = _run_diffusers(_ddim(cfg), steps)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_batch_frames_get_the_single_frame_noise():
    sampler = DDPMSampler(NoiseSchedule(ScheduleConfig()), 4)
    single, batch = _run_ours(sampler), _run_ours(sampler, batch=3)
    assert batch.shape == (3, *SHAPE)
    for b in range(3):
        assert torch.equal(batch[b : b + 1], single)


def test_ddpm_noise_matters_and_is_required():
    sampler = DDPMSampler(NoiseSchedule(ScheduleConfig()), 4)
    x = torch.randn(1, *SHAPE)
    out_a = sampler.step(0, fake_model(x, 999), x, torch.zeros_like(x))
    out_b = sampler.step(0, fake_model(x, 999), x, torch.ones_like(x))
    assert isinstance(out_a, StepOutput)
    assert not torch.allclose(out_a.prev_sample, out_b.prev_sample)
    assert torch.equal(out_a.pred_original_sample, out_b.pred_original_sample)
    with pytest.raises(InputError, match="step_noise"):
        sampler.step(0, x, x)
    with pytest.raises(InputError, match="outside 0..3"):
        sampler.step(4, x, x, x)
    assert sampler.needs_noise and not DDIMSampler(sampler.schedule, 4).needs_noise


def test_ddim_ignores_noise_and_last_step_is_pred_x0():
    sampler = DDIMSampler(NoiseSchedule(ScheduleConfig()), 20)
    x = torch.randn(1, *SHAPE)
    mo = fake_model(x, 49)
    out = sampler.step(19, mo, x, noise=torch.randn_like(x))
    assert torch.equal(out.prev_sample, out.pred_original_sample)
    assert torch.equal(out.prev_sample, sampler.step(19, mo, x).prev_sample)
    # v-prediction's x0 at t = 49 by hand: sqrt(a) x - sqrt(1 - a) v
    a = sampler.schedule.alphas_cumprod[49]
    torch.testing.assert_close(out.pred_original_sample, a.sqrt() * x - (1 - a).sqrt() * mo)


def test_ddpm_first_step_by_hand():
    # Zero terminal SNR: at t = 999 alpha_bar = 0, so x0 = -v (Ho eq. 7 with v-prediction), the sample drops out
    # and prev = -sqrt(a_prev) v + sigma noise with sigma^2 = (1 - a_prev) / 1 * 1
    sampler = DDPMSampler(NoiseSchedule(ScheduleConfig()), 20)
    a_prev = sampler.schedule.alphas_cumprod[949].item()
    gen = torch.Generator().manual_seed(1)
    x, v, noise = (torch.randn(1, *SHAPE, generator=gen) for _ in range(3))
    want = -math.sqrt(a_prev) * v + math.sqrt(1 - a_prev) * noise
    torch.testing.assert_close(sampler.step(0, v, x, noise).prev_sample, want, atol=1e-6, rtol=1e-5)


def test_step_count_limits_and_registry():
    schedule = NoiseSchedule(ScheduleConfig())
    for cls in (DDPMSampler, DDIMSampler):
        for bad in (0, 51):
            with pytest.raises(ConfigError, match=r"1\.\.50"):
                cls(schedule, bad)
        assert cls(schedule, 1).num_steps == 1 and cls(schedule, 50).num_steps == 50
    assert isinstance(make_sampler("ddim", schedule, 4), DDIMSampler)
    with pytest.raises(ConfigError, match=r"\['ddim', 'ddpm'\]"):
        make_sampler("unipc", schedule, 4)


def test_zero_snr_with_epsilon_refused():
    with pytest.raises(ConfigError, match="v_prediction"):
        ScheduleConfig(prediction_type="epsilon", rescale_betas_zero_snr=True)
    # the schedule refuses it too, should a config reach it unchecked
    cfg = ScheduleConfig()
    object.__setattr__(cfg, "prediction_type", "epsilon")
    with pytest.raises(ConfigError, match="v_prediction"):
        NoiseSchedule(cfg)


def test_fixed_noise_draw_order_and_copies():
    noise = FixedNoise(SHAPE, 3, seed=7, batch=2)
    gen = torch.Generator().manual_seed(7)
    draws = [torch.randn(1, *SHAPE, generator=gen) for _ in range(4)]
    assert noise.latent.shape == (2, *SHAPE) and noise.step_noise.shape == (3, 2, *SHAPE)
    assert noise.latent.dtype == torch.float32 and noise.batch == 2
    assert torch.equal(noise.latent, draws[0].repeat(2, 1, 1, 1))
    for i in range(3):
        assert torch.equal(noise.step_noise[i], draws[i + 1].repeat(2, 1, 1, 1))
    moved = noise.to("cpu", torch.float64)
    assert moved is not noise and moved.latent.dtype == torch.float64 and noise.latent.dtype == torch.float32
    one = noise.with_batch(1)
    assert torch.equal(one.latent, FixedNoise(SHAPE, 3, seed=7).latent) and noise.batch == 2
    assert not torch.equal(FixedNoise(SHAPE, 3, seed=8).latent, one.latent)
    with pytest.raises(InputError, match=r"\(C, h, w\)"):
        FixedNoise((4, 6), 3, seed=7)
    with pytest.raises(InputError, match="steps"):
        FixedNoise(SHAPE, 0, seed=7)


def test_replace_keeps_validation():
    with pytest.raises(ConfigError):
        dataclasses.replace(ScheduleConfig(), timestep_spacing="karras")
