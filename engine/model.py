"""`Avatar`: the diffusers modules of one avatar, its expression attention, textures and prompt, and its
folder format (`config.json` + `model.safetensors`).

`predict` (one denoiser evaluation) and `decode` are the reference that every fast backend is compared with;
they do exactly what the release does (model.md, "One frame" and "Details an engine needs").
Importers of foreign weights (a diffusers SD folder, the authors' release) live in `engine.release`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .conditioning import NeuralTextures
from .config import AvatarConfig, from_preset
from .devices import resolve_device
from .errors import CheckpointError, ConfigError, InputError
from .expression import TOKENS_KWARG, add_expression_attention, expression_attention_paths
from .files import atomic_path, check_state_dict, read_json, write_atomic
from .init import seeded_init, training_init
from .tiny_decoder import build_tiny_decoder

FORMAT = "diffusion-avatars-engine/avatar"
# 2: the config records what the avatar was trained on (`AvatarConfig.trained_on`); version 1 folders load with None
# 3: its recipe and tiny decoder (`AvatarConfig.recipe`, `.tiny_decoder`); older folders load with None (no tiny
#    decoder, the release's recipe)
FORMAT_VERSION = 3
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INITS = ("random", "training")

# init="random" must give frames that visibly depend on mesh, camera and expression, so the layers the
# release starts at zero get a real scale here. The conditioning embedding (convs + SiLU, no norms) needs a
# gain of ~2 per layer to keep its signal from fading over its 8 layers; ControlNet output convs at gain 2
# make the head's outline show through the random UNet and decoder in a few sampler steps, and expression
# output projections at gain 4 move the tiny preset's frames by ~5/255 per code dimension (checked by eye and by
# the renderer's tests) without saturating the picture.
RANDOM_GAINS = {
    "._expression_attention.to_out.": 4.0,
    "controlnet.controlnet_cond_embedding.": 2.0,
    "controlnet.controlnet_down_blocks.": 2.0,
    "controlnet.controlnet_mid_block.": 2.0,
}
# Tensors drawn with standard deviation 1 (like the release's N(0, 1) textures).
UNIT_TENSORS = ("textures.", "prompt_embedding")


class Avatar(nn.Module):
    """One avatar: UNet (+ expression attention), ControlNet, VAE, expression projection, neural textures,
    prompt embedding, and its head model.

    Args:
        config: the shapes (`AvatarConfig`).
        init: "random" (every layer random, frames depend visibly on all inputs) or "training" (the release's
            start of training: ControlNet copied from the UNet with zero output convs, expression attention
            copied from the text cross-attention with a zero output projection).
        seed: weights are a function of (seed, tensor name) only; built under `torch.device("meta")` nothing
            is allocated or initialised.
        root: folder that a relative `mesh:<file>` head model resolves against.
    Attributes: `unet`, `controlnet`, `vae` (diffusers), `expression_proj` (nn.Linear, the release's
    `expression_codes_mlp`), `textures` (NeuralTextures), buffer `prompt_embedding` `[1, L, D]` float32,
    `head_model` (plain attribute: `engine.heads.HeadModel` or None), `tiny_decoder` (`engine.tiny_decoder`, with
    `config.tiny_decoder`; else None).
    """

    def __init__(self, config: AvatarConfig, init: str = "random", seed: int = 0, root: str | Path | None = None):
        super().__init__()
        if not isinstance(config, AvatarConfig):
            raise ConfigError(
                f"Avatar needs an AvatarConfig, got {type(config).__name__}; use engine.config.from_preset"
            )
        if init not in INITS:
            raise ConfigError(f"unknown init {init!r}; use one of {INITS}")
        self.config = config
        self.root = Path(root) if root is not None else None
        # The ambient default device (e.g. from `with torch.device("meta")`) decides where weights live.
        device = torch.empty(0).device
        # Built on meta and materialised once below: diffusers' own init would be wasted work, as every
        # tensor is re-drawn by the seeded init anyway.
        with torch.device("meta"):
            unet = UNet2DConditionModel(**config.unet.diffusers_kwargs(config.latent_size, config.vae.latent_channels))
            # Built from the still-plain UNet, so the ControlNet has diffusers' own parameter names and no
            # expression attention (the release has none in the ControlNet).
            self.controlnet = ControlNetModel.from_unet(
                unet,
                conditioning_embedding_out_channels=config.conditioning_embedding_channels,
                conditioning_channels=config.condition_channels,
            )
            add_expression_attention(unet, config.token_dim)
            self.unet = unet
            self.vae = AutoencoderKL(**config.vae.diffusers_kwargs(config.image_size))
            self.expression_proj = nn.Linear(config.expression_dim, config.expression_tokens * config.token_dim)
            self.textures = NeuralTextures(config.conditioning)
            self.register_buffer("prompt_embedding", torch.zeros(1, config.prompt_length, config.token_dim))
            self.tiny_decoder = None if config.tiny_decoder is None else build_tiny_decoder(config.tiny_decoder)
        # The head model holds real data even when the networks stay on meta (e.g. `avatar info`).
        with torch.device("cpu"):
            head = _load_head_model(config.head_model, self.root)
        self.__dict__["head_model"] = head  # never a submodule: not part of the weights
        if device.type != "meta":
            # No diffusers module used here has non-persistent buffers, so every tensor is (re)drawn below.
            self.to_empty(device=device)
            self.initialize(init, seed)

    @property
    def is_meta(self) -> bool:
        return self.prompt_embedding.is_meta

    @torch.no_grad()
    def initialize(self, init: str = "random", seed: int = 0, keep: frozenset[str] = frozenset()) -> None:
        """(Re)initialise all weights (see the class doc), except the state-dict entries named in `keep`."""
        if init not in INITS:
            raise ConfigError(f"unknown init {init!r}; use one of {INITS}")
        seeded_init(self, seed, unit=UNIT_TENSORS, gains=RANDOM_GAINS if init == "random" else None, skip=keep)
        if init == "training":
            training_init(self.unet, self.controlnet)

    @classmethod
    def from_preset(cls, name: str, seed: int = 0, init: str = "random") -> "Avatar":
        """An avatar of a named preset (`engine.config.PRESETS`) with seeded weights."""
        return cls(from_preset(name), init=init, seed=seed)

    # -- the frame's maths ----------------------------------------------------------------------
    def expression_tokens(self, code: torch.Tensor) -> torch.Tensor:
        """Expression code `[E]` or `[B, E]` (float; E = config.expression_dim) -> tokens `[B, T, D]` in the
        projection's dtype and device (T = config.expression_tokens, D = config.token_dim)."""
        code = torch.as_tensor(code)
        e = self.config.expression_dim
        if code.dim() == 1:
            code = code[None]
        if code.dim() != 2 or code.shape[-1] != e:
            got = f"{code.shape[-1]} values" if code.dim() == 2 else f"shape {tuple(code.shape)}"
            names = f" ({', '.join(self.config.expression_names)})" if self.config.expression_names else ""
            raise InputError(
                f"expression code has {got}, avatar {self.config.name!r} expects {e}{names}; pass [{e}] or [B, {e}]"
            )
        if not code.is_floating_point():
            code = code.float()
        if not torch.isfinite(code).all():
            raise InputError("expression code contains NaN or Inf; replace missing values (e.g. with 0) first")
        weight = self.expression_proj.weight
        tokens = self.expression_proj(code.to(device=weight.device, dtype=weight.dtype))
        return tokens.view(code.shape[0], self.config.expression_tokens, self.config.token_dim)

    def predict(
        self, latent: torch.Tensor, timestep: torch.Tensor, condition: torch.Tensor, tokens: torch.Tensor
    ) -> torch.Tensor:
        """One denoiser evaluation exactly as the release: ControlNet residuals, then the UNet.

        latent `[B, c, h, w]` (c = config.vae.latent_channels), timestep LongTensor `[]` or `[B]`, condition
        `[B, C, fh, fw]` (f = config.vae.downsample, C = config.condition_channels, values in [-1, 1] as built by
        `build_condition`), tokens `[B, T, D]` (`expression_tokens`), all on the avatar's device. Returns the
        prediction (v for the release's schedule) `[B, c, h, w]` in the UNet's compute dtype.
        """
        self._check_predict(latent, timestep, condition, tokens)
        prompt = self.prompt_embedding.expand(latent.shape[0], -1, -1)
        down, mid = self.controlnet(
            latent,
            timestep,
            encoder_hidden_states=prompt,
            controlnet_cond=condition,
            conditioning_scale=1.0,
            return_dict=False,
        )
        return self.unet(
            latent,
            timestep,
            encoder_hidden_states=prompt,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            cross_attention_kwargs={TOKENS_KWARG: tokens},
            return_dict=False,
        )[0]

    def decode(self, latent: torch.Tensor, decoder: str = "vae") -> torch.Tensor:
        """Latent `[B, c, h, w]` -> image `[B, 3, fh, fw]` (f = config.vae.downsample), nominally in [-1, 1] (not
        clamped, like the release, which clamps when converting to 8-bit). `decoder`: "vae" (the release's) or
        "tiny" (the avatar's trained tiny decoder, `tiny_decoder`)."""
        if latent.dim() != 4 or latent.shape[1] != self.config.vae.latent_channels:
            raise InputError(
                f"decode needs a latent [B, {self.config.vae.latent_channels}, h, w], got {tuple(latent.shape)}"
            )
        if decoder == "tiny":
            return self.check_decoder(decoder)(latent)
        self.check_decoder(decoder)
        return self.vae.decode(latent / self.config.vae.scaling_factor, return_dict=False)[0]

    def check_decoder(self, decoder: str) -> nn.Module:
        """The module of `decoder` ("vae" or "tiny"); ConfigError for another name or a tiny decoder it lacks."""
        if decoder not in ("vae", "tiny"):
            raise ConfigError(f"unknown decoder {decoder!r}; choose 'vae' or 'tiny'")
        if decoder == "tiny" and self.tiny_decoder is None:
            raise ConfigError(f"avatar {self.config.name!r} has no tiny decoder; train one with `avatar "
                              "distill-decoder`, or use decoder='vae'")
        return self.tiny_decoder if decoder == "tiny" else self.vae.decoder

    def _check_predict(self, latent, timestep, condition, tokens) -> None:
        c = self.config
        if latent.dim() != 4 or latent.shape[1] != c.vae.latent_channels:
            raise InputError(f"latent must be [B, {c.vae.latent_channels}, h, w], got {tuple(latent.shape)}")
        b, _, h, w = latent.shape
        f = c.vae.downsample
        if tuple(condition.shape) != (b, c.condition_channels, h * f, w * f):
            raise InputError(
                f"condition must be [{b}, {c.condition_channels}, {h * f}, {w * f}] for a latent "
                f"{tuple(latent.shape)}, got {tuple(condition.shape)}; build it with "
                "engine.conditioning.build_condition"
            )
        if tuple(tokens.shape) != (b, c.expression_tokens, c.token_dim):
            raise InputError(
                f"tokens must be [{b}, {c.expression_tokens}, {c.token_dim}], got {tuple(tokens.shape)}; "
                "make them with Avatar.expression_tokens (one code per latent)"
            )
        if not isinstance(timestep, torch.Tensor) or timestep.dim() > 1 or timestep.numel() not in (1, b):
            raise InputError(f"timestep must be a tensor [] or [{b}], got {timestep!r}")

    # -- facts ------------------------------------------------------------------------------------
    def expression_attention_paths(self) -> list[str]:
        """Module paths inside `unet` of the transformer blocks with expression attention (15 for sd21)."""
        return expression_attention_paths(self.unet)

    def parameter_counts(self) -> dict[str, int]:
        """Parameter counts per part (works on meta)."""
        expr = sum(
            p.numel()
            for path in self.expression_attention_paths()
            for p in self.unet.get_submodule(path)._expression_attention.parameters()
        )
        vae = self.vae
        return {
            "unet": _count(self.unet) - expr,
            "expression_attention": expr,
            "expression_projection": _count(self.expression_proj),
            "controlnet": _count(self.controlnet),
            "vae_encoder": _count(vae.encoder) + _count(getattr(vae, "quant_conv", None)),
            "vae_decoder": _count(vae.decoder) + _count(getattr(vae, "post_quant_conv", None)),
            "textures": _count(self.textures),
            **({"tiny_decoder": _count(self.tiny_decoder)} if self.tiny_decoder is not None else {}),
        }

    # -- the avatar folder ------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> Path:
        """Write `config.json` + `model.safetensors` (+ the file of a file-backed head model: `mesh:`, `learned:`).

        Every file is written under a temporary name and renamed, config.json last, so an interrupted save
        never leaves a half-written file behind. Returns the folder.
        """
        if self.is_meta:
            raise CheckpointError("this avatar was built on the meta device and has no weights; build it on 'cpu'")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = self.config
        mesh = _existing_head_file(config.head_model, self.root)
        if mesh is not None:
            config = config.replace(head_model=f"{config.head_model.strip().partition(':')[0]}:{mesh.name}")
            if not (folder / mesh.name).exists() or not (folder / mesh.name).samefile(mesh):
                with atomic_path(folder / mesh.name) as tmp:
                    shutil.copyfile(mesh, tmp)
        tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.state_dict().items()}
        with atomic_path(folder / WEIGHTS_FILE) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        meta = {**config.to_dict(), "format": FORMAT, "format_version": FORMAT_VERSION}
        write_atomic(folder / CONFIG_FILE, json.dumps(meta, indent=1) + "\n")
        return folder

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> "Avatar":
        """Load an avatar folder written by `save_pretrained`, strictly (CheckpointError on any mismatch).

        Built on meta and filled with the stored tensors, so weights are allocated once, on `device`, with
        floating tensors cast to `dtype`. Returned in eval mode.
        """
        folder = Path(folder)
        config = read_config(folder)
        weights = folder / WEIGHTS_FILE
        if not weights.is_file():
            raise CheckpointError(f"{weights} is missing; an avatar folder needs {CONFIG_FILE} and {WEIGHTS_FILE} "
                                  "(write one with Avatar.save_pretrained)")
        resolve_device(device, allow_meta=True)
        try:
            tensors = load_file(str(weights), device=str(device))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{weights} is not a readable safetensors file ({e}); save the avatar again") from e
        with torch.device("meta"):
            avatar = cls(config, root=folder)
        check_state_dict(avatar.state_dict(), tensors, str(weights))
        cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        _check_finite_weights(tensors, cast, weights)
        avatar.load_state_dict(cast, strict=True, assign=True)
        return avatar.eval()

    @classmethod
    def from_diffusers(cls, sd_dir: str | Path, preset: str | AvatarConfig = "sd21", init: str = "training",
                       seed: int = 0) -> "Avatar":
        """An avatar on a local diffusers Stable Diffusion folder (see `engine.release.from_diffusers`)."""
        from .release import from_diffusers

        return from_diffusers(cls, sd_dir, preset=preset, init=init, seed=seed)

    @classmethod
    def from_release(cls, run_dir: str | Path, sd_dir: str | Path, person: int = 0,
                     preset: str | AvatarConfig = "sd21") -> "Avatar":
        """One person of the authors' released checkpoint (see `engine.release.from_release`)."""
        from .release import from_release

        return from_release(cls, run_dir, sd_dir, person=person, preset=preset)


