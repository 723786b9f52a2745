"""`--avatar NAME|DIR`: one way to name an avatar everywhere.

A DIR is an avatar folder (`config.json` + `model.safetensors`, see `Avatar.save_pretrained`). A NAME is an avatar
shipped inside this package (a folder beside this file, found after a non-editable install too) or a preset
(`engine.config.PRESETS`, seeded random weights). Where a new avatar may be built (`avatar train`), a FILE is an
AvatarConfig JSON file too. `resolve_avatar` is the one reader of such an argument; `load_avatar` builds what it
names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import PRESETS, AvatarConfig, from_preset
from ..errors import ConfigError

SHIPPED = Path(__file__).parent


def shipped_names() -> list[str]:
    return sorted(p.name for p in SHIPPED.iterdir() if (p / "config.json").is_file())


@dataclass(frozen=True)
class AvatarSource:
    """What an `--avatar` argument names; exactly one field is set: an avatar `folder` (given or shipped), an
    AvatarConfig JSON `config_file` (a new avatar; only where `resolve_avatar` accepts them) or a `preset` name."""

    folder: Path | None = None
    config_file: Path | None = None
    preset: str | None = None

    def config(self) -> AvatarConfig:
        """The avatar's config, read without building any weights."""
        if self.folder is not None:
            from ..model import read_config

            return read_config(self.folder)
        if self.preset is not None:
            return from_preset(self.preset)
        try:
            d = json.loads(self.config_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{self.config_file} is not a readable JSON avatar config ({e})") from e
        if isinstance(d, dict):  # an avatar folder's config.json works too
            d = {k: v for k, v in d.items() if k not in ("format", "format_version")}
        return AvatarConfig.from_dict(d)


def resolve_avatar(spec: str, config_files: bool = False) -> AvatarSource:
    """What `spec` names: an existing folder, else (with `config_files`) an existing file, else a shipped avatar,
    else a preset; ConfigError naming the choices otherwise."""
    path = Path(spec)
    if path.is_dir():
        return AvatarSource(folder=path)
    if config_files and path.is_file():
        return AvatarSource(config_file=path)
    if spec in shipped_names():
        return AvatarSource(folder=SHIPPED / spec)
    if spec in PRESETS:
        return AvatarSource(preset=spec)
    files = "not a JSON config file, " if config_files else ""
    raise ConfigError(
        f"no avatar {spec!r}: not a folder, {files}not a shipped avatar ({shipped_names() or 'none shipped'}) and "
        f"not a preset ({sorted(PRESETS)}); pass an avatar folder written by Avatar.save_pretrained"
    )


def load_avatar(spec: str, device: str | torch.device = "cpu", seed: int = 0):
    """The avatar named by `spec` (a folder path, a shipped avatar's name or a preset), on `device`.

    `device="meta"` builds the structure without allocating weights (for `avatar info` on large presets).
    """
    from ..model import Avatar

    source = resolve_avatar(spec)
    meta = str(device) == "meta"
    if source.preset is not None:
        if meta:
            with torch.device("meta"):
                return Avatar.from_preset(source.preset, seed=seed)
        return Avatar.from_preset(source.preset, seed=seed).to(device)
    if meta:  # the structure only, from config.json (info, orbit)
        with torch.device("meta"):
            return Avatar(source.config(), root=source.folder)
    return Avatar.from_pretrained(source.folder, device=device)


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
