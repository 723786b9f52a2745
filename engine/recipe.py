"""How an avatar renders by default (`Recipe`) and the shape of its trained tiny decoder (`TinyDecoderConfig`).

Both are recorded in the avatar folder's `config.json` (`AvatarConfig.recipe`, `AvatarConfig.tiny_decoder`, format
version 3); plain frozen dataclasses that know nothing of torch modules. A recipe is also written as text,
`SAMPLER:STEPS` (`ddim:2`), optionally `+DECODER` (`ddim:1+tiny`): `parse_recipe` is its one reader.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError
from .schema import check_positive

SAMPLERS = ("ddpm", "ddim")
DECODERS = ("vae", "tiny")
MAX_STEPS = 50  # engine.sampling.MAX_STEPS (kept here so that the config module needs no sampler)
OWN = "own"  # the denoiser weights of the avatar itself (a student's, from the distillation issue, is not read yet)


@dataclass(frozen=True)
class Recipe:
    """The frame recipe an avatar renders with when nothing else is asked for.

    sampler "ddpm" | "ddim"; steps 1..50; decoder "vae" (the avatar's VAE decoder) or "tiny" (its trained tiny
    decoder, `AvatarConfig.tiny_decoder`); denoiser: whose ControlNet + UNet weights, "own" (the avatar's). The
    default is the release's recipe (DDPM, 20 steps, the VAE), which avatars without a recorded recipe keep.
    """

    sampler: str = "ddpm"
    steps: int = 20
    decoder: str = "vae"
    denoiser: str = OWN

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"recipe.sampler {self.sampler!r} is unknown; use one of {list(SAMPLERS)}")
        check_positive("recipe", steps=self.steps)
        if self.steps > MAX_STEPS:
            raise ConfigError(f"recipe.steps must be in 1..{MAX_STEPS}, got {self.steps}")
        if self.decoder not in DECODERS:
            raise ConfigError(f"recipe.decoder {self.decoder!r} is unknown; use one of {list(DECODERS)}")
        if self.denoiser != OWN:
            raise ConfigError(f"recipe.denoiser {self.denoiser!r}: this engine renders with the avatar's own denoiser "
                              f"only; use {OWN!r}")

    def __str__(self) -> str:
        return f"{self.sampler}:{self.steps}+{self.decoder}"


def parse_recipe(text: str, decoder: str | None = None) -> Recipe:
    """`SAMPLER:STEPS[+DECODER]` (e.g. `ddim:2`, `ddim:1+tiny`) -> Recipe; `decoder` fills in a missing `+DECODER`
    (default "vae"). ConfigError saying how to write one otherwise."""
    if not isinstance(text, str):
        raise ConfigError(f"a recipe is written SAMPLER:STEPS[+DECODER], got {text!r}")
    head, _, tail = text.strip().partition("+")
    sampler, colon, steps = head.partition(":")
    if not colon or not steps.strip().isdigit():
        raise ConfigError(f"unknown recipe {text!r}: write SAMPLER:STEPS[+DECODER] with a sampler of "
                          f"{list(SAMPLERS)}, 1..{MAX_STEPS} steps and a decoder of {list(DECODERS)} "
                          "(e.g. ddim:2+tiny)")
    try:
        return Recipe(sampler=sampler.strip(), steps=int(steps), decoder=tail.strip() or decoder or "vae")
    except ConfigError as e:
        raise ConfigError(f"unknown recipe {text!r}: {e}") from None


def parse_recipes(text: str, decoders: str | None = None) -> list[Recipe]:
    """A comma-separated list of recipes (`ddim:1,ddim:2,ddpm:20`), each with every decoder of the comma-separated
    `decoders` that its text does not name itself."""
    names = [d.strip() for d in (decoders or "vae").split(",") if d.strip()]
    for name in names:
        if name not in DECODERS:
            raise ConfigError(f"unknown decoder {name!r}; use a comma-separated list of {list(DECODERS)}")
    recipes: list[Recipe] = []
    for part in (p for p in text.split(",") if p.strip()):
        for recipe in ([parse_recipe(part)] if "+" in part else [parse_recipe(part, d) for d in names]):
            if recipe not in recipes:
                recipes.append(recipe)
    if not recipes:
        raise ConfigError(f"no recipe in {text!r}; write e.g. ddim:1,ddim:2,ddpm:20")
    return recipes


@dataclass(frozen=True)
class TinyDecoderConfig:
    """A TAESD-shaped decoder (diffusers' `DecoderTiny`: conv/ReLU/nearest-upsample only, no normalisation, no
    attention) from the avatar's latent to its image.

    latent_channels: the avatar's VAE latent channels; channels: the width of every stage, or one width per stage
    (narrower at the higher resolutions, where a conv costs 4x per upsampling); blocks: residual blocks per stage,
    one stage per resolution, so `len(blocks) - 1` upsamplings by 2 (it must match the VAE's downsampling).
    TAESD's own (SD scale): 64 channels, blocks (3, 3, 3, 1). Its input is the diffusion latent (the VAE's latent
    times the scaling factor), its output an image nominally in [-1, 1].
    """

    latent_channels: int = 4
    channels: int | tuple[int, ...] = 64
    blocks: tuple[int, ...] = (3, 3, 3, 1)

    def __post_init__(self):
        check_positive("tiny_decoder", latent_channels=self.latent_channels, channels=self.channels,
                       blocks=self.blocks)
        if isinstance(self.channels, tuple) and len(self.channels) != len(self.blocks):
            raise ConfigError(f"tiny_decoder.channels has {len(self.channels)} widths for {len(self.blocks)} stages "
                              f"(blocks {list(self.blocks)}); give one width per stage, or one for all")

    @property
    def widths(self) -> tuple[int, ...]:
        """The width of each stage, lowest resolution first."""
        return self.channels if isinstance(self.channels, tuple) else (self.channels,) * len(self.blocks)

    @property
    def upsample(self) -> int:
        return 2 ** (len(self.blocks) - 1)

    def check_fits(self, latent_channels: int, downsample: int) -> None:
        """ConfigError unless this decoder takes the avatar's latent (`latent_channels` at 1/`downsample`)."""
        if self.latent_channels != latent_channels or self.upsample != downsample:
            raise ConfigError(
                f"the tiny decoder takes {self.latent_channels}-channel latents and upsamples by {self.upsample}, the "
                f"avatar's latent has {latent_channels} channels at 1/{downsample} of the image side; give it "
                f"latent_channels={latent_channels} and {downsample.bit_length()} entries in blocks "
                "(retrain it with `avatar distill-decoder`)")
