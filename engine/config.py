"""`AvatarConfig`: everything that fixes an avatar's shapes, plus its presets.

Plain frozen dataclasses, JSON round-trippable (`to_dict` / `from_dict`), knowing nothing of torch modules.
Conventions (channel order, ranges, schedule) come from `shared/design/model.md`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .recipe import Recipe, TinyDecoderConfig
from .schema import build_dataclass, check_positive
from .trained_on import TrainedOn

CONFIG_VERSION = 1
# Sanity bounds of the values that size computations but no weights (a typo there must not allocate terabytes).
MAX_IMAGE_SIZE, MAX_TIMESTEPS = 8192, 100_000

# The 8 ARKit-named dimensions of the `tiny` preset and of the synthetic rig.
ARKIT8 = (
    "jawOpen",
    "mouthSmileLeft",
    "mouthSmileRight",
    "browInnerUp",
    "eyeBlinkLeft",
    "eyeBlinkRight",
    "mouthPucker",
    "cheekPuff",
)


@dataclass(frozen=True)
class UNetConfig:
    """Keyword arguments of diffusers' `UNet2DConditionModel` (and of the ControlNet built from it)."""

    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: int = 2
    # diffusers' SD 2.x configs call the number of heads `attention_head_dim` (head width is 64).
    attention_head_dim: tuple[int, ...] = (5, 10, 20, 20)
    cross_attention_dim: int = 1024
    norm_num_groups: int = 32
    use_linear_projection: bool = True
    upcast_attention: bool = True

    def __post_init__(self):
        check_positive("unet", block_out_channels=self.block_out_channels, attention_head_dim=self.attention_head_dim,
                        layers_per_block=self.layers_per_block, cross_attention_dim=self.cross_attention_dim,
                        norm_num_groups=self.norm_num_groups)
        n = len(self.block_out_channels)
        lists = {"down_block_types": self.down_block_types, "up_block_types": self.up_block_types,
                 "attention_head_dim": self.attention_head_dim}
        for name, values in lists.items():
            if len(values) != n:
                raise ConfigError(f"unet.{name} has {len(values)} entries for {n} blocks (give one per entry of "
                                  "unet.block_out_channels)")
        for name, values, known in (("down_block_types", self.down_block_types, DOWN_BLOCKS),
                                    ("up_block_types", self.up_block_types, UP_BLOCKS)):
            if any(v not in known for v in values):
                raise ConfigError(f"unet.{name} {list(values)} names an unknown block (use {list(known)})")
        _check_groups("unet", self.block_out_channels, self.norm_num_groups)
        if any(c % h for c, h in zip(self.block_out_channels, self.attention_head_dim)):
            raise ConfigError(f"unet.block_out_channels {list(self.block_out_channels)} must be multiples of the head "
                              f"counts unet.attention_head_dim {list(self.attention_head_dim)}")

    def diffusers_kwargs(self, sample_size: int, latent_channels: int = 4) -> dict[str, Any]:
        return dict(
            sample_size=sample_size,
            in_channels=latent_channels,
            out_channels=latent_channels,
            block_out_channels=self.block_out_channels,
            down_block_types=self.down_block_types,
            up_block_types=self.up_block_types,
            layers_per_block=self.layers_per_block,
            attention_head_dim=self.attention_head_dim,
            cross_attention_dim=self.cross_attention_dim,
            norm_num_groups=self.norm_num_groups,
            use_linear_projection=self.use_linear_projection,
            upcast_attention=self.upcast_attention,
        )


