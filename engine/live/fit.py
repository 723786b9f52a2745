"""`avatar fit-driver`: fit a tracker -> code map (`engine.live.map_fitting.fit_driver`) on an avatar's own
training frames, save it, print the held-out error."""

from __future__ import annotations

import argparse

from ..command_options import AVATAR_HELP
from ..errors import ConfigError, InputError
from .expression_map import FEATURES


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`avatar fit-driver`'s arguments."""
    p.add_argument("--avatar", required=True, help=AVATAR_HELP)
    p.add_argument("--data", required=True, help="the avatar's training data folder (`avatar make-data` format)")
    p.add_argument("--out", required=True, help="expression map file to write (.npz), for `avatar drive --map`")
    p.add_argument("--features", default="coefficients", choices=sorted(FEATURES),
                   help="tracker output to regress from: the ARKit-named coefficients or the pose-normalised "
                        "landmark offsets (default: coefficients)")
    p.add_argument("--alpha", type=float, default=None, help="ridge penalty (default: chosen on training frames)")
    p.add_argument("--max-items", type=int, default=None, help="track at most this many dataset images, spread "
                   "evenly (default: all)")


def run(args) -> None:
    """`avatar fit-driver`: fit, save, print the held-out error."""
    from ..avatars import resolve_avatar
    from ..data.dataset import AvatarDataset
    from .map_fitting import fit_driver

    config = resolve_avatar(args.avatar).config()  # without its weights
    dataset = AvatarDataset(args.data, split="all")
    if dataset.expression_dim != config.expression_dim:
        raise ConfigError(f"dataset {args.data} has {dataset.expression_dim}-value codes but avatar {config.name!r} "
                          f"takes {config.expression_dim}; pass the data the avatar was trained on")
    if args.max_items is not None and args.max_items < 4:
        raise InputError(f"--max-items must be >= 4, got {args.max_items}")
    m = fit_driver(dataset, config.expression_names, args.features, args.alpha, args.max_items)
    path = m.save(args.out)
    r = m.metrics
    print(f"tracked {r['tracked']} of {r['items']} images; fitted on {r['train']}, held out {r['heldout']} "
          f"(alpha {r['alpha']:g})")
    print(f"held-out RMSE {r['rmse']:.4f} (predicting the mean: {r['baseline_rmse']:.4f}), R^2 {r['r2']:.3f}")
    print(f"wrote {path.resolve()}")
