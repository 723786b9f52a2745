"""The run file `<out>/train.json` of a training run: its one writer (`write_run`) and reader (`read_run`).

`{"format": "diffusion-avatars-engine/train-run", "version": 1, "train": TrainConfig.to_dict(), "data": absolute
dataset folder, "avatar": the --avatar argument, "train_vae": bool}`.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError, FormatError
from ..files import read_json, write_atomic
from .loop import AVATAR, latest_checkpoint

RUN_FILE = "train.json"
RUN_FORMAT = "diffusion-avatars-engine/train-run"


def write_run(out: Path, config, data: str, avatar: str, train_vae: bool) -> None:
    """Start the run folder `out` with its run file; ConfigError if `out` already holds a run's checkpoints."""
    if latest_checkpoint(out) is not None:
        raise ConfigError(f"{out} already holds checkpoints; pass --resume to continue that run or choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    doc = {"format": RUN_FORMAT, "version": 1, "train": config.to_dict(), "data": str(Path(data).resolve()),
           "avatar": avatar, "train_vae": train_vae}
    write_atomic(out / RUN_FILE, json.dumps(doc, indent=1) + "\n")


def read_run(out: Path) -> dict:
    """The run file of the run in `out`, as written; ConfigError / FormatError if there is no readable run."""
    path = out / RUN_FILE
    if not path.is_file():
        raise ConfigError(f"{path} is missing: {out} is not a training run; start one without --resume")
    doc = read_json(path, "start a new run")
    if not isinstance(doc, dict) or doc.get("format") != RUN_FORMAT:
        raise FormatError(f"{path} is not a training-run file (format {RUN_FORMAT!r}); start a new run")
    if not (out / AVATAR).is_dir():
        raise ConfigError(f"{out / AVATAR} is missing; the run never reached its first checkpoint: start it again")
    return doc
