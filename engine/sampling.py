"""Noise schedule, DDPM and DDIM samplers, and the fixed per-frame noise (model.md, steps 7-8).

Numerics follow diffusers' `DDPMScheduler` / `DDIMScheduler` (float32 tables, same order of operations),
so a loop here reproduces diffusers' to float32 rounding. Every per-step constant is computed once at
construction as a python float: a step does no host sync and no table lookup on the device.

`denoise` is THE denoising loop: every backend runs it, supplying only its per-step prediction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .config import ScheduleConfig
from .errors import ConfigError, InputError

MAX_STEPS = 50


class NoiseSchedule:
    """The training noise schedule: `betas`, `alphas`, `alphas_cumprod`, each `[T]` float32 on the CPU."""

    def __init__(self, config: ScheduleConfig):
        self.config = config
        t = config.num_train_timesteps
        if t < 1:
            raise ConfigError(f"num_train_timesteps must be positive, got {t}")
        if config.beta_schedule == "scaled_linear":
            betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, t, dtype=torch.float32) ** 2
        else:
            betas = torch.linspace(config.beta_start, config.beta_end, t, dtype=torch.float32)
        if config.rescale_betas_zero_snr:
            betas = _rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        if config.prediction_type == "epsilon" and self.alphas_cumprod[-1].item() == 0.0:
            raise ConfigError(
                "epsilon prediction cannot sample a zero-terminal-SNR schedule (x0 = (x - sqrt(1-a) eps) / sqrt(a) "
                "divides by 0 at the last timestep); use prediction_type='v_prediction'"
            )

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    @property
    def prediction_type(self) -> str:
        return self.config.prediction_type

    def timesteps(self, n: int) -> torch.Tensor:
        """The `n` inference timesteps, descending, as diffusers' `set_timesteps(n)` computes them
        (Lin et al. 2023, Table 2): LongTensor `[n]` on the CPU."""
        total = self.num_train_timesteps
        if not 1 <= n <= total:
            raise ConfigError(f"the number of steps must be in 1..{total} (num_train_timesteps), got {n}")
        spacing = self.config.timestep_spacing
        if spacing == "linspace":
            ts = np.linspace(0, total - 1, n).round()[::-1].copy().astype(np.int64)
        elif spacing == "leading":
            ts = (np.arange(0, n) * (total // n)).round()[::-1].copy().astype(np.int64)
        else:  # trailing: rounding a float stride, as diffusers does, matters for non-divisors of T
            ts = np.round(np.arange(total, 0, -total / n)).astype(np.int64) - 1
        return torch.from_numpy(ts)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1 (diffusers' `rescale_zero_terminal_snr`): shift and scale sqrt(alpha_bar)
    so the last timestep has zero SNR and the first keeps its value; float32 like diffusers."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab -= last
    sqrt_ab *= first / (first - last)
    alphas_bar = sqrt_ab**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


@dataclass(frozen=True)
class StepOutput:
    """One sampler step. `prev_sample`: x_{t_prev}; `pred_original_sample`: the predicted x_0.
    Both `[B, C, h, w]`, dtype and device of the step's `sample`."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


@dataclass(frozen=True)
class _StepConsts:
    """Float32-valued constants of one step, stored as python floats (exact copies of the float32 values)."""

    t: int
    sqrt_a: float  # sqrt(alpha_bar_t)
    sqrt_b: float  # sqrt(1 - alpha_bar_t)
    x0_coef: float  # multiplies pred x0 (DDPM eq. 7 / DDIM eq. 12)
    xt_coef: float  # multiplies x_t (DDPM) or pred eps (DDIM)
    sigma: float  # multiplies the step noise (0 for DDIM)


