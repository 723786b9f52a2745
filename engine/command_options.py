"""Argument helpers shared by the `avatar` command modules (`engine/cli.py` and those its COMMANDS name), kept
apart from them so a command never imports another command to get its options.

A value an option cannot take is refused while parsing, as `avatar <command>: error: argument --x: <what> (<how
to fix>)` with exit code 2 (argparse's own format), before any work starts.
"""

from __future__ import annotations

import argparse

from .devices import DEVICES
from .raster import CHOICES as RASTER_CHOICES

AVATAR_HELP = "a preset (tiny, sd21), an avatar shipped with the package, or an avatar folder"


def add_render_options(p: argparse.ArgumentParser) -> None:
    """The options that pick how frames are rendered (`Renderer`'s backend, sampler, steps, decoder, seed, device,
    dtype, rasteriser); those left out keep the avatar's recorded recipe."""
    p.add_argument("--backend", default=None, help="frame backend: reference, compiled (default: compiled on CUDA, "
                   "reference elsewhere)")
    p.add_argument("--sampler", default=None, choices=["ddpm", "ddim"],
                   help="sampler (default: the avatar's recorded recipe's; without one ddpm, the release's)")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps, 1..50 (default: the avatar's recorded recipe's; without one 20)")
    p.add_argument("--decoder", default=None, choices=["vae", "tiny"],
                   help="decoder: vae, or tiny (the avatar's trained tiny decoder; `avatar distill-decoder`) (default: "
                   "the avatar's recorded recipe's; without one vae)")
    p.add_argument("--seed", type=int, default=None, help="fixed-noise seed (default: the avatar's, 181998)")
    add_device_option(p)
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="precision (default: the backend's: float32 for reference, float16 for compiled)")
    p.add_argument("--raster", default="auto", choices=RASTER_CHOICES,
                   help="rasteriser (default: auto = numba on the CPU where installed, else the torch reference)")
    p.add_argument("--engines", default=None, help="the export folder (`avatar export`) of --backend onnxruntime, "
                   "which --engines implies, or of --backend tensorrt")


def render_backend(args: argparse.Namespace) -> dict:
    """`Renderer`'s `backend` and `backend_options` from `add_render_options`' --backend and --engines (--engines
    alone means onnxruntime); a ConfigError for --engines with a backend that reads no export."""
    from .backends import ENGINE_BACKENDS
    from .errors import ConfigError

    if args.engines is None:
        return {"backend": args.backend, "backend_options": None}
    if args.backend not in (None, *ENGINE_BACKENDS):
        raise ConfigError(f"--engines is for --backend onnxruntime or tensorrt, not {args.backend}; drop one of them")
    return {"backend": args.backend or "onnxruntime", "backend_options": {"engines": args.engines}}


def add_device_option(p: argparse.ArgumentParser) -> None:
    """`--device`, resolved while parsing to a device that exists here (see `device`)."""
    p.add_argument("--device", type=device, default="auto", help=f"torch device: {DEVICES} (default: auto)")


def device(spec: str) -> str:
    """An argparse type: `engine.devices.resolve_device`'s answer as a name, or its refusal as argparse's error."""
    from .devices import resolve_device
    from .errors import AvatarError

    try:
        return str(resolve_device(spec))
    except AvatarError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r} (pass 1 or more)")
    return value
