"""`avatar make-data`: write a synthetic multi-view training dataset (`engine.data.synthetic_dataset`)."""

from __future__ import annotations

import argparse

from .synthetic_dataset import write_synthetic_dataset

DEFAULTS = dict(sequences=12, frames=24, cameras=12, size=128, eval_cameras=1, eval_sequences=2, seed=0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `avatar make-data`."""
    d = DEFAULTS
    p.add_argument("--out", required=True, help="dataset folder to write (must be empty unless --overwrite)")
    p.add_argument("--sequences", type=int, default=d["sequences"],
                   help=f"expression sequences, half sweeps, half combinations (default: {d['sequences']})")
    p.add_argument("--frames", type=int, default=d["frames"], help=f"frames per sequence (default: {d['frames']})")
    p.add_argument("--cameras", type=int, default=d["cameras"], help=f"rig cameras (default: {d['cameras']})")
    p.add_argument("--size", type=int, default=d["size"], help=f"image size in pixels (default: {d['size']})")
    p.add_argument("--eval-cameras", type=int, default=d["eval_cameras"],
                   help=f"cameras held out for evaluation (default: {d['eval_cameras']})")
    p.add_argument("--eval-sequences", type=int, default=d["eval_sequences"],
                   help=f"sequences held out for evaluation (default: {d['eval_sequences']})")
    p.add_argument("--seed", type=int, default=d["seed"], help=f"seed of the expression curves (default: {d['seed']})")
    p.add_argument("--detail", action="store_true",
                   help="give every frame its own fine skin and hair texture, which the mesh does not determine "
                        "(data on which a few-step sampler falls short of many steps: the students' test)")
    p.add_argument("--detail-band", type=_band, default=None, metavar="LOW,HIGH",
                   help="wave numbers of the detail in rad/m (implies --detail; default: 400,700, sized for 128 px: "
                        "use about 160,320 at 64 px)")
    p.add_argument("--psf", type=float, default=0.0, metavar="SIGMA",
                   help="blur every image by a camera's Gaussian point-spread of SIGMA pixels, as optics do (default: "
                        "0, none; the detail teacher of the README's few-step students uses 1)")
    p.add_argument("--overwrite", action="store_true", help="write over a non-empty --out folder")


def _band(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected LOW,HIGH wave numbers in rad/m (e.g. 160,320), got {text!r}") from None
    return low, high


def run(args: argparse.Namespace) -> None:
    """`avatar make-data`: write the dataset and print where it is."""
    path = write_synthetic_dataset(args.out, sequences=args.sequences, frames_per_sequence=args.frames,
                                   cameras=args.cameras, size=args.size, eval_cameras=args.eval_cameras,
                                   eval_sequences=args.eval_sequences, seed=args.seed, overwrite=args.overwrite,
                                   detail=args.detail or args.detail_band is not None, detail_band=args.detail_band,
                                   psf=args.psf)
    print(f"wrote {path.parent} ({args.sequences} sequences x {args.frames} frames x {args.cameras} cameras, "
          f"{args.size}x{args.size}{', per-frame detail' if args.detail or args.detail_band else ''})")
