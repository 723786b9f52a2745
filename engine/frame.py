"""Light value types at the bottom of the frame's data flow: `Frame` (one frame's inputs), codes and pixels.

File formats (sequences, the live protocol) and fast paths build on these without importing the model stack.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputError
from .geometry import Camera, Mesh


@dataclass
class Frame:
    """One frame's inputs: a camera, an expression code [E] and optionally a posed mesh."""

    camera: Camera
    expression: torch.Tensor
    mesh: Mesh | None = None


def to_pixels(image: torch.Tensor) -> torch.Tensor:
    """Decoder output [B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8 (the release's (x / 2 + 0.5).clamp(0, 1)).

    Contiguous: for a channels-last image the permute already is, for a contiguous one this copies."""
    pixels = ((image.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    return pixels.contiguous()


def as_codes(expressions) -> torch.Tensor:
    """Expression code(s) as a float32 CPU tensor [B, E] (one code [E] becomes [1, E])."""
    codes = expressions if torch.is_tensor(expressions) else torch.from_numpy(np.asarray(expressions, np.float32))
    codes = codes.detach().to("cpu", torch.float32)
    if codes.ndim == 1:
        codes = codes[None]
    if codes.ndim != 2:
        raise InputError(f"expression codes must be [E] or [B, E], got shape {tuple(codes.shape)}")
    return codes
