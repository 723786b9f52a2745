"""`avatar train --avatar PRESET|CONFIG.json|DIR --data DIR --out DIR [--resume] [TrainConfig flags]`.

`--avatar` names what to train: a preset (`tiny`, `sd21`) or an AvatarConfig JSON file (a new avatar, shaped to the
dataset: image size, expression code, canonical dimensions, and the synthetic head model for synthetic data), or an
avatar folder / shipped avatar (fine-tune or continue it: its VAE is kept, so a scratch run skips stage 1).
`--resume` continues the run in --out from its latest checkpoint with the saved settings; only the flags in
`RESUMABLE` may change (e.g. a larger --steps to train longer).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from ..config import PRESETS, AvatarConfig, from_preset
from ..errors import ConfigError, FormatError
from ..files import write_atomic
from . import TrainConfig
from .loop import AVATAR

RUN_FILE = "train.json"
RUN_FORMAT = "diffusion-avatars-engine/train-run"
# Fields a resumed run may change: none of them alters the steps already taken.
RESUMABLE = ("steps", "checkpoint_every", "keep_checkpoints", "validate_every", "validation_frames",
             "validation_steps", "log_every", "num_workers", "cpu")
SYNTHETIC_HEAD = "synthetic"  # head model spec of avatars trained on synthetic data (engine.data.synthetic)

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
        saved = _read_run(out)
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
        _write_run(out, config, data, args.avatar, train_vae)
    validation = validation_items(data, config.validation_frames)
    train(avatar, dataset, out, config, validation=validation, train_vae=train_vae, resume=args.resume)
    print(f"trained avatar: {(out / AVATAR).resolve()}  (avatar render --avatar {out / AVATAR} ...)")


def build_avatar(spec: str, dataset, config: TrainConfig):
    """(Avatar, train_vae) for `--avatar spec`: a folder is loaded as it is (train_vae False); a preset or config
    file is shaped to the dataset (`shape_to_dataset`) and built on the recipe's base (release: the `sd_dir` UNet
    and VAE; scratch: seeded random weights, train_vae = config.trains_vae)."""
    from ..avatars import SHIPPED, shipped_names
    from ..model import Avatar

    path = Path(spec)
    if path.is_dir() or (not path.exists() and spec in shipped_names()):
        return Avatar.from_pretrained(path if path.is_dir() else SHIPPED / spec).train(), False
    if path.is_file():
        try:
            d = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path} is not a readable JSON avatar config ({e})") from e
        if isinstance(d, dict):  # an avatar folder's config.json works too
            d = {k: v for k, v in d.items() if k not in ("format", "format_version")}
        avatar_config = AvatarConfig.from_dict(d)
    elif spec in PRESETS:
        avatar_config = from_preset(spec)
    else:
        raise ConfigError(f"--avatar {spec!r} is not a folder, a JSON config file, a shipped avatar or a preset "
                          f"({sorted(PRESETS)})")
    avatar_config = shape_to_dataset(avatar_config, dataset)
    if config.recipe == "scratch":
        return Avatar(avatar_config, init="training", seed=config.seed).train(), config.trains_vae
    if config.sd_dir is None:
        raise ConfigError("the release recipe fine-tunes a pretrained Stable Diffusion base: pass --sd-dir (a local "
                          "diffusers SD 2.1 folder), an avatar folder as --avatar, or use --recipe scratch")
    return Avatar.from_diffusers(config.sd_dir, preset=avatar_config, init="training", seed=config.seed).train(), False


def shape_to_dataset(config: AvatarConfig, dataset) -> AvatarConfig:
    """`config` with the dataset's image size, expression code (size and names) and canonical dimensions; a synthetic
    dataset also sets the synthetic head model and its `synthetic_version`."""
    width, height = dataset.image_size
    if width != height:
        raise FormatError(f"the dataset's images are {width}x{height}; training needs square images")
    index = dataset.index
    changes = dict(image_size=width, expression_dim=dataset.expression_dim,
                   expression_names=dataset.expression_names,
                   conditioning=dataclasses.replace(config.conditioning, canonical_dims=dataset.canonical_dims))
    if index.synthetic_version is not None:
        changes.update(head_model=SYNTHETIC_HEAD, synthetic_version=index.synthetic_version)
    return config.replace(**changes)


def check_compatible(config: AvatarConfig, dataset) -> None:
    """ConfigError unless the avatar can train on the dataset as it is (image size, code, canonical dims, synthetic
    generator version)."""
    width, height = dataset.image_size
    problems = []
    if (width, height) != (config.image_size, config.image_size):
        problems.append(f"images are {width}x{height}, the avatar renders {config.image_size}x{config.image_size}")
    if dataset.expression_dim != config.expression_dim:
        problems.append(f"codes have {dataset.expression_dim} values, the avatar takes {config.expression_dim}")
    if dataset.canonical_dims != config.conditioning.canonical_dims:
        problems.append(f"meshes carry {dataset.canonical_dims}-D canonical coordinates, the avatar "
                        f"{config.conditioning.canonical_dims}-D")
    version = dataset.index.synthetic_version
    if version is not None and config.synthetic_version is not None and version != config.synthetic_version:
        problems.append(f"the data is synthetic_version {version}, the avatar was trained on version "
                        f"{config.synthetic_version}")
    if problems:
        raise ConfigError(f"avatar {config.name!r} does not fit the dataset {dataset.root}: {'; '.join(problems)}. "
                          "Train a new avatar from a preset (--avatar tiny) or use data made for this one")
    if version is not None:
        from ..data.synthetic import check_synthetic_version

        check_synthetic_version(version, f"the dataset {dataset.root}")


def validation_items(data: str | Path, frames: int) -> list[dict]:
    """`frames` items spread evenly over the dataset's eval split (the train split when it has no eval split)."""
    from ..data.dataset import AvatarDataset

    if frames == 0:
        return []
    try:
        dataset = AvatarDataset(data, "eval")
    except FormatError:  # no held-out cameras or sequences
        dataset = AvatarDataset(data, "train")
    indices = np.linspace(0, len(dataset) - 1, min(frames, len(dataset))).round().astype(int)
    return [dataset[int(i)] for i in indices]


def _write_run(out: Path, config: TrainConfig, data: str, avatar: str, train_vae: bool) -> None:
    from .loop import latest_checkpoint

    if latest_checkpoint(out) is not None:
        raise ConfigError(f"{out} already holds checkpoints; pass --resume to continue that run or choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    doc = {"format": RUN_FORMAT, "version": 1, "train": config.to_dict(), "data": str(Path(data).resolve()),
           "avatar": avatar, "train_vae": train_vae}
    write_atomic(out / RUN_FILE, json.dumps(doc, indent=1) + "\n")


def _read_run(out: Path) -> dict:
    path = out / RUN_FILE
    if not path.is_file():
        raise ConfigError(f"{path} is missing: {out} is not a training run; start one without --resume")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path} is not readable JSON ({e}); start a new run") from e
    if not isinstance(doc, dict) or doc.get("format") != RUN_FORMAT:
        raise FormatError(f"{path} is not a training-run file (format {RUN_FORMAT!r}); start a new run")
    if not (out / AVATAR).is_dir():
        raise ConfigError(f"{out / AVATAR} is missing; the run never reached its first checkpoint: start it again")
    return doc
