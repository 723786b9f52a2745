"""`avatar train --avatar PRESET|CONFIG.json|DIR --data DIR --out DIR [--resume] [TrainConfig flags]`.

`--avatar` names what to train (`engine.training.build`: a preset or an AvatarConfig JSON file is a new avatar shaped
to the dataset; an avatar folder or shipped avatar is fine-tuned or continued). `--resume` continues the run in
--out from its latest checkpoint with the saved settings (`engine.training.run_file`); only the flags in
`RESUMABLE` may change (e.g. a larger --steps to train longer).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..errors import ConfigError
from . import TrainConfig
from .build import build_avatar, check_compatible, validation_items
from .loop import AVATAR
from .run_file import RUN_FILE, read_run, write_run

# Fields a resumed run may change: none of them alters the steps already taken.
RESUMABLE = ("steps", "checkpoint_every", "keep_checkpoints", "validate_every", "validation_frames",
             "validation_steps", "log_every", "num_workers", "cpu")

_HELP = {
    "recipe": "release (ControlNet, expression layers, textures on a frozen SD base; needs --sd-dir or an avatar "
              "folder) or scratch (VAE first, then everything)",
    "steps": "diffusion steps (stage 2)", "vae_steps": "stage-1 VAE steps of a scratch run",
    "batch_size": "images per step and process", "lr": "AdamW learning rate of the networks",
    "texture_lr": "learning rate of the neural textures", "vae_lr": "learning rate of the stage-1 VAE",
    "weight_decay": "AdamW weight decay (not on textures)", "grad_clip": "max gradient norm (0: off)",
    "vae_kl_weight": "weight of the stage-1 KL term", "mixed_precision": "no, fp16, bf16 or auto",
    "cpu": "train on the CPU even with a GPU", "seed": "seed of data order, noise and timesteps",
    "crop_min": "random square crops of at least this fraction of the width (1: off; the release: 0.7)",
    "num_workers": "data-loader worker processes", "checkpoint_every": "checkpoint every N steps",
    "keep_checkpoints": "checkpoints kept", "validate_every": "validation renders every N steps (0: off)",
    "validation_frames": "eval frames per validation", "validation_steps": "DDIM steps of validation renders",
    "log_every": "log.jsonl line every N steps", "sd_dir": "local diffusers Stable Diffusion folder (release recipe)",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `avatar train`: --avatar/--data/--out/--resume, then one flag per TrainConfig field (its
    default stays in the dataclass: an unset flag is None here)."""
    p.add_argument("--avatar", help="a preset (tiny, sd21), an AvatarConfig JSON file, or an avatar folder to "
                   "fine-tune (not needed with --resume)")
    p.add_argument("--data", help="dataset folder (`avatar make-data` writes one); default with --resume: the run's")
    p.add_argument("--out", required=True, help="run folder: checkpoints/, avatar/, log.jsonl, validation/")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if isinstance(default, bool):
            p.add_argument(flag, action="store_const", const=True, default=None, help=_HELP[f.name])
        else:
            kind = str if default is None else type(default)
            p.add_argument(flag, type=kind, default=None, help=f"{_HELP[f.name]} (default: {default})")


def _given(args: argparse.Namespace) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name) is not None}


def run(args: argparse.Namespace) -> None:
    """`avatar train`: build or reload the run, train, print where the avatar is."""
    from ..data.dataset import AvatarDataset
    from ..model import Avatar
    from .loop import train

    out = Path(args.out)
    given = _given(args)
    if args.resume:
        saved = read_run(out)
        changed = sorted(k for k, v in given.items() if k not in RESUMABLE and v != saved["train"].get(k))
        if changed:
            raise ConfigError(f"a resumed run keeps its settings; {changed} differ from {out / RUN_FILE}: drop those "
                              f"flags, or start a new run with another --out (resumable: {', '.join(RESUMABLE)})")
        config = TrainConfig.from_dict({**saved["train"], **given})
        data = args.data or saved["data"]
    else:
        if not args.avatar or not args.data:
            raise ConfigError("a new run needs --avatar and --data (or --resume to continue the run in --out)")
        config = TrainConfig.from_dict(given)
        data = args.data
    dataset = AvatarDataset(data, "train")
    if args.resume:
        avatar = Avatar.from_pretrained(out / AVATAR)  # the structure; load_state restores every tensor
        train_vae = saved["train_vae"]
    else:
        avatar, train_vae = build_avatar(args.avatar, dataset, config)
    check_compatible(avatar.config, dataset)
    if not args.resume:
        write_run(out, config, data, args.avatar, train_vae)
    validation = validation_items(data, config.validation_frames)
    train(avatar, dataset, out, config, validation=validation, train_vae=train_vae, resume=args.resume)
    print(f"trained avatar: {(out / AVATAR).resolve()}  (avatar render --avatar {out / AVATAR} ...)")
