"""`distill_student`: a 1- or 2-step student of an avatar (its teacher), regressed onto the teacher's reference frames.

With the avatar's fixed noise a recipe is a deterministic map from (condition, tokens) to a latent, so the teacher's
many-step recipe (`teacher_recipe`; default DDPM-20, the release's: its frames are the ones the authors evaluate and
the teacher was trained for) gives each frame's target latent z_t. The student, the teacher's structure initialised
from its weights, runs the shared loop (`engine.sampling.denoise`) for `steps` DDIM steps from the same initial
latent and learns

    |z_s - z_t|^2 + image_weight * |D(z_s) - D(z_t)|^2        (D: the teacher's frozen decoder, [-1, 1] units)

D is the decoder `teacher_recipe` names (`ddpm:20` the VAE's, `ddpm:20+tiny` the teacher's trained tiny decoder): the
reference frames are that recipe's, decoder included, and the student's recipe decodes with the same one.

Only the ControlNet and the UNet train; the neural textures, the expression projection and the VAE stay the
teacher's, so the condition and the tokens of a frame are the teacher's and one conditioner serves both.

Run folder `<out>/student-run/`:
    targets.pt          the teacher's target latents of the training frames (made in batches once; the frames are
                        regenerated from the seed: the head model's or the dataset's)
    checkpoints/step-N/ accelerate state: the student's networks, the optimiser, RNG, the step (`TrainState`)
    log.jsonl           one JSON object per logged step
Then `<out>` is the student avatar folder, recording its recipe (DDIM `steps` + the reference's decoder) and
`distilled.json` (teacher, settings, held-out figures).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..errors import BackendError, CheckpointError, ConfigError
from ..files import atomic_path, write_atomic
from ..init import tensor_seed
from ..metrics import psnr, sharpness
from ..recipe import Recipe, parse_recipe
from .decoder import recipe_latents, training_frames
from .loop import CHECKPOINTS, TrainState, latest_checkpoint, resolve_mixed_precision

RUN = "student-run"
STUDENT_STEPS = (1, 2)
TEACHER_FEW_STEPS = (1, 2, 4)  # the teacher's own few-step figures reported beside the student's


@dataclass(frozen=True)
class StudentConfig:
    """The settings of a run (a resumed run must keep them: they are checked against `config.json` in the run)."""

    steps: int = 1
    teacher_recipe: str = "ddpm:20"
    frames: int = 400
    iterations: int = 2000
    batch_size: int = 4
    lr: float = 5e-5
    image_weight: float = 1.0
    seed: int = 0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if self.steps not in STUDENT_STEPS:
            raise ConfigError(f"a student takes 1 or 2 steps, got --steps {self.steps}")
        teacher = parse_recipe(self.teacher_recipe)
        if teacher.steps <= self.steps:
            raise ConfigError(f"the teacher's recipe {self.teacher_recipe} must take more steps than the student's "
                              f"{self.steps}")
        for name in ("frames", "iterations", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)) or not self.image_weight >= 0:
            raise ConfigError(f"lr must be positive and image_weight at least 0, got {self.lr}, {self.image_weight}")

    @property
    def decoder(self) -> str:
        """The decoder of the reference frames, the image term and the student's recipe ("vae" or "tiny")."""
        return parse_recipe(self.teacher_recipe).decoder