@dataclass(frozen=True)
class VAEConfig:
    """Keyword arguments of diffusers' `AutoencoderKL`, plus the latent scaling factor."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215

    def __post_init__(self):
        check_positive("vae", block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
                        latent_channels=self.latent_channels, norm_num_groups=self.norm_num_groups)
        _check_groups("vae", self.block_out_channels, self.norm_num_groups)
        if not self.scaling_factor > 0:
            raise ConfigError(f"vae.scaling_factor must be > 0, got {self.scaling_factor!r}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def diffusers_kwargs(self, sample_size: int) -> dict[str, Any]:
        n = len(self.block_out_channels)
        return dict(
            sample_size=sample_size,
            in_channels=3,
            out_channels=3,
            block_out_channels=self.block_out_channels,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            layers_per_block=self.layers_per_block,
            latent_channels=self.latent_channels,
            norm_num_groups=self.norm_num_groups,
            scaling_factor=self.scaling_factor,
        )


@dataclass(frozen=True)
class ScheduleConfig:
    """The noise schedule of model.md: v-prediction, scaled-linear betas rescaled to zero terminal SNR."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "v_prediction"
    rescale_betas_zero_snr: bool = True
    timestep_spacing: str = "trailing"

    def __post_init__(self):
        check_positive("schedule", num_train_timesteps=self.num_train_timesteps)
        if self.num_train_timesteps > MAX_TIMESTEPS:
            raise ConfigError(f"schedule.num_train_timesteps {self.num_train_timesteps} is beyond {MAX_TIMESTEPS} "
                              "(the release trains with 1000)")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ConfigError(f"need 0 < schedule.beta_start < schedule.beta_end < 1, got {self.beta_start!r} and "
                              f"{self.beta_end!r} (the release: 0.00085 and 0.012)")
        if self.prediction_type not in ("v_prediction", "epsilon"):
            raise ConfigError(f"prediction_type {self.prediction_type!r} is unknown; use 'v_prediction' or 'epsilon'")
        if self.rescale_betas_zero_snr and self.prediction_type == "epsilon":
            raise ConfigError(
                "zero terminal SNR cannot be paired with epsilon prediction (the last step's epsilon carries no "
                "signal); use prediction_type='v_prediction' or rescale_betas_zero_snr=False"
            )
        if self.beta_schedule not in ("scaled_linear", "linear"):
            raise ConfigError(f"beta_schedule {self.beta_schedule!r} is unknown; use 'scaled_linear' or 'linear'")
        if self.timestep_spacing not in ("trailing", "leading", "linspace"):
            raise ConfigError(
                f"timestep_spacing {self.timestep_spacing!r} is unknown; use 'trailing', 'leading' or 'linspace'"
            )


@dataclass(frozen=True)
class ConditioningConfig:
    """The conditioning image: which channels, their normalisation ranges, the neural textures' size."""

    canonical_dims: int = 5  # 3 canonical xyz (+ 2 ambient when 5)
    texture_resolution: int = 512
    texture_channels: int = 16
    canonical_min: tuple[float, float, float] = (-1.0, -1.0, -1.5)
    canonical_max: tuple[float, float, float] = (1.0, 1.0, 0.5)
    ambient_min: tuple[float, float] = (-0.2, -0.2)
    ambient_max: tuple[float, float] = (0.2, 0.2)
    depth_max: float = 2.0  # depth in [0, depth_max] maps to [-1, 1]
    znear: float = 0.1
    zfar: float = 2.0

    def __post_init__(self):
        if self.canonical_dims not in (3, 5):
            raise ConfigError(f"canonical_dims must be 3 or 5 (xyz, or xyz + 2 ambient), got {self.canonical_dims}")
        check_positive("conditioning", texture_resolution=self.texture_resolution,
                        texture_channels=self.texture_channels)
        if not 0 < self.znear < self.zfar:
            raise ConfigError(f"need 0 < znear < zfar, got znear={self.znear}, zfar={self.zfar}")

    @property
    def has_ambient(self) -> bool:
        return self.canonical_dims == 5

    def channel_layout(self) -> tuple[tuple[str, int], ...]:
        """The conditioning image's channel groups in order, as (name, count)."""
        c = self.texture_channels
        layout = [("depth", 1), ("canonical", 3), ("normals", 3)]
        if self.has_ambient:
            layout.append(("ambient", 2))
        layout += [("plane_xy", c), ("plane_xz", c), ("plane_yz", c)]
        if self.has_ambient:
            layout.append(("ambient_map", c))
        return tuple(layout)

    @property
    def channels(self) -> int:
        return sum(n for _, n in self.channel_layout())


