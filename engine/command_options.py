"""Argument helpers shared by the `avatar` command modules (`engine/cli.py` and those its COMMANDS name), kept
apart from them so a command never imports another command to get its options."""

from __future__ import annotations

import argparse

AVATAR_HELP = "a preset (tiny, sd21), an avatar shipped with the package, or an avatar folder"


def add_render_options(p: argparse.ArgumentParser) -> None:
    """The options that pick how frames are rendered (`Renderer`'s backend, sampler, steps, seed, device, dtype,
    rasteriser)."""
    p.add_argument("--backend", default=None, help="frame backend: reference, compiled (default: compiled on CUDA, "
                   "reference elsewhere)")
    p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"], help="sampler (default: ddpm, the release's)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps, 1..50 (default: 20)")
    p.add_argument("--seed", type=int, default=None, help="fixed-noise seed (default: the avatar's, 181998)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="precision (default: the backend's: float32 for reference, float16 for compiled)")
    p.add_argument("--raster", default="torch", choices=["torch", "nvdiffrast"], help="rasteriser (default: torch)")
