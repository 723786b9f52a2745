"""`avatar serve`: parse the arguments, build the `RenderWorker`, serve the viewer app (`engine.live.app`) with
uvicorn until interrupted."""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from ..command_options import AVATAR_HELP, device, positive_int
from ..devices import DEVICES
from ..errors import InputError
from ..raster import CHOICES as RASTER_CHOICES
from .access import WILDCARD_HOSTS, AccessPolicy
from .app import create_app, host_warning, uvicorn_config
from .protocol import MAX_MESSAGE_BYTES
from .session import SessionLimits
from .worker import RenderWorker


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--avatar", required=True, help=AVATAR_HELP)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, loopback "
                        "only; anything else is reachable from other machines, requires a token and prints a "
                        "warning)")
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
    parser.add_argument("--raster", default="auto", choices=RASTER_CHOICES, help="rasteriser (default: auto = numba "
                        "on the CPU where installed, else the torch reference)")
    parser.add_argument("--engines", default=None, help="an export folder (`avatar export`): the default backend on "
                        "the CPU becomes onnxruntime, which renders it (tensorrt too, named in --backends)")
    parser.add_argument("--map", default=None, help="expression map file for webcam driving (`avatar fit-driver`); "
                        "default: by name, for ARKit-coded avatars such as tiny")
    parser.add_argument("--max-message-bytes", type=int, default=MAX_MESSAGE_BYTES,
                        help=f"largest accepted message (default: {MAX_MESSAGE_BYTES})")
    access = parser.add_argument_group("access (README: Serving to other machines)")
    access.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                        help="an origin (scheme://host[:port]) whose pages may use this server, e.g. a page that "
                        "embeds the viewer (repeatable; default: only the server's own page)")
    access.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="a Host name the server answers to besides the address it listens on, e.g. its DNS "
                        "name (repeatable)")
    access.add_argument("--token", default=None, help="the token clients must present (default: none on loopback, "
                        "a generated one printed at start otherwise)")
    access.add_argument("--tls-cert", default=None, metavar="FILE",
                        help="PEM certificate: serve HTTPS and WSS (with --tls-key); needed for the webcam and "
                        "to keep the token private on any host but loopback")
    access.add_argument("--tls-key", default=None, metavar="FILE", help="PEM private key of --tls-cert")
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-clients", type=positive_int, default=SessionLimits.max_clients,
                        help=f"most open connections (default: {SessionLimits.max_clients})")
    limits.add_argument("--max-trackers", type=positive_int, default=4,
                        help="most webcam clients tracked at once; one face tracker each (default: 4)")
    limits.add_argument("--max-message-rate", type=positive_int, default=int(SessionLimits.message_rate),
                        help="messages a second one client may send; beyond it they are dropped (default: "
                        f"{int(SessionLimits.message_rate)})")


def build_worker(args) -> RenderWorker:
    from ..avatars import load_avatar
    from ..backends import default_backend

    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip()) if args.backends else \
        (default_backend(args.device, args.engines),)
    avatar = load_avatar(args.avatar, device=args.device)
    # Each request is rendered before the next is taken (one frame in flight); its decoder is the recipe's.
    recipe = avatar.config.recipe
    return RenderWorker(avatar, device=args.device, sampler=args.sampler or (recipe.sampler if recipe else "ddim"),
                        steps=args.steps if args.steps is not None else recipe.steps if recipe else 2,
                        max_steps=args.max_steps,
                        backends=backends, seed=args.seed,
                        dtype=args.dtype, raster_backend=args.raster, max_message_bytes=args.max_message_bytes,
                        expression_map=args.map, max_trackers=args.max_trackers, engines=args.engines)


def access_policy(args) -> AccessPolicy:
    """--host/--port/--allow-origin/--allow-host/--token/--tls-* -> the policy (bad values: InputError)."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise InputError("--tls-cert and --tls-key go together; pass both (a PEM certificate and its key)")
    for flag, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if path is not None and not Path(path).is_file():
            raise InputError(f"{flag} {path}: no such file (pass a PEM file, e.g. from your CA or mkcert)")
    return AccessPolicy.for_server(args.host, args.port, args.allow_origin, args.allow_host, args.token,
                                   tls=args.tls_cert is not None)


def run(args) -> None:
    """`avatar serve`: check the access options, build the worker, warn about non-loopback hosts, serve until
    interrupted."""
    import uvicorn

    policy = access_policy(args)
    worker = build_worker(args)
    warning = host_warning(policy)
    if warning:
        print(warning, file=sys.stderr)
    print(f"avatar serve: {worker.config.name} on {policy.page_url()} (Ctrl-C to stop)", flush=True)
    if args.host in WILDCARD_HOSTS:  # other machines need a name of this one
        print(f"  from other machines: {policy.page_url(socket.gethostname())}", flush=True)
    limits = SessionLimits(max_clients=args.max_clients, message_rate=float(args.max_message_rate),
                           burst=2 * args.max_message_rate)
    tls = (args.tls_cert, args.tls_key) if policy.tls else None
    uvicorn.Server(uvicorn_config(create_app(worker, policy, limits), args.host, args.port, worker, tls)).run()


def main(argv: list[str] | None = None) -> int:
    """`python -m engine.live.server ...`, the same as `avatar serve ...`."""
    from ..cli import main as avatar_main

    return avatar_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
