"""`--avatar NAME|DIR`: one way to name an avatar everywhere.

A DIR is an avatar folder (`config.json` + `model.safetensors`, see `Avatar.save_pretrained`). A NAME is an avatar
shipped inside this package (a folder beside this file, found after a non-editable install too) or a preset
(`engine.config.PRESETS`, seeded random weights).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import PRESETS
from ..errors import ConfigError

SHIPPED = Path(__file__).parent


def shipped_names() -> list[str]:
    return sorted(p.name for p in SHIPPED.iterdir() if (p / "config.json").is_file())


def load_avatar(spec: str, device: str | torch.device = "cpu", seed: int = 0):
    """The avatar named by `spec` (a folder path, a shipped avatar's name or a preset), on `device`.

    `device="meta"` builds the structure without allocating weights (for `avatar info` on large presets).
    """
    from ..model import Avatar, read_config

    path = Path(spec)
    if path.is_dir():
        folder = path
    elif spec in shipped_names():
        folder = SHIPPED / spec
    elif spec in PRESETS:
        if str(device) == "meta":
            with torch.device("meta"):
                return Avatar.from_preset(spec, seed=seed)
        return Avatar.from_preset(spec, seed=seed).to(device)
    else:
        raise ConfigError(
            f"no avatar {spec!r}: not a folder, not a shipped avatar ({shipped_names() or 'none shipped'}) and not a "
            f"preset ({sorted(PRESETS)}); pass an avatar folder written by Avatar.save_pretrained"
        )
    if str(device) == "meta":  # the structure only, from config.json (info, orbit)
        with torch.device("meta"):
            return Avatar(read_config(folder), root=folder)
    return Avatar.from_pretrained(folder, device=device)


def describe(avatar) -> dict:
    """JSON-safe facts about an avatar: config, channel layout, tokens, parameter counts, expression blocks."""
    config = avatar.config
    return {
        "config": config.to_dict(),
        "latent_shape": [config.vae.latent_channels, config.latent_size, config.latent_size],
        "condition_channels": config.condition_channels,
        "channel_layout": [list(group) for group in config.conditioning.channel_layout()],
        "expression_tokens": [config.expression_tokens, config.token_dim],
        "parameters": avatar.parameter_counts(),
        "expression_attention": avatar.expression_attention_paths(),
    }
