"""Importers of foreign weights: a local diffusers Stable Diffusion folder, and the authors' release
(model.md, "The release's checkpoints and data"). Use them through `Avatar.from_diffusers` / `from_release`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from .conditioning import RELEASE_PLANE_NAMES, texture_from_release_row
from .config import AvatarConfig, UNetConfig, from_preset
from .errors import BackendError, CheckpointError, ConfigError, InputError
from .files import check_state_dict

logger = logging.getLogger(__name__)

# The release's names for the expression projection and the texture tables (one row per person).
RELEASE_EXPRESSION_WEIGHT = "expression_codes_mlp.weight"
RELEASE_EXPRESSION_BIAS = "expression_codes_mlp.bias"
RELEASE_PLANE_KEYS = tuple(f"neural_texture_lookup_{n}.weight" for n in RELEASE_PLANE_NAMES)  # uv, uw, vw
RELEASE_AMBIENT_KEY = "ambient_texture_lookup.weight"
RELEASE_EXPRESSION_LAYER = "unet.{block}._expression_attention.{leaf}"
RELEASE_EXPRESSION_LEAVES = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias")
_CKPT = re.compile(r"ckpt-(\d+)\.pt")


def from_diffusers(cls, sd_dir, preset="sd21", init="training", seed=0):
    """`cls` (Avatar) on a local diffusers SD folder: `unet/`, `vae/`, optionally `text_encoder/` + `tokenizer/`.

    The UNet and VAE weights are loaded; the preset's UNet/VAE config is replaced by the folder's (ConfigError
    if the folder's models are built differently from what the engine builds); the rest is initialised with
    `init` ("training": the release's start of training) from `seed`. The prompt embedding is the folder's
    CLIP embedding of the empty prompt padded to config.prompt_length (last hidden state), or zeros with a
    warning when the folder has no text encoder.
    """
    sd_dir = Path(sd_dir)
    base = from_preset(preset) if isinstance(preset, str) else preset
    unet = _load_diffusers(UNet2DConditionModel, sd_dir, "unet")
    vae = _load_diffusers(AutoencoderKL, sd_dir, "vae")
    config = _config_from_diffusers(base, unet, vae, sd_dir)
    with torch.device("meta"):
        avatar = cls(config, init=init, seed=seed)
    avatar.to_empty(device="cpu")
    with torch.no_grad():
        missing, unexpected = avatar.unet.load_state_dict(unet.state_dict(), strict=False)
        if unexpected or any("._expression_attention." not in k for k in missing):
            raise CheckpointError(f"{sd_dir / 'unet'} does not fit the engine's UNet (missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}); use a Stable Diffusion 2.x folder")
        avatar.vae.load_state_dict(vae.state_dict(), strict=True)
        keep = {f"unet.{k}" for k in unet.state_dict()} | {f"vae.{k}" for k in vae.state_dict()}
        avatar.initialize(init, seed, keep=frozenset(keep))
        avatar.prompt_embedding.copy_(empty_prompt_embedding(sd_dir, config))
    return avatar.eval()


def from_release(cls, run_dir, sd_dir, person=0, preset="sd21"):
    """Person `person` of a release run folder (`checkpoints/ckpt-<step>.pt`, the largest step) on the base
    SD weights of `sd_dir` (see `from_diffusers`).

    The expression code size, token count, texture resolution and ambient map are read from the checkpoint's
    tensor shapes; every other key must match the preset exactly (CheckpointError naming the first bad keys).
    """
    ckpt = latest_checkpoint(Path(run_dir))
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unrelated types for damaged or foreign files
        raise CheckpointError(f"{ckpt} is not a readable torch state dict ({e}); download it again") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{ckpt} is not a plain state dict of tensors; pass the release's ckpt-<step>.pt")
    base = from_preset(preset) if isinstance(preset, str) else preset
    config = _config_from_release(base, state, ckpt)
    n_people = state[RELEASE_PLANE_KEYS[0]].shape[0]
    if not isinstance(person, int) or not 0 <= person < n_people:
        raise InputError(f"person {person!r} is out of range: {ckpt} holds {n_people} people (0..{n_people - 1})")

    avatar = from_diffusers(cls, sd_dir, preset=config, init="training")
    targets = {f"controlnet.{k}": v for k, v in avatar.controlnet.state_dict().items()}
    for block in avatar.expression_attention_paths():
        layer = avatar.unet.get_submodule(f"{block}._expression_attention")
        for leaf in RELEASE_EXPRESSION_LEAVES:
            targets[RELEASE_EXPRESSION_LAYER.format(block=block, leaf=leaf)] = layer.get_parameter(leaf)
    targets[RELEASE_EXPRESSION_WEIGHT] = avatar.expression_proj.weight
    targets[RELEASE_EXPRESSION_BIAS] = avatar.expression_proj.bias
    textures = avatar.textures
    for i, key in enumerate(RELEASE_PLANE_KEYS):
        targets[key] = textures.planes[i]
    if textures.ambient is not None:
        targets[RELEASE_AMBIENT_KEY] = textures.ambient

    tables = (*RELEASE_PLANE_KEYS, RELEASE_AMBIENT_KEY)
    check_state_dict({k: v for k, v in targets.items() if k not in tables},
                     {k: v for k, v in state.items() if k not in tables}, str(ckpt))
    c = config.conditioning
    with torch.no_grad():
        for key, target in targets.items():
            value = state[key]
            if key in tables:
                value = texture_from_release_row(value[person], c.texture_resolution, c.texture_channels)
            target.copy_(value)
    return avatar


def latest_checkpoint(run_dir: Path) -> Path:
    """`run_dir/checkpoints/ckpt-<step>.pt` with the largest step (CheckpointError if there is none)."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is missing; pass the release's run folder "
                              "(it holds checkpoints/ckpt-<step>.pt)")
    steps = {int(m.group(1)): p for p in folder.iterdir() if (m := _CKPT.fullmatch(p.name))}
    if not steps:
        raise CheckpointError(f"{folder} holds no ckpt-<step>.pt; download the release's checkpoint into it")
    return steps[max(steps)]


def empty_prompt_embedding(sd_dir: Path, config: AvatarConfig) -> torch.Tensor:
    """`[1, L, D]` float32: CLIP's last hidden state of the empty prompt padded to L = config.prompt_length
    tokens, from `sd_dir/{tokenizer,text_encoder}`; zeros (with a warning) when the folder has neither."""
    shape = (1, config.prompt_length, config.token_dim)
    enc_dir, tok_dir = sd_dir / "text_encoder", sd_dir / "tokenizer"
    if not enc_dir.is_dir() and not tok_dir.is_dir():
        logger.warning("%s has no text_encoder/ and tokenizer/: the prompt embedding is zeros, not the release's "
                       "empty-prompt CLIP embedding; copy both folders from the SD 2.1 checkpoint", sd_dir)
        return torch.zeros(shape)
    for folder in (enc_dir, tok_dir):
        if not folder.is_dir():
            raise CheckpointError(f"{folder} is missing; the prompt needs both text_encoder/ and tokenizer/")
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError as e:
        raise BackendError("embedding the empty prompt needs transformers: pip install transformers "
                           f"(or remove {enc_dir} to use a zero prompt)") from e
    try:
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
        encoder = CLIPTextModel.from_pretrained(enc_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the text encoder from {sd_dir} ({e}); copy text_encoder/ and "
                              "tokenizer/ from the SD 2.1 checkpoint again") from e
    ids = tokenizer([""], padding="max_length", max_length=config.prompt_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        embedding = encoder(ids)[0].float()
    if tuple(embedding.shape) != shape:
        raise ConfigError(f"the text encoder in {sd_dir} gives {tuple(embedding.shape)} for the empty prompt, the "
                          f"avatar needs {shape}; use the text encoder that belongs to this UNet")
    return embedding


def _load_diffusers(model_cls, sd_dir: Path, sub: str):
    if not (sd_dir / sub / "config.json").is_file():
        raise CheckpointError(f"{sd_dir / sub / 'config.json'} is missing; pass a local diffusers Stable Diffusion "
                              f"folder (with unet/ and vae/)")
    try:
        return model_cls.from_pretrained(sd_dir, subfolder=sub, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot load {sd_dir / sub} ({e}); download the folder again") from e


def _config_from_diffusers(base: AvatarConfig, unet, vae, sd_dir: Path) -> AvatarConfig:
    """`base` with the folder's UNet and VAE settings; ConfigError if the engine would build them differently."""
    uc, vc = unet.config, vae.config
    names = [f.name for f in dataclasses.fields(UNetConfig)]
    unet_config = UNetConfig(**{n: tuple(uc[n]) if isinstance(uc[n], list) else uc[n] for n in names})
    vae_config = dataclasses.replace(base.vae, block_out_channels=tuple(vc.block_out_channels),
                                     layers_per_block=vc.layers_per_block, latent_channels=vc.latent_channels,
                                     norm_num_groups=vc.norm_num_groups, scaling_factor=vc.scaling_factor)
    config = base.replace(unet=unet_config, vae=vae_config)
    with torch.device("meta"):
        ours = (UNet2DConditionModel(**unet_config.diffusers_kwargs(config.latent_size, config.vae.latent_channels)),
                AutoencoderKL(**vae_config.diffusers_kwargs(config.image_size)))
    # The preset's image size is kept (the release runs SD 2.1-768 at 512); force_upcast only concerns fp16.
    ignored = {"sample_size", "force_upcast"}
    for theirs, mine, sub in ((unet, ours[0], "unet"), (vae, ours[1], "vae")):
        for key, value in mine.config.items():
            if key.startswith("_") or key in ignored:
                continue
            if _plain(theirs.config.get(key)) != _plain(value):
                raise ConfigError(f"{sd_dir / sub} has {key}={theirs.config.get(key)!r}, the engine builds "
                                  f"{value!r}; only Stable Diffusion 2.x-style models are supported")
    return config


def _config_from_release(base: AvatarConfig, state: dict, ckpt: Path) -> AvatarConfig:
    """`base` with the code size, token count and texture layout read from the checkpoint's shapes."""
    for key in (RELEASE_EXPRESSION_WEIGHT, *RELEASE_PLANE_KEYS):
        if key not in state:
            raise CheckpointError(f"{ckpt} is missing tensor {key!r}; pass a DiffusionAvatars release checkpoint")
    weight = state[RELEASE_EXPRESSION_WEIGHT]
    tokens, rest = divmod(weight.shape[0], base.token_dim)
    tables = [state[k] for k in RELEASE_PLANE_KEYS if k in state] + (
        [state[RELEASE_AMBIENT_KEY]] if RELEASE_AMBIENT_KEY in state else [])
    channels = base.conditioning.texture_channels
    resolution = math.isqrt(tables[0].shape[-1] // channels) if tables[0].dim() == 2 else 0
    if weight.dim() != 2 or rest or tokens < 1:
        raise CheckpointError(f"{ckpt}: {RELEASE_EXPRESSION_WEIGHT} has shape {tuple(weight.shape)}, expected "
                              f"[tokens * {base.token_dim}, code size]; the checkpoint does not fit preset "
                              f"{base.name!r}")
    for t in tables:
        if t.dim() != 2 or t.shape != tables[0].shape or resolution * resolution * channels != t.shape[1]:
            raise CheckpointError(f"{ckpt}: texture tables must all be [people, R*R*{channels}], got "
                                  f"{[tuple(x.shape) for x in tables]}")
    e = weight.shape[1]
    names = base.expression_names if base.expression_dim == e else None
    conditioning = dataclasses.replace(base.conditioning, texture_resolution=resolution,
                                       canonical_dims=5 if RELEASE_AMBIENT_KEY in state else 3)
    return base.replace(expression_dim=e, expression_names=names, expression_tokens=tokens, conditioning=conditioning)


def _plain(value):
    """Config values compare equal whether JSON gave a list or Python a tuple."""
    return tuple(_plain(v) for v in value) if isinstance(value, (list, tuple)) else value