@dataclass(frozen=True)
class AvatarConfig:
    """Everything that fixes an avatar's shapes. `from_preset(name)` gives the shipped presets."""

    name: str = "sd21"
    image_size: int = 512
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    conditioning_embedding_channels: tuple[int, ...] = (16, 32, 96, 256)
    expression_dim: int = 206  # NPHM expression (200) + FLAME eyes (6)
    expression_names: tuple[str, ...] | None = None
    expression_tokens: int = 4
    prompt_length: int = 77
    head_model: str = "builtin:head"  # see engine.heads.load_head_model
    synthetic_version: int | None = None  # the synthetic generator's version for avatars trained on its data
    trained_on: TrainedOn | None = None  # the training cameras' and codes' ranges and rig; None: not recorded
    noise_seed: int = 181998  # the release's fixed seed: same initial latent and step noise every frame
    recipe: Recipe | None = None  # how it renders by default (engine.recipe); None: the release's, DDPM 20 + VAE
    tiny_decoder: TinyDecoderConfig | None = None  # its trained tiny decoder's shape; None: it has none
    version: int = CONFIG_VERSION

    def __post_init__(self):
        check_positive("", image_size=self.image_size, expression_dim=self.expression_dim,
                        expression_tokens=self.expression_tokens, prompt_length=self.prompt_length,
                        conditioning_embedding_channels=self.conditioning_embedding_channels)
        if self.image_size > MAX_IMAGE_SIZE:
            raise ConfigError(f"image_size {self.image_size} is beyond {MAX_IMAGE_SIZE} pixels (sd21 renders 512)")
        seed = self.noise_seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ConfigError(f"noise_seed must be an integer in [0, 2^63), got {seed!r} (the release's: 181998)")
        if self.image_size % self.vae.downsample:
            raise ConfigError(f"image_size {self.image_size} must be a multiple of the VAE's {self.vae.downsample}")
        if 2 ** (len(self.conditioning_embedding_channels) - 1) != self.vae.downsample:
            raise ConfigError(
                f"the conditioning embedding {self.conditioning_embedding_channels} downsamples by "
                f"{2 ** (len(self.conditioning_embedding_channels) - 1)}, the VAE by {self.vae.downsample}: "
                "give it one entry more than the VAE has downsampling steps"
            )
        if self.expression_names is not None and len(self.expression_names) != self.expression_dim:
            raise ConfigError(
                f"expression_names has {len(self.expression_names)} names for a {self.expression_dim}-value code"
            )
        if self.tiny_decoder is not None:
            self.tiny_decoder.check_fits(self.vae.latent_channels, self.vae.downsample)
        if self.recipe is not None and self.recipe.decoder == "tiny" and self.tiny_decoder is None:
            raise ConfigError("the recipe decodes with the tiny decoder but the avatar has none; train one with "
                              "`avatar distill-decoder`, or record decoder 'vae'")
        if self.trained_on is not None:
            if len(self.trained_on.code_min) != self.expression_dim:
                raise ConfigError(f"trained_on records {len(self.trained_on.code_min)} code dimensions for a "
                                  f"{self.expression_dim}-value code; drop trained_on or fix expression_dim")
            sizes = sorted({(c["width"], c["height"]) for c in self.trained_on.rig})
            if sizes != [(self.image_size, self.image_size)]:
                raise ConfigError(f"trained_on.rig cameras render {sizes}, the avatar {self.image_size}x"
                                  f"{self.image_size}; drop trained_on or fix image_size")

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae.downsample

    @property
    def default_recipe(self) -> Recipe:
        """The recorded recipe, else the release's (DDPM, 20 steps, the VAE decoder)."""
        return self.recipe or Recipe()

    @property
    def condition_channels(self) -> int:
        return self.conditioning.channels

    @property
    def token_dim(self) -> int:
        return self.unet.cross_attention_dim

    # -- JSON -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AvatarConfig":
        """The config of plain JSON values (`to_dict`'s); ConfigError naming the first field that is wrong."""
        if not isinstance(d, dict):
            raise ConfigError(f"an avatar config must be a JSON object, got {type(d).__name__}")
        version = d.get("version", CONFIG_VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ConfigError(f"avatar config version must be a positive integer, got {version!r} (this engine "
                              f"writes {CONFIG_VERSION})")
        if version > CONFIG_VERSION:
            raise ConfigError(
                f"avatar config version {version} is newer than this engine's ({CONFIG_VERSION}); upgrade the engine"
            )
        return build_dataclass(cls, d)

    def replace(self, **changes) -> "AvatarConfig":
        return dataclasses.replace(self, **changes)


DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")


def _check_groups(owner: str, channels: tuple[int, ...], groups: int) -> None:
    if any(c % groups for c in channels):
        raise ConfigError(f"{owner}.block_out_channels {list(channels)} must be multiples of {owner}.norm_num_groups "
                          f"({groups}): group normalisation splits the channels into that many groups")


def _tiny() -> AvatarConfig:
    return AvatarConfig(
        name="tiny",
        image_size=128,
        unet=UNetConfig(
            block_out_channels=(32, 64, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1,
            attention_head_dim=(2, 4, 4),
            cross_attention_dim=32,
            norm_num_groups=8,
        ),
        vae=VAEConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8),
        conditioning=ConditioningConfig(texture_resolution=64, texture_channels=16),
        conditioning_embedding_channels=(16, 16, 32, 32),
        expression_dim=len(ARKIT8),
        expression_names=ARKIT8,
        prompt_length=8,
    )


PRESETS = {"sd21": AvatarConfig, "tiny": _tiny}


def from_preset(name: str) -> AvatarConfig:
    """The config of a named preset (`sd21`, `tiny`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