def read_config(folder: Path) -> AvatarConfig:
    """The `AvatarConfig` of an avatar folder (CheckpointError if missing, unreadable or of another format)."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; pass a folder written by Avatar.save_pretrained "
                              f"(it holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    data = read_json(path, "save the avatar again", CheckpointError)
    if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
        raise CheckpointError(f"{path} is not an avatar config (its 'format' is not {FORMAT!r}); "
                              "pass a folder written by Avatar.save_pretrained")
    version = data.pop("format_version", None)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version {version!r}; this engine reads 1 to {FORMAT_VERSION} "
                              "(upgrade the engine, or save the avatar again)")
    try:
        return AvatarConfig.from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def _check_finite_weights(stored: dict[str, torch.Tensor], cast: dict[str, torch.Tensor], source: Path) -> None:
    """CheckpointError naming the first tensor that holds NaN or Inf as loaded (`cast`): damaged weights (a training
    run that diverged renders black frames), or finite `stored` ones beyond the range of the dtype cast to."""
    for key, t in cast.items():
        if not t.is_floating_point() or bool(torch.isfinite(t).all()):
            continue
        n_nan, n_inf = int(torch.isnan(stored[key]).sum()), int(torch.isinf(stored[key]).sum())
        if n_nan == n_inf == 0:
            raise CheckpointError(f"{source}: tensor {key} reaches {float(stored[key].abs().max()):.4g}, beyond the "
                                  f"range of {t.dtype} (load the avatar in float32 or bfloat16)")
        raise CheckpointError(f"{source}: tensor {key} holds {n_nan} NaN and {n_inf} Inf values of {t.numel()} (the "
                              "weights are damaged, e.g. by a training run that diverged: restore the avatar, or "
                              "retrain from an earlier checkpoint)")


def _count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _load_head_model(spec: str, root: Path | None):
    from .heads import load_head_model

    return load_head_model(spec, root=root)


def _existing_head_file(spec: str, root: Path | None) -> Path | None:
    """The file of a file-backed head model such as `mesh:<file>` (`engine.heads.head_file`), else None;
    CheckpointError if missing."""
    from .heads import head_file

    path = head_file(spec, root)
    if path is not None and not path.is_file():
        raise CheckpointError(f"the head model file {path} does not exist; put it back or change config.head_model")
    return path
