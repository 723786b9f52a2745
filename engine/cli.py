"""The `avatar` command: parses arguments, calls the library, prints. Every subcommand has --help."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from .command_options import AVATAR_HELP, add_render_options, positive_int, render_backend
from .errors import AvatarError

# Commands whose code lives in its own module (`add_arguments(parser)` + `run(args)`), imported only when chosen
# so that `avatar --help` stays fast and works without the optional extras.
COMMANDS = {
    "bench": ("benchmarks.bench", "time each stage of a frame and the frame rate, per backend"),
    "make-data": ("engine.data.write_synthetic", "write a synthetic multi-view training dataset"),
    "import-nersemble": ("engine.data.import_nersemble",
                         "convert the release's tracked NeRSemble data into a training dataset"),
    "import-release": ("engine.release_import",
                       "import one person of the authors' released checkpoint onto a local SD 2.1 folder"),
    "fit-head": ("engine.heads.cli", "fit a person's learned head model (code -> posed mesh) on tracked frames"),
    "train": ("engine.training.cli", "train an avatar on a dataset (accelerate: CPU, one or several GPUs)"),
    "eval": ("engine.evaluation.cli", "render held-out frames and report PSNR, SSIM and flicker"),
    "drive": ("engine.live.drive", "drive an avatar from a video or a webcam (expression transfer)"),
    "fit-driver": ("engine.live.fit", "fit the tracker-to-code map of an avatar on its training frames"),
    "serve": ("engine.live.server", "serve the browser viewer and the code-stream WebSocket"),
    "distill-decoder": ("engine.training.decoder_cli", "train an avatar's tiny decoder from its own latents"),
    "distill": ("engine.training.student_cli", "distil an avatar into a 1- or 2-step student of its reference frames"),
    "export": ("export.command", "export an avatar's networks as ONNX graphs (for --backend onnxruntime) or "
               "TensorRT engines (--backend tensorrt)"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avatar", description="DiffusionAvatars inference engine")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("render", help="render a sequence file to an mp4 or a folder of PNG frames")
    p.add_argument("--avatar", required=True, help=AVATAR_HELP)
    p.add_argument("--sequence", required=True, help="sequence file (JSON; `avatar orbit` writes one), or with "
                   "--dataset the name of one of its tracked sequences")
    p.add_argument("--dataset", default=None, help="a dataset folder of tracked frames (`avatar import-nersemble`): "
                   "render --sequence from its per-frame meshes and codes")
    view = p.add_mutually_exclusive_group()
    view.add_argument("--camera", default=None, help="with --dataset: the recorded camera (serial), square-cropped "
                      "around the head (default: the held-out camera)")
    view.add_argument("--orbit", type=float, default=None, metavar="DEG", help="with --dataset: novel views (the "
                      "release's intrinsics) swinging +-DEG about the head from the camera")
    p.add_argument("--out", required=True, help="OUT.mp4 for a video, anything else is a folder of PNG frames")
    p.add_argument("--alpha", action="store_true", help="RGBA PNG frames with the head mask as alpha")
    p.add_argument("--fps", type=positive_int, default=24, help="video frame rate (default: 24)")
    p.add_argument("--sheet", default=None, help="also write a PNG contact sheet of 16 evenly spaced frames")
    add_render_options(p)

    p = sub.add_parser("info", help="describe an avatar: config, parameter counts, channel layout")
    p.add_argument("--avatar", required=True, help=AVATAR_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("orbit", help="write a default sequence: camera orbit + expression sweep")
    p.add_argument("--avatar", required=True, help=AVATAR_HELP)
    p.add_argument("--frames", type=positive_int, default=48, help="number of frames (default: 48)")
    p.add_argument("--out", required=True, help="sequence file to write (JSON)")
    p.add_argument("--distance", type=float, default=1.0, help="camera distance in metres (default: 1.0)")
    p.add_argument("--yaw", type=float, default=30.0, help="orbit half-angle in degrees (default: 30)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random expression walk for unnamed codes")

    chosen = next((a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")), None)
    for name, (module, text) in COMMANDS.items():
        p = sub.add_parser(name, help=text)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    return parser


def cmd_render(args) -> None:
    """Every input and output is checked before the first frame: the whole sequence against the avatar (codes, and
    that every camera sees the head: `Renderer.check_frames`), the weights (`Avatar.from_pretrained`), and that
    --out and --sheet can be written. The sheet is written before the video or
    frame folder is renamed into place, so a failure leaves neither."""
    from tqdm import tqdm

    from .avatars import load_avatar, resolve_avatar
    from .errors import ConfigError, InputError
    from .files import check_writable
    from .renderer import Renderer
    from .sequence import read_sequence
    from .video import FrameWriter, contact_sheet, write_png

    config = resolve_avatar(args.avatar).config()
    if args.dataset is not None:
        from .data.views import tracked_sequence_frames

        frames = tracked_sequence_frames(args.dataset, args.sequence, config.image_size, args.camera, args.orbit)
    elif args.camera is not None or args.orbit is not None:
        raise ConfigError("--camera and --orbit choose the views of a --dataset sequence; add --dataset DIR")
    else:
        frames = read_sequence(args.sequence, config)
    picks = set(np.linspace(0, len(frames) - 1, min(16, len(frames))).round().astype(int).tolist())
    sheet = []
    if args.sheet:
        check_writable(args.sheet, "the contact sheet")
    # The avatar stays on the CPU: the Renderer puts on the device what its backend needs (a half-precision backend
    # then never holds the float32 networks there too).
    renderer = Renderer(load_avatar(args.avatar), device=args.device, sampler=args.sampler, steps=args.steps,
                        decoder=args.decoder, seed=args.seed, dtype=args.dtype, raster_backend=args.raster,
                        **render_backend(args))
    try:
        renderer.check_frames(frames)
    except InputError as e:
        raise InputError(f"{args.sequence}: {e}") from None
    with FrameWriter(args.out, fps=args.fps, alpha=args.alpha) as writer:
        start = time.perf_counter()
        for i, image in enumerate(tqdm(renderer.stream(frames, alpha=args.alpha), total=len(frames), desc="render",
                                       unit="frame")):
            writer.write(image)
            if i in picks:
                sheet.append(image)
        seconds = time.perf_counter() - start
        if args.sheet:
            write_png(args.sheet, contact_sheet(sheet))
    print(f"wrote {len(frames)} frames to {Path(args.out).resolve()}")
    print(f"recipe {renderer.recipe} ({renderer.backend.name} backend on {renderer.device}): {len(frames)} frames in "
          f"{seconds:.1f} s, {len(frames) / seconds:.1f} frames/s (video writing included)")
    if args.sheet:
        print(f"contact sheet: {Path(args.sheet).resolve()}")


def cmd_info(args) -> None:
    from .avatars import describe, load_avatar

    info = describe(load_avatar(args.avatar, device="meta"))
    if args.json:
        print(json.dumps(info, indent=1))
        return
    c = info["config"]
    print(f"avatar {c['name']}: {c['image_size']}x{c['image_size']} pixels, latent {info['latent_shape']}")
    print(f"conditioning: {info['condition_channels']} channels = "
          + " + ".join(f"{name} {n}" for name, n in info["channel_layout"]))
    names = f" ({', '.join(c['expression_names'])})" if c["expression_names"] else ""
    print(f"expression: {c['expression_dim']} values -> {info['expression_tokens'][0]} tokens x "
          f"{info['expression_tokens'][1]}{names}")
    print("parameters:")
    for name, n in info["parameters"].items():
        print(f"  {name:<24} {n / 1e6:10.3f} M")
    print(f"expression attention ({len(info['expression_attention'])} blocks):")
    for path in info["expression_attention"]:
        print(f"  {path}")
    print(f"head model: {c['head_model']}")
    recipe, tiny = c["recipe"], c["tiny_decoder"]
    print("recipe: " + (f"{recipe['sampler']} {recipe['steps']} steps, {recipe['decoder']} decoder" if recipe else
                        "none recorded (the release's: ddpm 20 steps, vae decoder)"))
    if tiny:
        print(f"tiny decoder: {tiny['channels']} channels, blocks {tiny['blocks']}")


def cmd_orbit(args) -> None:
    from .avatars import load_avatar
    from .sequence import orbit, write_sequence

    config = load_avatar(args.avatar, device="meta").config
    frames = orbit(config, frames=args.frames, distance=args.distance, yaw_deg=args.yaw, seed=args.seed)
    path = write_sequence(args.out, frames, expression_names=config.expression_names)
    print(f"wrote {len(frames)} frames to {path.resolve()}")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that every `with` block (temporary files and folders,
    `engine.files.atomic_path`, `engine.video.FrameWriter`) cleans up on the way out."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def _sigterm_raises():
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit codes: 0 done; 2 a bad argument or input (`avatar <command>: error: ...`, nothing
    written); 130 Ctrl-C (SIGINT) and 143 SIGTERM (`avatar <command>: interrupted (...)`, temporaries removed)."""
    args = build_parser(argv).parse_args(argv)
    try:
        with _sigterm_raises():
            if args.command in COMMANDS:
                importlib.import_module(COMMANDS[args.command][0]).run(args)
            else:
                {"render": cmd_render, "info": cmd_info, "orbit": cmd_orbit}[args.command](args)
    except AvatarError as e:
        print(f"avatar {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        name = "SIGTERM" if isinstance(e, Terminated) else "SIGINT"
        print(f"avatar {args.command}: interrupted ({name})", file=sys.stderr)
        return 128 + getattr(signal, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
