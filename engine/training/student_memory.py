"""`estimate_memory`: what one process of `avatar distill` holds at its peak, from the teacher's shapes alone.

Nothing is allocated: the student is built on the meta device and one training step's forward pass runs there with
autograd's saved-tensor hooks counting the bytes the backward pass would keep (activations, parameters excluded).
The optimiser's share is counted from the trainable parameters: float32 weights, gradients and AdamW's two moments,
which accelerate keeps in float32 under mixed precision too (16 bytes per trainable parameter); frozen parts (VAE,
textures, expression projection) hold their float32 weights only, and autocast caches a 2-byte copy of every
weight. Under bf16/fp16 the activations are counted with the networks cast to that dtype (autocast keeps a few in
float32, so this is a slight underestimate); with gradient checkpointing (diffusers' `enable_gradient_checkpointing`:
each ResNet and transformer block of the UNet and the ControlNet, and the frozen VAE decoder's middle and up blocks,
which the image term backpropagates through, recomputed in the backward pass) a checkpointed block keeps only its
inputs, and the backward pass holds at most one block's activations again. Attention is counted as CPU's kernels
save it; CUDA's flash and memory-efficient kernels save less, so on a GPU the figure errs high. CUDA's allocator and
workspace come on top.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from torch import nn

GIB = 2**30
CHECKPOINTED = ("ResnetBlock2D", "Transformer2DModel")  # the units diffusers' gradient checkpointing recomputes


def estimate_memory(teacher, steps: int, batch_size: int, mixed_precision: str = "no",
                    gradient_checkpointing: bool = False, image_weight: float = 1.0) -> dict:
    """The peak bytes of one distillation process (module docstring) -> {"parameters", "bytes": {...}, "gib"}.
    `teacher` may be on the meta device (`load_avatar(spec, device="meta")`); it is not changed."""
    from ..sampling import FixedNoise, NoiseSchedule, make_sampler
    from .student import StudentModule

    config = teacher.config
    dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]
    with torch.device("meta"):
        student = copy.deepcopy(teacher).to("meta")
    n_trainable = sum(p.numel() for net in (student.controlnet, student.unet) for p in net.parameters())
    n_all = sum(p.numel() for p in student.parameters())
    student = student.to(dtype)
    shape = (config.vae.latent_channels, config.latent_size, config.latent_size)
    sampler = make_sampler("ddim", NoiseSchedule(config.schedule), steps)
    noise = FixedNoise(shape, steps, config.noise_seed).to("meta", dtype)
    module = StudentModule(student, sampler, noise, image_weight).train()
    f = config.vae.downsample
    condition = torch.zeros(batch_size, config.condition_channels, shape[1] * f, shape[2] * f, device="meta",
                            dtype=dtype)
    tokens = torch.zeros(batch_size, config.expression_tokens, config.token_dim, device="meta", dtype=dtype)
    target = torch.zeros(batch_size, *shape, device="meta", dtype=dtype)
    for net in (student.controlnet, student.unet):
        net.requires_grad_(True)
    # autocast's part on meta: every module's floating inputs in `dtype` (the sampler's float32 tables promote)
    casts = [m.register_forward_pre_hook(_cast_inputs(dtype)) for m in student.modules()] if dtype != torch.float32 \
        else []
    with _saved_bytes(student, gradient_checkpointing) as saved:
        module(condition, tokens, target)
    for h in casts:
        h.remove()
    activations = saved["total"]
    if gradient_checkpointing:
        activations = saved["total"] - saved["inside"] + saved["inputs"] + saved["largest"]
    parts = {"trainable_weights": 4 * n_trainable, "gradients": 4 * n_trainable, "adamw_moments": 8 * n_trainable,
             "frozen_weights": 4 * (n_all - n_trainable), "activations": activations}
    if dtype != torch.float32:  # autocast's cached half-precision copies of the weights
        parts["autocast_weight_copies"] = 2 * n_all
    total = sum(parts.values())
    return {"parameters": {"trainable": n_trainable, "all": n_all}, "bytes": {**parts, "total": total},
            "gib": {k: round(v / GIB, 2) for k, v in {**parts, "total": total}.items()},
            "settings": {"steps": steps, "batch_size": batch_size, "mixed_precision": mixed_precision,
                         "gradient_checkpointing": gradient_checkpointing, "image_weight": image_weight,
                         "latent": list(shape)}}


def _cast_inputs(dtype: torch.dtype):
    def hook(_module, args):
        return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
    return hook


@contextmanager
def _saved_bytes(avatar: nn.Module, blocks: bool):
    """Count the bytes autograd saves for backward (parameters and their views excluded, each tensor once, a view as
    its base); with `blocks`, also those saved inside each checkpointed block ("inside", "largest") and the blocks'
    inputs ("inputs")."""
    params = {id(p) for p in avatar.parameters()}
    seen: set[int] = set()
    counts = {"total": 0, "inside": 0, "inputs": 0, "largest": 0}
    depth, starts, handles = [0], [], []

    def pack(t):
        base = t if t._base is None else t._base  # a view (a transposed weight, a reshaped activation): its base
        if id(base) not in params and id(base) not in seen:
            seen.add(id(base))
            counts["total"] += base.numel() * base.element_size()
        return t

    def enter(_module, args):
        if depth[0] == 0:
            starts.append(counts["total"])
            counts["inputs"] += sum(a.numel() * a.element_size() for a in args if torch.is_tensor(a))
        depth[0] += 1

    def leave(_module, _args, _out):
        depth[0] -= 1
        if depth[0] == 0:
            inside = counts["total"] - starts.pop()
            counts["inside"] += inside
            counts["largest"] = max(counts["largest"], inside)

    if blocks:
        units = [m for net in (avatar.controlnet, avatar.unet) for m in net.modules()
                 if type(m).__name__ in CHECKPOINTED]
        units += [avatar.vae.decoder.mid_block, *avatar.vae.decoder.up_blocks]
        for m in units:
            handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield counts
    finally:
        for h in handles:
            h.remove()


__all__ = ["estimate_memory"]
