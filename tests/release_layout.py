"""Writers of the authors' release run folder (model.md, "The release's checkpoints and data") and of a local
diffusers Stable Diffusion folder, at the `tiny` preset's shapes. Independent of the engine's readers: keys and
shapes are written out from model.md, the networks are diffusers' own."""

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

from engine.config import from_preset

TINY = from_preset("tiny")
R, C = TINY.conditioning.texture_resolution, TINY.conditioning.texture_channels
RUN_FILES = ("model_config.json", "dataset_config.json", "optimization_config.json", "train_setup.json")
# The release's expression layers of the tiny UNet, written out (block path, width).
TINY_BLOCKS = [
    ("down_blocks.0.attentions.0.transformer_blocks.0", 32),
    ("down_blocks.1.attentions.0.transformer_blocks.0", 64),
    ("up_blocks.1.attentions.0.transformer_blocks.0", 64),
    ("up_blocks.1.attentions.1.transformer_blocks.0", 64),
    ("up_blocks.2.attentions.0.transformer_blocks.0", 32),
    ("up_blocks.2.attentions.1.transformer_blocks.0", 32),
]


def write_sd_folder(folder):
    """A tiny diffusers Stable Diffusion folder (random weights, diffusers' own layout): unet/ and vae/."""
    torch.manual_seed(0)
    UNet2DConditionModel(**TINY.unet.diffusers_kwargs(TINY.latent_size)).save_pretrained(folder / "unet")
    AutoencoderKL(**TINY.vae.diffusers_kwargs(TINY.image_size)).save_pretrained(folder / "vae")
    return folder


def release_state(seed, code_size=8, people=3, scale=1.0):
    """A release checkpoint of the tiny shapes, `people` rows, keys as model.md lists them; random weights times
    `scale` (small weights keep a rendered frame finite)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * scale

    with torch.device("meta"):
        unet = UNet2DConditionModel(**TINY.unet.diffusers_kwargs(TINY.latent_size))
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 16, 32, 32),
                                               conditioning_channels=73)
    state = {f"controlnet.{k}": rand(*v.shape) for k, v in controlnet.state_dict().items()}
    for block, width in TINY_BLOCKS:
        prefix = f"unet.{block}._expression_attention."
        state[prefix + "to_q.weight"] = rand(width, width)
        state[prefix + "to_k.weight"] = rand(width, 32)
        state[prefix + "to_v.weight"] = rand(width, 32)
        state[prefix + "to_out.0.weight"] = rand(width, width)
        state[prefix + "to_out.0.bias"] = rand(width)
    state["expression_codes_mlp.weight"] = rand(4 * 32, code_size)
    state["expression_codes_mlp.bias"] = rand(4 * 32)
    for name in ("neural_texture_lookup_uv", "neural_texture_lookup_uw", "neural_texture_lookup_vw",
                 "ambient_texture_lookup"):
        state[f"{name}.weight"] = torch.randn(people, R * R * C, generator=g)
    return state


def write_release_run(run, state, step=2000):
    """A run folder: the four config files and checkpoints/ckpt-<step>.pt (plus an older, stale checkpoint whose
    name sorts after it as text: the largest step must win)."""
    (run / "checkpoints").mkdir(parents=True)
    for name in RUN_FILES:
        (run / name).write_text("{}")
    torch.save(state, run / "checkpoints" / f"ckpt-{step}.pt")
    torch.save({"stale": torch.zeros(1)}, run / "checkpoints" / "ckpt-300.pt")
    return run
