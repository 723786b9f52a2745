"""`avatar serve`: parse the arguments, build the `RenderWorker`, serve the viewer app (`engine.live.app`) with
uvicorn until interrupted."""

from __future__ import annotations

import argparse
import sys

from ..command_options import AVATAR_HELP, device
from ..devices import DEVICES
from .app import create_app, host_warning, uvicorn_config
from .protocol import MAX_MESSAGE_BYTES
from .worker import RenderWorker


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--avatar", required=True, help=AVATAR_HELP)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, loopback "
                        "only; anything else is reachable from other machines and prints a warning)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--device", type=device, default="auto", help=f"torch device: {DEVICES} (default: auto)")
    parser.add_argument("--sampler", default=None, choices=["ddpm", "ddim"],
                        help="sampler (default: the avatar's recorded recipe's; without one ddim, sharp at few steps)")
    parser.add_argument("--steps", type=int, default=None, help="default denoising steps (default: the avatar's "
                        "recorded recipe's; without one 2)")
    parser.add_argument("--max-steps", type=int, default=20, help="the most steps a client may choose (default: 20)")
    parser.add_argument("--backends", default=None, help="comma-separated backends clients may choose, the first "
                        "being the default (default: the device's default backend)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="precision (default: the backend's)")
    parser.add_argument("--seed", type=int, default=None, help="fixed-noise seed (default: the avatar's)")
    parser.add_argument("--raster", default="torch", choices=["torch", "nvdiffrast"], help="rasteriser")
    parser.add_argument("--map", default=None, help="expression map file for webcam driving (`avatar fit-driver`); "
                        "default: by name, for ARKit-coded avatars such as tiny")
    parser.add_argument("--max-message-bytes", type=int, default=MAX_MESSAGE_BYTES,
                        help=f"largest accepted message (default: {MAX_MESSAGE_BYTES})")


def build_worker(args) -> RenderWorker:
    from ..avatars import load_avatar
    from ..backends import default_backend

    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip()) if args.backends else \
        (default_backend(args.device),)
    avatar = load_avatar(args.avatar, device=args.device)
    # Each request is rendered before the next is taken (one frame in flight); its decoder is the recipe's.
    recipe = avatar.config.recipe
    return RenderWorker(avatar, device=args.device, sampler=args.sampler or (recipe.sampler if recipe else "ddim"),
                        steps=args.steps if args.steps is not None else recipe.steps if recipe else 2,
                        max_steps=args.max_steps,
                        backends=backends, seed=args.seed,
                        dtype=args.dtype, raster_backend=args.raster, max_message_bytes=args.max_message_bytes,
                        expression_map=args.map)


def run(args) -> None:
    """`avatar serve`: build the worker, warn about non-loopback hosts, serve until interrupted."""
    import uvicorn

    worker = build_worker(args)
    warning = host_warning(args.host)
    if warning:
        print(warning, file=sys.stderr)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"avatar serve: {worker.config.name} on http://{host}:{args.port}/ (Ctrl-C to stop)", flush=True)
    uvicorn.Server(uvicorn_config(create_app(worker), args.host, args.port, worker)).run()


def main(argv: list[str] | None = None) -> int:
    """`python -m engine.live.server ...`, the same as `avatar serve ...`."""
    from ..cli import main as avatar_main

    return avatar_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
