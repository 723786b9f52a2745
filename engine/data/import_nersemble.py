"""`avatar import-nersemble SRC --out DST`: convert the release's tracked NeRSemble data of one person into a
training dataset (`engine.data.nersemble_dataset.convert_nersemble`)."""

from __future__ import annotations

import argparse

from .nersemble import RELEASE_EVAL_CAMERA
from .nersemble_dataset import convert_nersemble


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `avatar import-nersemble`."""
    p.add_argument("src", help="a person's folder of the release's tracked data (calibration/, sequences/)")
    p.add_argument("--out", required=True, help="dataset folder to write (must be empty unless --overwrite)")
    p.add_argument("--sequences", nargs="+", default=None, help="sequences to convert (default: all)")
    p.add_argument("--cameras", nargs="+", default=None, help="camera serials to convert (default: all)")
    p.add_argument("--eval-cameras", nargs="*", default=None, help=f"held-out cameras (default: {RELEASE_EVAL_CAMERA})")
    p.add_argument("--eval-sequences", nargs="*", default=None,
                   help="held-out sequences (default: the release's two for this person)")
    p.add_argument("--every", type=int, default=1, help="keep every n-th timestep (default: 1)")
    p.add_argument("--downscale", type=int, default=1, help="shrink images by this factor (default: 1)")
    p.add_argument("--nphm-tracking", default=None, help="NPHM tracking run folder name, if there are several")
    p.add_argument("--flame-tracking", default=None, help="FLAME tracking run folder name, if there are several")
    p.add_argument("--no-eyes", action="store_true", help="200-D NPHM codes, without the 6 FLAME eye parameters")
    p.add_argument("--no-neck-cut", action="store_true", help="keep the neck (no cut by the FLAME template plane)")
    p.add_argument("--no-matting", action="store_true", help="keep the background (no alpha maps)")
    p.add_argument("--no-color-correction", action="store_true", help="skip the per-camera colour correction")
    p.add_argument("--keep-torso", action="store_true", help="keep the torso (no facer segmentation cut)")
    p.add_argument("--overwrite", action="store_true", help="write over a non-empty --out folder")


def run(args: argparse.Namespace) -> None:
    """`avatar import-nersemble`: convert and print where the dataset is."""
    path = convert_nersemble(
        args.src, args.out, sequences=args.sequences, cameras=args.cameras, eval_cameras=args.eval_cameras,
        eval_sequences=args.eval_sequences, every=args.every, downscale=args.downscale,
        include_eyes=not args.no_eyes, cut_neck=not args.no_neck_cut, matting=not args.no_matting,
        color_correction=not args.no_color_correction, remove_torso=not args.keep_torso,
        nphm_tracking=args.nphm_tracking, flame_tracking=args.flame_tracking, overwrite=args.overwrite)
    print(f"wrote {path.parent}")
