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

    widths = config.widths
    decoder = DecoderTiny(in_channels=config.latent_channels, out_channels=3, num_blocks=config.blocks,
                          block_out_channels=widths, upsampling_scaling_factor=2, act_fn="relu",
                          upsample_fn="nearest")
    # DecoderTiny's conv after each upsampling keeps the stage's width (its next stage's blocks are already built
    # at the next width); per-stage widths need that conv to map one width to the next. Same layer indices, so a
    # uniform-width decoder's state dict is DecoderTiny's.
    upsamplings = [i for i, layer in enumerate(decoder.layers) if isinstance(layer, nn.Upsample)]
    for stage, index in enumerate(upsamplings):
        decoder.layers[index + 1] = nn.Conv2d(widths[stage], widths[stage + 1], kernel_size=3, padding=1, bias=False)
    return decoder
