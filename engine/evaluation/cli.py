"""`avatar eval`: parse the arguments, `evaluate` the avatar, print JSON or a short table."""

from __future__ import annotations

import argparse
import importlib.util
import json

from ..command_options import AVATAR_HELP, add_device_option
from . import evaluate


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `avatar eval`."""
    p.add_argument("--avatar", required=True, help=AVATAR_HELP)
    p.add_argument("--data", default=None, help="dataset folder: score its eval split (default: regenerate "
                   "held-out frames with the avatar's synthetic head)")
    p.add_argument("--frames", type=int, default=16, help="held-out frames, and flicker-sequence length (default: 16)")
    p.add_argument("--sampler", default=None, choices=["ddpm", "ddim"],
                   help="sampler (default: the avatar's recorded recipe's, else ddpm, the release's)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the recipe's, else 20)")
    p.add_argument("--decoder", default=None, choices=["vae", "tiny"], help="decoder (default: the recipe's, else vae)")
    p.add_argument("--recipes", default=None, help="score several recipes side by side instead, comma-separated "
                   "SAMPLER:STEPS[+DECODER] (e.g. ddim:1,ddim:2,ddim:4,ddpm:20): writes OUT.json, OUT.md and OUT.png "
                   "(quality against measured frame time)")
    p.add_argument("--decoders", default="vae", help="with --recipes: comma-separated decoders each recipe runs with "
                   "(vae, tiny; default: vae)")
    p.add_argument("--seed", type=int, default=None, help="fixed-noise seed (default: the avatar's)")
    add_device_option(p)
    p.add_argument("--batch-size", type=int, default=4, help="frames rendered at once (default: 4)")
    p.add_argument("--out", default=None, help="folder for metrics.json and grid.png; with --recipes the stem of "
                   "its three files (required there)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--lpips-weights", default=None, help="local state dict of a whole lpips.LPIPS module "
                   "(torch.save(lpips.LPIPS(net='alex').state_dict(), PATH)); AlexNet weights also run without "
                   "the lpips package")
    p.add_argument("--jod", action="store_true", help="also FovVideoVDP's JOD of the held-out video sequence "
                   "(the paper's Table 1 column; needs `pip install pyfvvdp`, no weights)")


def run(args: argparse.Namespace) -> None:
    """`avatar eval`: evaluate and print JSON or a table."""
    from ..avatars import load_avatar, resolve_avatar
    from ..files import check_writable
    from ..model import WEIGHTS_FILE

    if args.recipes is not None:
        return _run_recipes(args)
    if args.out is not None:
        check_writable(args.out, "the evaluation folder", folder=True)
    avatar = load_avatar(args.avatar, device=args.device)
    folder = resolve_avatar(args.avatar).folder  # None for a preset: the state dict is hashed instead
    result = evaluate(avatar, data=args.data, frames=args.frames, sampler=args.sampler, steps=args.steps,
                      seed=args.seed, out=args.out, device=args.device, lpips_weights=args.lpips_weights,
                      batch_size=args.batch_size, weights_file=folder / WEIGHTS_FILE if folder else None,
                      decoder=args.decoder, jod=args.jod)
    print(json.dumps(result, indent=1) if args.json else format_table(result))


def _run_recipes(args: argparse.Namespace) -> None:
    """`avatar eval --recipes`: score every recipe, write the JSON, Markdown and PNG files, print the table."""
    from ..avatars import load_avatar, resolve_avatar
    from ..errors import BackendError, ConfigError
    from ..files import check_writable
    from ..model import WEIGHTS_FILE
    from ..recipe import parse_recipes
    from .recipes import evaluate_recipes, markdown, write_results

    recipes = parse_recipes(args.recipes, args.decoders)
    if importlib.util.find_spec("matplotlib") is None:  # checked before the evaluation, not after it
        raise BackendError("--recipes plots quality against frame time with matplotlib: pip install "
                           "'diffusion-avatars-engine[eval]'")
    if args.out is None:
        raise ConfigError("--recipes writes three files: give their stem with --out (e.g. --out results/demo-recipes)")
    for ext in (".json", ".md", ".png"):
        check_writable(args.out + ext, "a result file")
    avatar = load_avatar(args.avatar, device=args.device)
    for recipe in recipes:
        avatar.check_decoder(recipe.decoder)
    folder = resolve_avatar(args.avatar).folder
    result = evaluate_recipes(avatar, recipes, data=args.data, frames=args.frames, device=args.device,
                              batch_size=args.batch_size, seed=args.seed,
                              weights_file=folder / WEIGHTS_FILE if folder else None)
    files = write_results(result, args.out)
    print(json.dumps(result, indent=1) if args.json else markdown(result))
    print("wrote " + ", ".join(str(f) for f in files))


def format_table(result: dict) -> str:
    """The short human-readable summary of an `evaluate` result."""
    lines = [(f"avatar {result['avatar']} on {result['frames']} held-out frames ({result['data']}; "
              f"{result['sampler']} {result['steps']} steps, {result['decoder']} decoder)")]
    rows = [("PSNR (frame)", "psnr", "dB"), ("PSNR (head mask)", "psnr_mask", "dB"), ("SSIM", "ssim", ""),
            ("LPIPS", "lpips", "")]
    lines += [f"  {name:<22} {_num(result[key], 8, 3)} {unit}" for name, key, unit in rows if key in result]
    a = result["autoencoder"]
    lines.append(f"  {'VAE ceiling':<22} {_num(a['psnr'], 8, 3)} dB frame, {_num(a['psnr_mask'], 0, 3)} dB head mask, "
                 f"SSIM {_num(a['ssim'], 0, 3)}  (decode(encode(ground truth)))")
    f, n = result["flicker"], result["neutral"]
    lines.append(f"  {'flicker (pred / GT)':<22} {_num(f['prediction'], 8, 4)} / {_num(f['ground_truth'], 0, 4)}"
                 f"  ratio {_num(f['ratio'], 0, 2)}")
    lines.append(f"  {'code gain (head mask)':<22} {_num(n['gain'], 8, 3)} dB  ({_num(n['psnr_mask'], 0, 2)} true vs "
                 f"{_num(n['psnr_mask_neutral'], 0, 2)} neutral code)")
    if result.get("weights"):
        w = result["weights"]
        lines.append(f"  weights sha256 {w['sha256']} ({w['of']})")
    if "grid" in result:
        lines.append(f"  grid: {result['grid']}")
    return "\n".join(lines)


def _num(value, width: int, digits: int) -> str:
    return f"{value:{width}.{digits}f}" if value is not None else f"{'n/a':>{width}}"
