"""`train()`: the accelerate loop of `avatar train` (one CPU, one GPU or several GPUs, the same code).

Out folder:
    <out>/train.json                  the run (`run_file.write_run`: TrainConfig, data, avatar spec)
    <out>/checkpoints/step-XXXXXX/    accelerate state: model, optimisers, grad scaler, RNG, `TrainState`
    <out>/avatar/                     the latest avatar (`Avatar.save_pretrained`; `avatar render --avatar` reads it)
    <out>/log.jsonl                   one JSON object per log / validation event
    <out>/validation/step-XXXXXX.png  prediction | ground truth | error, one row per validation frame

Reproducibility: the data order and every draw of step s come from generators seeded by (seed, s, process), not
from global RNG streams, so resuming from a checkpoint replays the uninterrupted run exactly (bit-identical on
the CPU at a fixed thread count), whatever happened in between (validation renders, data-loader workers).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from ..errors import BackendError, CheckpointError, ConfigError
from ..files import write_atomic
from ..init import tensor_seed
from .build import trained_on
from .objectives import TrainingModule, crop_batch, draw, measure_scaling_factor, rasterize_batch

if TYPE_CHECKING:
    from . import TrainConfig

CHECKPOINTS = "checkpoints"
AVATAR = "avatar"
LOG = "log.jsonl"
SCALE_IMAGES = 64  # images the stage-1 scaling factor is measured on


class TrainState:
    """What accelerate's `save_state` cannot know: the global step (stage 1 then stage 2) and the scaling factor
    measured after stage 1 (None before)."""

    def __init__(self):
        self.step = 0
        self.scaling_factor: float | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "scaling_factor": self.scaling_factor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.scaling_factor = int(state["step"]), state["scaling_factor"]


class StepBatches(Sampler):
    """Batch indices for steps `start`..`end - 1`: step s takes positions [s W B + r B, s W B + (r + 1) B) of an
    endless stream of epochs, each a permutation of the dataset seeded by (seed, epoch) (W processes, this is
    process r, B the per-process batch size). Starting at any step needs no replay of earlier ones."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, end: int, rank: int = 0, world: int = 1):
        if n < 1:
            raise ConfigError("the training dataset is empty; check the --data folder's train split")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start, self.end, self.rank, self.world = start, end, rank, world

    def _epoch(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(tensor_seed(self.seed, f"epoch:{epoch}"))
        return torch.randperm(self.n, generator=generator).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        cache: dict[int, list[int]] = {}
        for step in range(self.start, self.end):
            first = (step * self.world + self.rank) * self.batch_size
            batch = []
            for position in range(first, first + self.batch_size):
                epoch = position // self.n
                if epoch not in cache:
                    cache = {epoch: self._epoch(epoch)}
                batch.append(cache[epoch][position % self.n])
            yield batch

    def __len__(self) -> int:
        return max(0, self.end - self.start)


def resolve_mixed_precision(value: str, cpu: bool) -> str:
    """accelerate's mixed_precision for `value` ("auto" resolved); ConfigError where the device lacks it."""
    cuda = torch.cuda.is_available() and not cpu
    if value == "auto":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "no"
    if value == "fp16" and not cuda:
        raise ConfigError("fp16 mixed precision needs a CUDA device; use --mixed-precision bf16 or no on the CPU")
    return value


def parameter_groups(avatar, recipe: str) -> dict[str, list[torch.nn.Parameter]]:
    """The trained tensors of a recipe: "networks" (stage 2, lr), "clipped" (their gradient-clipped subset),
    "textures" (texture_lr, no weight decay) and "vae" (stage 1 of the scratch recipe)."""
    expression = [p for n, p in avatar.unet.named_parameters() if "._expression_attention." in n]
    if recipe == "release":
        networks = [*avatar.controlnet.parameters(), *expression, *avatar.expression_proj.parameters()]
        clipped = list(avatar.controlnet.parameters())
    else:
        networks = [*avatar.unet.parameters(), *avatar.controlnet.parameters(), *avatar.expression_proj.parameters()]
        clipped = networks
    return {"networks": networks, "clipped": clipped, "textures": list(avatar.textures.parameters()),
            "vae": list(avatar.vae.parameters())}


def latest_checkpoint(out: Path) -> Path | None:
    """`<out>/checkpoints/step-XXXXXX` with the largest step, or None."""
    folder = out / CHECKPOINTS
    steps = sorted(p for p in folder.glob("step-*") if p.is_dir() and p.name[5:].isdigit()) if folder.is_dir() else []
    return steps[-1] if steps else None


def train(avatar, dataset, out: str | Path, config: "TrainConfig", *, validation: Sequence[dict] = (),
          train_vae: bool | None = None, resume: bool = False, collate_fn: Callable | None = None):
    """Train `avatar` (an `engine.model.Avatar`, modified in place and returned) on `dataset` (an
    `engine.data.dataset.AvatarDataset` split, recorded as the avatar's `config.trained_on`) for `config`; write
    checkpoints, the avatar and the log to `out`. `validation`: dataset items rendered every
    `config.validate_every` steps. `train_vae` (default: `config.trains_vae`) runs stage 1 first. `resume`
    continues from the latest checkpoint in `out`."""
    try:
        from accelerate import Accelerator, DistributedDataParallelKwargs
        from accelerate.state import AcceleratorState
        from accelerate.utils import set_seed
    except ImportError as e:
        raise BackendError("training needs accelerate: pip install 'diffusion-avatars-engine[train]'") from e
    if collate_fn is None:
        from ..data.dataset import collate as collate_fn
    out = Path(out)
    avatar.config = avatar.config.replace(trained_on=trained_on(dataset))  # saved with every checkpoint's avatar
    train_vae = config.trains_vae if train_vae is None else train_vae
    vae_steps = config.vae_steps if train_vae else 0
    total = vae_steps + config.steps
    # accelerate keeps its settings in a process-wide singleton: forget an earlier train()'s (not the process
    # group), so runs in one process may use different precisions
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(config.mixed_precision, config.cpu), cpu=config.cpu,
        # stage 1 leaves the diffusion networks unused and stage 2 the VAE
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=train_vae)],
    )
    set_seed(config.seed)
    groups = parameter_groups(avatar, config.recipe)
    avatar.requires_grad_(False)
    for name in ("networks", "textures") + (("vae",) if train_vae else ()):
        for p in groups[name]:
            p.requires_grad_(True)
    module = TrainingModule(avatar, config.vae_kl_weight, sample_latents=config.recipe == "release").train()
    optimizer = torch.optim.AdamW([
        {"params": groups["networks"], "lr": config.lr, "weight_decay": config.weight_decay},
        {"params": groups["textures"], "lr": config.texture_lr, "weight_decay": 0.0},
    ])
    optimizers = [optimizer]
    if train_vae:
        optimizers.append(torch.optim.AdamW(groups["vae"], lr=config.vae_lr, weight_decay=config.weight_decay))
    model, *optimizers = accelerator.prepare(module, *optimizers)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    if resume:
        checkpoint = latest_checkpoint(out)
        if checkpoint is None:
            raise CheckpointError(f"{out / CHECKPOINTS} holds no step-XXXXXX checkpoint to resume from; start the "
                                  "run without --resume")
        accelerator.load_state(str(checkpoint))
        if state.scaling_factor is not None:
            _set_scaling_factor(avatar, state.scaling_factor)
        if accelerator.is_main_process:
            _truncate_log(out / LOG, state.step)
    elif latest_checkpoint(out) is not None:
        raise ConfigError(f"{out} already holds checkpoints; pass --resume to continue that run or choose a new --out")
    out.mkdir(parents=True, exist_ok=True)

    device, rank = accelerator.device, accelerator.process_index
    loader = DataLoader(dataset, collate_fn=collate_fn, num_workers=config.num_workers,
                        batch_sampler=StepBatches(len(dataset), config.batch_size, config.seed, state.step, total,
                                                  rank, accelerator.num_processes))
    bar = tqdm(total=total, initial=state.step, desc="train", unit="step",
               disable=not accelerator.is_local_main_process)
    running, counted, tick = torch.zeros((), device=device), 0, time.time()
    for batch in loader:
        step = state.step
        stage = "vae" if step < vae_steps else "diffusion"
        if stage == "diffusion" and train_vae and state.scaling_factor is None:
            state.scaling_factor = _measure(avatar, dataset, collate_fn)
            _set_scaling_factor(avatar, state.scaling_factor)
            _log(accelerator, out, {"step": step, "event": "vae_scaling_factor", "value": state.scaling_factor})
        generator = torch.Generator().manual_seed(tensor_seed(config.seed, f"step:{step}:rank:{rank}"))
        draws = draw(generator, len(batch["image"]), avatar.config, config.crop_min).to(device)
        images, cameras = crop_batch(batch["image"].to(device), batch["camera"], draws.crops)
        raster = rasterize_batch(batch["mesh"], cameras, avatar.config, device) if stage == "diffusion" else None
        loss = model(images, raster, batch["expression"].to(device), draws, stage)
        accelerator.backward(loss)
        opt = optimizers[1] if stage == "vae" else optimizers[0]
        if config.grad_clip > 0 and accelerator.sync_gradients:
            accelerator.clip_grad_norm_(groups["vae" if stage == "vae" else "clipped"], config.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state.step += 1
        running += loss.detach()
        counted += 1
        bar.update(1)
        if state.step % config.log_every == 0 or state.step == total:
            mean = accelerator.reduce(running, "mean").item() / counted
            bar.set_postfix(stage=stage, loss=f"{mean:.4f}")
            _log(accelerator, out, {"step": state.step, "stage": stage, "loss": mean,
                                    "seconds_per_step": (time.time() - tick) / counted})
            running, counted, tick = torch.zeros((), device=device), 0, time.time()
        if state.step % config.checkpoint_every == 0 or state.step == total:
            _checkpoint(accelerator, avatar, out, state.step, config.keep_checkpoints)
        due = config.validate_every and (state.step % config.validate_every == 0 or state.step == total)
        if stage == "diffusion" and validation and config.validation_frames and due:
            if accelerator.is_main_process:
                scores = _validate(avatar, validation, config, out, state.step, device)
                _log(accelerator, out, {"step": state.step, "event": "validation", **scores})
            accelerator.wait_for_everyone()
    bar.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return avatar.eval()


def _set_scaling_factor(avatar, value: float) -> None:
    """Store the measured latent scaling factor in the avatar's (frozen) config and its diffusers VAE config."""
    avatar.config = avatar.config.replace(vae=dataclasses.replace(avatar.config.vae, scaling_factor=float(value)))
    avatar.vae.register_to_config(scaling_factor=float(value))


def _measure(avatar, dataset, collate_fn) -> float:
    """The stage-1 scaling factor of the posterior means (what stage 2 diffuses) over up to SCALE_IMAGES images spread
    evenly over the dataset (the same on every process, so no broadcast is needed)."""
    n = min(SCALE_IMAGES, len(dataset))
    indices = np.linspace(0, len(dataset) - 1, n).round().astype(int).tolist()
    images = collate_fn([dataset[i] for i in indices])["image"]
    return measure_scaling_factor(avatar.vae, images)


def _checkpoint(accelerator, avatar, out: Path, step: int, keep: int) -> None:
    """accelerate state into `<out>/checkpoints/step-XXXXXX` (written under a temporary name, then renamed, so a
    crash never leaves a half checkpoint that --resume would pick), the oldest beyond `keep` removed, and the
    avatar folder rewritten."""
    folder = out / CHECKPOINTS
    final, tmp = folder / f"step-{step:06d}", folder / f".step-{step:06d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(p for p in folder.glob("step-*") if p.is_dir())[:-keep]:
            shutil.rmtree(old)
        avatar.save_pretrained(out / AVATAR)
    accelerator.wait_for_everyone()


def _validate(avatar, items: Sequence[dict], config: "TrainConfig", out: Path, step: int, device) -> dict:
    """Render `items` with DDIM (`config.validation_steps`), score them against their images, save the grid;
    returns the mean scores. The Renderer freezes the avatar: its flags and training mode are restored."""
    from ..evaluation.scores import frame_scores, save_grid, target_images, to_unit
    from ..renderer import Renderer

    flags = {p: p.requires_grad for p in avatar.parameters()}
    try:
        renderer = Renderer(avatar, device=device, sampler="ddim", steps=config.validation_steps, backend="reference")
        items = list(items)[: config.validation_frames]
        pred = renderer.render_batch([it["camera"] for it in items], torch.stack([it["expression"] for it in items]),
                                     [it["mesh"] for it in items])
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        avatar.train()
    pred = to_unit(pred)
    target, mask = target_images(items)
    scores = frame_scores(pred, target, mask)
    save_grid(out / "validation" / f"step-{step:06d}.png", pred, target)
    return {k: float(np.mean([s[k] for s in scores])) for k in ("psnr", "psnr_mask", "ssim")}


def _log(accelerator, out: Path, record: dict) -> None:
    if accelerator.is_main_process:
        with open(out / LOG, "a") as f:
            f.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint being resumed (the resumed run writes them again)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    write_atomic(path, "".join(f"{line}\n" for line in kept))
