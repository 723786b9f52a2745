"""The tiny decoder's network: diffusers' `DecoderTiny` (TAESD's decoder) shaped by a `TinyDecoderConfig`.

TAESD's structure (Bohan, 2023): a clamp `3 tanh(z / 3)`, a 3x3 conv, then per stage residual blocks of three 3x3
convs with ReLUs, a nearest-neighbour upsampling by 2 and a conv, and a last conv to RGB; no normalisation and no
attention, so it costs a fraction of the VAE decoder. Trained per avatar by `avatar distill-decoder`
(`engine.training.decoder`).
"""

from __future__ import annotations

from torch import nn

from .recipe import TinyDecoderConfig


def build_tiny_decoder(config: TinyDecoderConfig) -> nn.Module:
    """A `DecoderTiny` of `config`'s shape (weights as torch initialises them): diffusion latent `[B, c, h, w]` ->
    image `[B, 3, h * upsample, w * upsample]` nominally in [-1, 1]."""
    from diffusers.models.autoencoders.vae import DecoderTiny

    n = len(config.blocks)
    return DecoderTiny(in_channels=config.latent_channels, out_channels=3, num_blocks=config.blocks,
                       block_out_channels=(config.channels,) * n, upsampling_scaling_factor=2, act_fn="relu",
                       upsample_fn="nearest")
