"""What a training run starts from: the avatar that `--avatar` names, shaped to the dataset (`build_avatar`), the
check that an avatar fits a dataset (`check_compatible`), the frames validation renders (`validation_items`), and
the record of the training data the avatar keeps (`trained_on`).

`--avatar` (`engine.avatars.resolve_avatar`, config files allowed) names a preset (`tiny`, `sd21`) or an
AvatarConfig JSON file: a new avatar, shaped to the dataset (image size, expression code, canonical dimensions, and
the synthetic head model for synthetic data); or an avatar folder / shipped avatar: fine-tune or continue it as it
is (its VAE is kept, so a scratch run skips stage 1).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ..config import AvatarConfig
from ..errors import ConfigError, FormatError
from ..trained_on import TrainedOn

SYNTHETIC_HEAD = "synthetic"  # head model spec of avatars trained on synthetic data (engine.data.synthetic)


def build_avatar(spec: str, dataset, config):
    """(Avatar, train_vae) for `--avatar spec` and the `TrainConfig` `config`: a folder is loaded as it is
    (train_vae False); a preset or config file is shaped to the dataset (`shape_to_dataset`) and built on the
    recipe's base (release: the `sd_dir` UNet and VAE; scratch: seeded random weights, train_vae =
    config.trains_vae)."""
    from ..avatars import resolve_avatar
    from ..model import Avatar

    source = resolve_avatar(spec, config_files=True)
    if source.folder is not None:
        return Avatar.from_pretrained(source.folder).train(), False
    avatar_config = shape_to_dataset(source.config(), dataset)
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
    # trained_on: a config file may be another avatar's config.json; this one is trained afresh (train records it)
    changes = {"image_size": width, "expression_dim": dataset.expression_dim,
               "expression_names": dataset.expression_names, "trained_on": None,
               "conditioning": dataclasses.replace(config.conditioning, canonical_dims=dataset.canonical_dims)}
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


def trained_on(dataset) -> TrainedOn:
    """The `TrainedOn` record of an `AvatarDataset` split (the items a run trains on): the ranges of its cameras'
    orbit angles and distances (`engine.orbit.orbit_angles`) and of its frames' codes, and every camera of the
    dataset (its rig)."""
    from ..orbit import orbit_angles

    cameras = sorted({camera for _, camera, _ in dataset.samples})
    angles = np.array([orbit_angles(dataset.cameras[name]) for name in cameras])  # [C, 3]: yaw, pitch, distance
    frames = sorted({(sequence, t) for sequence, _, t in dataset.samples})
    codes = np.stack([dataset.expression(sequence, t).numpy() for sequence, t in frames])  # [N, E]
    low, high = angles.min(0).tolist(), angles.max(0).tolist()
    return TrainedOn(azimuth_deg=(low[0], high[0]), elevation_deg=(low[1], high[1]), distance=(low[2], high[2]),
                     code_min=tuple(codes.min(0).tolist()), code_max=tuple(codes.max(0).tolist()),
                     rig=tuple(camera.to_dict() for camera in dataset.cameras.values()))
