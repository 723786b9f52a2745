"""`avatar import-release --run DIR --sd DIR --person N --out DIR`: one person of the authors' released run folder
(model.md, "The release's checkpoints and data") on a local Stable Diffusion 2.1 folder, saved as an avatar folder
(`Avatar.save_pretrained`) that every other command takes as `--avatar`.

The run folder is checked for the files the release writes before anything is loaded, naming the first one
missing. The checkpoint is read with `torch.load(weights_only=True)` (`engine.release.from_release`). The avatar
folder is written beside `--out` under a temporary name and renamed when complete. `--head-model FILE` puts a
learned head model (`avatar fit-head`) into the avatar folder, so `avatar serve` / `avatar drive` pose its mesh.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
from pathlib import Path

from .errors import CheckpointError, InputError
from .files import temp_beside

RUN_FILES = ("model_config.json", "dataset_config.json", "optimization_config.json", "train_setup.json")


def check_release_run(run: Path) -> Path:
    """The newest `checkpoints/ckpt-<step>.pt` of the release run folder `run`; CheckpointError naming the first
    file of the release's layout that is missing."""
    from .release import latest_checkpoint

    if not run.is_dir():
        raise CheckpointError(f"release run folder {run} does not exist; pass the folder that holds "
                              f"{RUN_FILES[0]} and checkpoints/")
    for name in RUN_FILES:
        if not (run / name).is_file():
            raise CheckpointError(f"{run} is not a release run folder: {run / name} is missing (a run folder holds "
                                  f"{', '.join(RUN_FILES)} and checkpoints/ckpt-<step>.pt)")
    return latest_checkpoint(run)


def import_release(run: str | os.PathLike, sd: str | os.PathLike, person: int, out: str | os.PathLike,
                   preset: str = "sd21", head_model: str | os.PathLike | None = None,
                   overwrite: bool = False) -> dict:
    """Write person `person` of the release run `run` on the SD folder `sd` as an avatar folder `out`; returns what
    was found: {"checkpoint", "step", "person", "code_size", "tokens", "planes", "ambient"}."""
    from .heads import load_head_model
    from .model import Avatar

    run, out = Path(run), Path(out)
    ckpt = check_release_run(run)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise InputError(f"--out {out} exists and is not an empty folder; give a new folder (or --overwrite)")
    head = None
    if head_model is not None:
        head = Path(head_model)
        load_head_model(f"learned:{head.name}", head.parent)  # refuses a missing or foreign file before the import
    avatar = Avatar.from_release(run, sd, person=person, preset=preset)
    c = avatar.config
    found = {"checkpoint": str(ckpt), "step": int(re.fullmatch(r"ckpt-(\d+)\.pt", ckpt.name).group(1)),
             "person": person, "code_size": c.expression_dim,
             "tokens": c.expression_tokens, "planes": [3, c.conditioning.texture_resolution,
                                                       c.conditioning.texture_resolution,
                                                       c.conditioning.texture_channels],
             "ambient": c.conditioning.canonical_dims == 5}
    tmp = temp_beside(out, folder=True)
    try:
        if head is not None:
            shutil.copyfile(head, tmp / head.name)
            avatar.config = c.replace(head_model=f"learned:{head.name}")
            avatar.root = tmp
        avatar.save_pretrained(tmp)
        if out.is_dir():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return found


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `avatar import-release`."""
    p.add_argument("--run", required=True, help="the release's run folder (model_config.json, ..., checkpoints/)")
    p.add_argument("--sd", required=True, help="a local diffusers Stable Diffusion 2.1 folder (unet/, vae/, "
                   "text_encoder/, tokenizer/)")
    p.add_argument("--person", type=int, default=0, help="row of the person in the checkpoint's texture tables "
                   "(default: 0)")
    p.add_argument("--out", required=True, help="avatar folder to write")
    p.add_argument("--preset", default="sd21", help="the engine preset the checkpoint was trained on (default: sd21)")
    p.add_argument("--head-model", default=None, help="a learned head model file (`avatar fit-head`) to put into "
                   "the avatar, so that serve/drive pose the person's mesh from a new code")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")


def run(args: argparse.Namespace) -> None:
    """`avatar import-release`: import and print what was found."""
    found = import_release(args.run, args.sd, args.person, args.out, preset=args.preset,
                           head_model=args.head_model, overwrite=args.overwrite)
    r = found["planes"]
    print(f"checkpoint {found['checkpoint']} (step {found['step']}), person {found['person']}")
    print(f"expression code: {found['code_size']} values -> {found['tokens']} tokens")
    print(f"neural textures: {r[0]} planes {r[1]}x{r[2]}x{r[3]}"
          + (f", ambient map {r[1]}x{r[2]}x{r[3]}" if found["ambient"] else ", no ambient map"))
    print(f"wrote {Path(args.out).resolve()}")
