"""Argument helpers shared by the `avatar` command modules (`engine/cli.py` and those its COMMANDS name), kept
apart from them so a command never imports another command to get its options.

A value an option cannot take is refused while parsing, as `avatar <command>: error: argument --x: <what> (<how
to fix>)` with exit code 2 (argparse's own format), before any work starts.
"""

from __future__ import annotations

import argparse

AVATAR_HELP = "a preset (tiny, sd21), an avatar shipped with the package, or an avatar folder"
DEVICES = "auto (CUDA when present, else cpu), cpu, cuda or cuda:N"


def add_render_options(p: argparse.ArgumentParser) -> None:
    """The options that pick how frames are rendered (`Renderer`'s backend, sampler, steps, seed, device, dtype,
    rasteriser)."""
    p.add_argument("--backend", default=None, help="frame backend: reference, compiled (default: compiled on CUDA, "
                   "reference elsewhere)")
    p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"], help="sampler (default: ddpm, the release's)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps, 1..50 (default: 20)")
    p.add_argument("--seed", type=int, default=None, help="fixed-noise seed (default: the avatar's, 181998)")
    add_device_option(p)
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="precision (default: the backend's: float32 for reference, float16 for compiled)")
    p.add_argument("--raster", default="torch", choices=["torch", "nvdiffrast"], help="rasteriser (default: torch)")


def add_device_option(p: argparse.ArgumentParser) -> None:
    """`--device`, resolved while parsing to a device that exists here (see `device`)."""
    p.add_argument("--device", type=device, default="auto", help=f"torch device: {DEVICES} (default: auto)")


def device(spec: str) -> str:
    """An argparse type: "auto" -> "cuda" when CUDA is available, else "cpu"; "cpu", "cuda" or "cuda:N" when that
    device exists here; anything else is refused with the reason and the choices."""
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(spec).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unknown device {spec!r} (use {DEVICES})")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = torch.device(spec).index or 0
        if count == 0:
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise argparse.ArgumentTypeError(f"{spec!r} is not available: {why} (use --device cpu, or auto)")
        if index >= count:
            raise argparse.ArgumentTypeError(f"{spec!r} does not exist: this machine has {count} CUDA device(s), "
                                             f"cuda:0 to cuda:{count - 1} (pick one of them, or auto)")
    return spec


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r} (pass 1 or more)")
    return value
