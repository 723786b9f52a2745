"""Seeded weight initialisation (the same on every machine) and the release's training init.

`seeded_init` gives every tensor its own generator, seeded from (seed, tensor name), so a tensor's values
depend only on the seed, its name and its shape: not on the machine, on diffusers' construction order or on
which other tensors exist. Values are drawn uniform with the wanted standard deviation rather than normal,
because torch's CPU uniform sampler is a serial kernel (bitwise reproducible everywhere), while its normal
sampler takes a vectorised path whose transcendental functions differ by CPU instruction set.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Mapping

import torch
from torch import nn

from .expression import init_expression_from_text

# Parts of `ControlNetModel.from_unet` that are copies of the UNet (diffusers copies exactly these).
CONTROLNET_COPIED_FROM_UNET = ("conv_in.", "time_embedding.", "class_embedding.", "add_embedding.", "down_blocks.",
                               "mid_block.")
# diffusers' `zero_module`s of a ControlNet: the output convs and the last conv of the conditioning embedding.
CONTROLNET_ZERO_INIT = ("controlnet_down_blocks.", "controlnet_mid_block.", "controlnet_cond_embedding.conv_out.")

_BIAS_STD = 0.02


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit seed for one tensor, derived from the model seed and the tensor's name (stable across runs)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def uniform_like(shape: torch.Size | tuple[int, ...], std: float, seed: int, name: str) -> torch.Tensor:
    """float32 CPU tensor of `shape`, uniform with mean 0 and standard deviation `std`, seeded by (seed, name)."""
    generator = torch.Generator().manual_seed(tensor_seed(seed, name))
    u = torch.rand(shape, generator=generator, dtype=torch.float32)
    return (u - 0.5) * (std * math.sqrt(12.0))


@torch.no_grad()
def seeded_init(
    model: nn.Module,
    seed: int,
    unit: Collection[str] = (),
    gains: Mapping[str, float] | None = None,
    skip: Collection[str] = (),
) -> None:
    """(Re)initialise every parameter and floating buffer of `model` (not on meta) from `seed`.

    Rule, per tensor (names as in `model.state_dict()`):
    - weight and bias of LayerNorm / GroupNorm: 1 and small random (std 0.02);
    - names starting with a prefix in `unit`: std 1 (embeddings, textures);
    - other biases and 1-D tensors: std 0.02;
    - other weights: std gain / sqrt(fan_in), fan_in = prod(shape[1:]), gain from the longest matching
      key of `gains` contained in the name (default 1).
    Tensors named in `skip` keep their values (e.g. weights just loaded from a checkpoint).
    """
    gains = dict(gains or {})
    norms = {name for name, m in model.named_modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm))}
    tensors = dict(model.named_parameters())
    tensors.update((n, b) for n, b in model.named_buffers() if b.is_floating_point())
    for name in sorted(tensors):
        if name in skip:
            continue
        tensor = tensors[name]
        owner, _, leaf = name.rpartition(".")
        if owner in norms and leaf == "weight":
            tensor.fill_(1.0)
            continue
        if name.startswith(tuple(unit)):
            std = 1.0
        elif leaf == "bias" or tensor.dim() < 2:
            std = _BIAS_STD
        else:
            std = _gain(name, gains) / math.sqrt(math.prod(tensor.shape[1:]))
        tensor.copy_(uniform_like(tensor.shape, std, seed, name))


def _gain(name: str, gains: Mapping[str, float]) -> float:
    matches = [key for key in gains if key in name]
    return gains[max(matches, key=len)] if matches else 1.0


@torch.no_grad()
def training_init(unet: nn.Module, controlnet: nn.Module) -> None:
    """The release's start of training: the ControlNet is a copy of the UNet (as `ControlNetModel.from_unet`
    makes it) with zero output convs, and each expression attention copies q/k/v from the block's text
    cross-attention with a zero output projection. `unet` must already hold its final weights."""
    unet_params = dict(unet.named_parameters())
    for name, param in controlnet.named_parameters():
        if name.startswith(CONTROLNET_COPIED_FROM_UNET):
            param.copy_(unet_params[name])
        elif name.startswith(CONTROLNET_ZERO_INIT):
            param.zero_()
    init_expression_from_text(unet)