class StudentModule(nn.Module):
    """The student avatar and its loss: forward(condition, tokens, target latents) -> scalar loss (inside forward,
    as DDP needs). The sampler and the fixed noise are the student's recipe's; `decoder` the image term's ("vae" or
    "tiny", frozen)."""

    def __init__(self, student, sampler, noise, image_weight: float, decoder: str = "vae"):
        super().__init__()
        student.check_decoder(decoder)
        self.avatar, self.sampler, self.noise, self.image_weight = student, sampler, noise, image_weight
        self.decoder = decoder

    def latents(self, condition: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        from ..sampling import denoise

        timesteps = self.sampler.timesteps.to(condition.device)
        return denoise(lambda i, x: self.avatar.predict(x, timesteps[i], condition, tokens), self.sampler,
                       self.noise, batch=condition.shape[0])

    def forward(self, condition: torch.Tensor, tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        latent = self.latents(condition, tokens)
        loss = F.mse_loss(latent, target)
        if self.image_weight > 0:
            decode = self.avatar.decode
            loss = loss + self.image_weight * F.mse_loss(decode(latent, self.decoder), decode(target, self.decoder))
        return loss


def check_teacher(teacher) -> None:
    """ConfigError unless `teacher` is an avatar a student can be made of."""
    from ..model import Avatar

    if not isinstance(teacher, Avatar):
        raise ConfigError(f"the teacher must be an engine.model.Avatar, got {type(teacher).__name__}")
    if teacher.is_meta:
        raise ConfigError("the teacher has no weights (built on the meta device); load it with Avatar.from_pretrained")


def check_structure(student, teacher) -> None:
    """ConfigError unless `student` has the teacher's structure (every tensor's shape) outside the tiny decoder:
    distillation trains the denoiser, and a tiny decoder is trained apart (`avatar distill-decoder`), so either may
    have one of any shape, or none."""
    a, b = (_without_tiny_decoder(m.state_dict()) for m in (student, teacher))
    wrong = sorted(set(a) ^ set(b)) + sorted(k for k in set(a) & set(b) if a[k].shape != b[k].shape)
    if wrong:
        raise ConfigError(f"the student does not match its teacher's structure ({len(wrong)} tensors differ, e.g. "
                          f"{wrong[0]!r}); distil from the teacher it was made of, or start another --out")


def _without_tiny_decoder(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("tiny_decoder.")}


def distill_student(teacher, out: str | Path, config: StudentConfig, *, data=None, resume: bool = False,
                    held_out: int = 8, max_minutes: float | None = None, checkpoint_every: int = 100,
                    log_every: int = 10) -> dict:
    """Distil (module docstring); returns {"done", "step", "result" (held-out figures, when done)}. With
    `max_minutes` it stops cleanly after that long (checkpoint written); `resume=True` goes on exactly."""
    try:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
    except ImportError as e:
        raise BackendError("distillation needs accelerate: pip install 'diffusion-avatars-engine[train]'") from e
    from ..sampling import FixedNoise, NoiseSchedule, make_sampler

    check_teacher(teacher)
    teacher.check_decoder(config.decoder)  # before anything is written: a +tiny reference needs a tiny decoder
    out, run = Path(out), Path(out) / RUN
    if latest_checkpoint(run) is not None and not resume:
        raise CheckpointError(f"{run} holds a run already; pass --resume to go on with it, or choose another --out")
    if resume and latest_checkpoint(run) is None:
        raise CheckpointError(f"{run / CHECKPOINTS} holds no checkpoint to resume from; start without --resume")
    settings = dataclasses.asdict(config)
    if resume and json.loads((run / "config.json").read_text()) != settings:
        raise CheckpointError(f"{run / 'config.json'} was written with other settings; resume with those, or start "
                              "another --out")
    teacher = teacher.eval().requires_grad_(False)
    frames = training_frames(teacher, config.frames, config.seed, data)  # first: it refuses a teacher it cannot pose
    run.mkdir(parents=True, exist_ok=True)
    write_atomic(run / "config.json", json.dumps(settings, indent=1).encode())
    targets_path = run / "targets.pt"
    if targets_path.exists():
        targets = torch.load(targets_path, map_location="cpu", weights_only=True)
    else:
        targets = recipe_latents(teacher, frames, parse_recipe(config.teacher_recipe), 8, "teacher targets")
        with atomic_path(targets_path) as tmp:
            torch.save(targets, tmp)
    if targets.shape[0] != len(frames):
        raise CheckpointError(f"{targets_path} holds {targets.shape[0]} targets for {len(frames)} frames; delete it")

    AcceleratorState._reset_state()
    cpu = not torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(config.mixed_precision, cpu), cpu=cpu)
    device = accelerator.device
    student = _initial_student(teacher, config)
    sampler = make_sampler("ddim", NoiseSchedule(teacher.config.schedule), config.steps)
    shape = (teacher.config.vae.latent_channels, teacher.config.latent_size, teacher.config.latent_size)
    noise = FixedNoise(shape, config.steps, teacher.config.noise_seed).to(device)
    module = StudentModule(student, sampler, noise, config.image_weight, config.decoder).train()
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    model, optimizer = accelerator.prepare(module, optimizer)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    if resume:
        accelerator.load_state(str(latest_checkpoint(run)))
    condition_of = _conditioner(teacher, device)
    t0, step = time.perf_counter(), state.step
    with tqdm(total=config.iterations, initial=step, desc="distill", unit="step",
              disable=not accelerator.is_local_main_process) as bar:
        while step < config.iterations:
            g = torch.Generator().manual_seed(tensor_seed(config.seed, f"student-step:{step}"))
            picks = torch.randint(len(frames), (config.batch_size,), generator=g).tolist()
            condition, tokens = condition_of([frames[i] for i in picks])
            loss = model(condition, tokens, targets[picks].to(device))
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step = state.step = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.5f}")
            if accelerator.is_main_process and (step % log_every == 0 or step == config.iterations):
                with open(run / "log.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, "loss": loss.item(), "time": time.time()}) + "\n")
            out_of_time = max_minutes is not None and time.perf_counter() - t0 > max_minutes * 60
            if step % checkpoint_every == 0 or step == config.iterations or out_of_time:
                accelerator.save_state(str(run / CHECKPOINTS / f"step-{step:06d}"))
            if out_of_time:
                break
    if step < config.iterations:
        return {"done": False, "step": step}
    student = accelerator.unwrap_model(model).avatar.eval().requires_grad_(False).cpu()
    student.config = student.config.replace(recipe=Recipe("ddim", config.steps, config.decoder))
    result = compare(teacher, student, config, held_out, data) if held_out else {}
    student.save_pretrained(out)
    record = {"teacher": teacher.config.name, "settings": settings, "held_out": result}
    write_atomic(out / "distilled.json", json.dumps(record, indent=1).encode())
    return {"done": True, "step": step, "result": result}


def _initial_student(teacher, config: StudentConfig):
    """A copy of the teacher whose ControlNet and UNet train (optionally with gradient checkpointing)."""
    import copy

    student = copy.deepcopy(teacher).requires_grad_(False)
    for net in (student.controlnet, student.unet):
        net.requires_grad_(True)
        if config.gradient_checkpointing:
            net.enable_gradient_checkpointing()
    if config.gradient_checkpointing:  # the frozen decoder's blocks too: the image term backpropagates through them
        student.vae.enable_gradient_checkpointing()
    check_structure(student, teacher)
    return student


def _conditioner(teacher, device):
    """frames -> (condition [B, C, H, W], tokens [B, T, D]) on `device`, the teacher's (no gradients)."""
    from ..renderer import Renderer

    renderer = Renderer(teacher, device=device, sampler="ddim", steps=1, backend="reference", decoder="vae")

    @torch.no_grad()
    def condition_of(frames: list):
        return renderer.frame_inputs([f.camera for f in frames], torch.stack([f.code for f in frames]),
                                     [f.mesh for f in frames])

    return condition_of


def compare(teacher, student, config: StudentConfig, frames: int, data=None) -> dict:
    """Held-out frames (the dataset `data`'s eval split, whose truth carries its per-frame detail; else the avatar's
    held-out cameras and codes from its synthetic head): PSNR of the student's and of the teacher's own DDIM-`steps`
    images against the teacher's reference images, and each one's sharpness (variance of the Laplacian inside the
    head mask) beside the reference's, the truth's and the autoencoder's (decode(encode(truth)), the ceiling of any
    latent model of this VAE). Every latent is decoded by `config.decoder`, the reference recipe's."""
    from ..evaluation.held_out import dataset_frames, synthetic_frames

    if data is not None:
        held = dataset_frames(data, frames)[0]
    elif hasattr(teacher.head_model, "render"):
        held = synthetic_frames(teacher, frames)[0]
    else:
        return {}
    latents = {"reference": recipe_latents(teacher, held, parse_recipe(config.teacher_recipe), 4, "held-out reference")}
    for n in sorted({*TEACHER_FEW_STEPS, config.steps}):
        latents[f"teacher_ddim{n}"] = recipe_latents(teacher, held, Recipe("ddim", n), 4, f"held-out teacher ddim:{n}")
    latents["student"] = recipe_latents(student, held, Recipe("ddim", config.steps), 4, "held-out student")
    truth = torch.stack([f.image for f in held])
    with torch.no_grad():  # the autoencoder's decode(encode(truth)): the ceiling of any latent model of this VAE
        latents["autoencoder"] = teacher.vae.encode(truth * 2 - 1).latent_dist.mean * teacher.config.vae.scaling_factor
        images = {k: (teacher.decode(v, config.decoder) / 2 + 0.5).clamp(0, 1) for k, v in latents.items()}
    masks = torch.stack([f.mask for f in held])
    images["truth"] = truth
    result = {"frames": len(held), "steps": config.steps, "decoder": config.decoder,
              "sharpness": {k: round(float(sharpness(v, masks).mean()), 6) for k, v in images.items()},
              "vs_reference_db": {k: round(float(psnr(v, images["reference"]).mean()), 4)
                                  for k, v in images.items() if k not in ("reference", "truth", "autoencoder")},
              "vs_truth_db": {k: round(float(psnr(v, images["truth"]).mean()), 4)
                              for k, v in images.items() if k != "truth"}}
    result["student_gain_over_teacher_db"] = round(result["vs_reference_db"]["student"]
                                                   - result["vs_reference_db"][f"teacher_ddim{config.steps}"], 4)
    return result

__all__ = ["StudentConfig", "StudentModule", "check_structure", "check_teacher", "compare", "distill_student"]