class Sampler:
    """What every sampler offers: `name`, `needs_noise`, `num_steps`, `timesteps` (LongTensor `[N]`, CPU,
    descending), `step(i, model_output, sample, noise=None) -> StepOutput` (the reference, diffusers' order of
    operations)."""

    name = ""
    needs_noise = False

    def __init__(self, schedule: NoiseSchedule, steps: int):
        if not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
            raise ConfigError(f"{self.name} steps must be an integer in 1..{MAX_STEPS}, got {steps!r}")
        self.schedule = schedule
        self.num_steps = steps
        self.prediction_type = schedule.prediction_type
        self.timesteps = schedule.timesteps(steps)
        ts = self.timesteps.tolist()
        self._consts = [self._constants(i, ts) for i in range(steps)]

    def _constants(self, i: int, ts: list[int]) -> _StepConsts:
        raise NotImplementedError

    def _pred_x0(self, k: _StepConsts, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        # "predicted x_0": Ho et al. eq. 15 for epsilon; for v (Salimans & Ho 2022) x0 = sqrt(a) x - sqrt(1-a) v
        if self.prediction_type == "v_prediction":
            return k.sqrt_a * sample - k.sqrt_b * model_output
        return (sample - k.sqrt_b * model_output) / k.sqrt_a

    def _check_index(self, i: int) -> _StepConsts:
        if not 0 <= i < self.num_steps:
            raise InputError(f"step index {i} is outside 0..{self.num_steps - 1} of this {self.num_steps}-step sampler")
        return self._consts[i]

    def step(self, i: int, model_output: torch.Tensor, sample: torch.Tensor, noise=None) -> StepOutput:
        raise NotImplementedError



class DDPMSampler(Sampler):
    """Ancestral DDPM (Ho et al. 2020), "fixed_small" variance, no clipping: the release's sampler.

    `timesteps`: LongTensor `[N]`, descending. Step i goes from `timesteps[i]` to `timesteps[i + 1]`
    (the last step to t = -1, alpha_bar = 1), like diffusers' `DDPMScheduler.previous_timestep`.
    """

    name = "ddpm"
    needs_noise = True

    def _constants(self, i: int, ts: list[int]) -> _StepConsts:
        ac = self.schedule.alphas_cumprod
        t = ts[i]
        prev_t = ts[i + 1] if i + 1 < len(ts) else -1
        a_t = ac[t]
        a_prev = ac[prev_t] if prev_t >= 0 else torch.tensor(1.0)
        beta_t, beta_prev = 1 - a_t, 1 - a_prev
        cur_alpha = a_t / a_prev
        cur_beta = 1 - cur_alpha
        # Ho et al. eq. 7: mu = sqrt(a_prev) beta_t / (1 - a_t) x0 + sqrt(alpha_t) (1 - a_prev) / (1 - a_t) x_t
        x0_coef = (a_prev**0.5 * cur_beta) / beta_t
        xt_coef = cur_alpha**0.5 * beta_prev / beta_t
        # Ho et al. eq. 6, "fixed_small": sigma^2 = (1 - a_prev) / (1 - a_t) beta_t, clamped like diffusers
        var = torch.clamp((1 - a_prev) / (1 - a_t) * cur_beta, min=1e-20)
        sigma = float(var**0.5) if t > 0 else 0.0
        return _StepConsts(t, float(a_t**0.5), float(beta_t**0.5), float(x0_coef), float(xt_coef), sigma)

    def step(self, i: int, model_output: torch.Tensor, sample: torch.Tensor, noise=None) -> StepOutput:
        """x_t -> x_{t_prev}. model_output, sample, noise: `[B, C, h, w]`, same dtype and device.
        `noise` (standard normal, e.g. `FixedNoise.step_noise[i]`) is required unless sigma is 0 (t = 0)."""
        k = self._check_index(i)
        pred_x0 = self._pred_x0(k, model_output, sample)
        prev = k.x0_coef * pred_x0 + k.xt_coef * sample
        if k.t > 0:
            if noise is None:
                raise InputError(f"DDPM step {i} needs standard-normal noise; pass FixedNoise.step_noise[{i}]")
            prev = prev + k.sigma * noise
        return StepOutput(prev, pred_x0)



class DDIMSampler(Sampler):
    """Deterministic DDIM (Song et al. 2021, eta = 0), `set_alpha_to_one`.

    Step i goes from t = `timesteps[i]` to t - T // N, as diffusers' `DDIMScheduler` does (for N not dividing
    T that differs from the next listed timestep); below 0 the target is alpha_bar = 1, so that step
    returns the predicted x0 exactly. Step noise is never used.
    """

    name = "ddim"
    needs_noise = False

    def _constants(self, i: int, ts: list[int]) -> _StepConsts:
        ac = self.schedule.alphas_cumprod
        t = ts[i]
        prev_t = t - self.schedule.num_train_timesteps // self.num_steps
        a_t = ac[t]
        a_prev = ac[prev_t] if prev_t >= 0 else torch.tensor(1.0)
        beta_t = 1 - a_t
        # Song et al. eq. 12 with sigma_t = 0: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps
        x0_coef, eps_coef = float(a_prev**0.5), float((1 - a_prev) ** 0.5)
        return _StepConsts(t, float(a_t**0.5), float(beta_t**0.5), x0_coef, eps_coef, 0.0)

    def _pred_eps(self, k: _StepConsts, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "v_prediction":
            return k.sqrt_a * model_output + k.sqrt_b * sample
        return model_output

    def step(self, i: int, model_output: torch.Tensor, sample: torch.Tensor, noise=None) -> StepOutput:
        """x_t -> x_{t_prev}. model_output, sample: `[B, C, h, w]`, same dtype and device; `noise` is ignored."""
        k = self._check_index(i)
        pred_x0 = self._pred_x0(k, model_output, sample)
        pred_eps = self._pred_eps(k, model_output, sample)
        prev = k.x0_coef * pred_x0 + k.xt_coef * pred_eps
        return StepOutput(prev, pred_x0)



SAMPLERS = {"ddpm": DDPMSampler, "ddim": DDIMSampler}


def make_sampler(name: str, schedule: NoiseSchedule, steps: int) -> Sampler:
    """The sampler registered as `name` (`SAMPLERS`), for `steps` in 1..50."""
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name](schedule, steps)


class FixedNoise:
    """The release's fixed noise: one seed gives the initial latent and every step's noise, reused per frame.

    Drawn as float32 on the CPU from `torch.Generator().manual_seed(seed)`, in this order: the initial latent
    `[1, C, h, w]`, then the noise of steps 1..N, each `[1, C, h, w]` (the order diffusers' DDPM pipeline
    draws them in with one generator). For a batch every frame gets these same draws.
    `latent`: `[B, C, h, w]`; `step_noise`: `[N, B, C, h, w]`, `step_noise[i]` for `sampler.step(i)`.
    """

    def __init__(self, latent_shape: tuple[int, int, int], steps: int, seed: int, batch: int = 1):
        shape = tuple(latent_shape)
        if len(shape) != 3 or not all(isinstance(n, int) and n > 0 for n in shape):
            raise InputError(f"latent_shape must be 3 positive ints (C, h, w), got {latent_shape!r}")
        if not isinstance(steps, int) or steps < 1:
            raise InputError(f"steps must be a positive int, got {steps!r}")
        if not isinstance(batch, int) or batch < 1:
            raise InputError(f"batch must be a positive int, got {batch!r}")
        if not isinstance(seed, int):
            raise InputError(f"seed must be an int, got {seed!r}")
        gen = torch.Generator().manual_seed(seed)
        # One randn call per draw, not one big call: the CPU generator's output depends on the call sizes.
        latent = torch.randn((1, *shape), generator=gen, dtype=torch.float32)
        noise = torch.stack([torch.randn((1, *shape), generator=gen, dtype=torch.float32) for _ in range(steps)])
        self.seed = seed
        self.latent_shape = shape
        self.num_steps = steps
        self._set(latent.repeat(batch, 1, 1, 1), noise.repeat(1, batch, 1, 1, 1))

    def _set(self, latent: torch.Tensor, step_noise: torch.Tensor) -> "FixedNoise":
        self.latent = latent
        self.step_noise = step_noise
        return self

    @property
    def batch(self) -> int:
        return self.latent.shape[0]

    def _copy(self, latent: torch.Tensor, step_noise: torch.Tensor) -> "FixedNoise":
        new = FixedNoise.__new__(FixedNoise)
        new.seed, new.latent_shape, new.num_steps = self.seed, self.latent_shape, self.num_steps
        return new._set(latent, step_noise)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "FixedNoise":
        """A copy on `device` (and in `dtype`); this one is unchanged."""
        return self._copy(self.latent.to(device, dtype), self.step_noise.to(device, dtype))

    def with_batch(self, batch: int) -> "FixedNoise":
        """A copy for `batch` frames (the same draws repeated), on the same device."""
        if not isinstance(batch, int) or batch < 1:
            raise InputError(f"batch must be a positive int, got {batch!r}")
        return self._copy(self.latent[:1].repeat(batch, 1, 1, 1), self.step_noise[:, :1].repeat(1, batch, 1, 1, 1))


Predict = Callable[[int, torch.Tensor], torch.Tensor]


def denoise(predict: Predict, sampler: Sampler, noise: FixedNoise, batch: int = 1,
            on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """The denoising loop of every backend: from the fixed noise's initial latent, N sampler steps.

    predict(i, sample) -> the model output (v) of step i for `sample` `[B, c, h, w]` float32 (any float dtype back;
        the step runs in float32). Given the step index, so a backend's tables indexed by step keep working.
    noise: `FixedNoise` on the sampler's device; its draws are shared by the `batch` frames.
    on_step(i): called after step i (timing, progress). The loop does no host synchronisation, so a CUDA graph
        can capture it; a hook given while capturing is captured with it (`CompiledBackend` records its timing
        events that way and calls the caller's hook after each replay instead).
    Returns the final latent `[B, c, h, w]` float32.
    """
    if noise.num_steps != sampler.num_steps:
        raise ConfigError(f"the sampler has {sampler.num_steps} steps but the fixed noise {noise.num_steps}")
    sample = noise.latent[:1].expand(batch, -1, -1, -1)
    for i in range(sampler.num_steps):
        model_output = predict(i, sample)
        step_noise = noise.step_noise[i, :1].expand(batch, -1, -1, -1) if sampler.needs_noise else None
        sample = sampler.step(i, model_output.float(), sample, step_noise).prev_sample
        if on_step is not None:
            on_step(i)
    return sample
