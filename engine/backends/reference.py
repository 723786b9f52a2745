"""The `reference` backend: the straightforward prediction, as the release runs it, and the specification.

Eager, every constant recomputed in every step (`Avatar.predict`: diffusers' ControlNet then UNet forward;
`Avatar.decode`: the VAE). float32 is the fidelity reference; float16/bfloat16 run it under autocast (the release's
own way, and the speed baseline that benchmarks compare against).
"""

from __future__ import annotations

import contextlib

import torch

from . import Backend


class ReferenceBackend(Backend):
    """The reference; `decoder`: "vae" (the release's) or "tiny" (the avatar's trained tiny decoder)."""

    name = "reference"

    def __init__(self, avatar, sampler, noise, device, dtype=None, *, decoder: str = "vae"):
        super().__init__(avatar, sampler, noise, device, dtype)
        avatar.check_decoder(decoder)
        self.decoder = decoder

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def prepare(self, condition: torch.Tensor, tokens: torch.Tensor):
        # The timesteps' device copy, once per frame: a step then indexes it (no host -> device copy per step).
        return condition, tokens, self.sampler.timesteps.to(self.device)

    def predict(self, i: int, sample: torch.Tensor, state) -> torch.Tensor:
        condition, tokens, timesteps = state
        with self._autocast():
            return self.avatar.predict(sample, timesteps[i], condition, tokens)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.avatar.decode(latent, self.decoder).float()
