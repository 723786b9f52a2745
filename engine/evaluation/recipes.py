"""Quality against recipes (`evaluate_recipes`; `avatar eval --recipes`): every recipe scored on the same held-out
frames, beside the frame time it was measured at, in one JSON, one Markdown table and one plot.

Per recipe (sampler, steps, decoder): `evaluate`'s scores (PSNR frame and head mask, SSIM, flicker against the
truth's, expression gain), PSNR against the avatar's own frames at the release's recipe (DDPM 20 + VAE: how far
fewer steps or the tiny decoder move the frames from what the avatar renders at its best), and the measured frame
time: the median wall time of `timing_frames` frames rendered one at a time with `Renderer.render` (rasterise,
condition, denoise, decode, pixels to the host: one frame in flight) by the reference backend on this machine.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..files import write_atomic
from ..metrics import psnr
from ..recipe import Recipe
from . import held_out_frames, render_frames, sequence_scores
from .scores import autoencoder_images, frame_scores, json_safe, mean_score, weights_sha256

RELEASE = Recipe("ddpm", 20, "vae")


def evaluate_recipes(avatar, recipes: list[Recipe], data=None, frames: int = 16, device: str = "cpu",
                     batch_size: int = 4, timing_frames: int = 8, seed: int | None = None,
                     weights_file: str | Path | None = None) -> dict:
    """Score each of `recipes` (module docstring) -> the JSON-safe result: {"avatar", "frames", "recorded_recipe",
    "autoencoder", "recipes": [one row per recipe]}."""
    from ..renderer import Renderer

    held, sequence = held_out_frames(avatar, data, frames)
    truth, mask = torch.stack([f.image for f in held]), torch.stack([f.mask for f in held])
    ceiling = frame_scores(autoencoder_images(avatar.vae, truth, batch_size), truth, mask)
    with Renderer(avatar, device=device, sampler=RELEASE.sampler, steps=RELEASE.steps, decoder=RELEASE.decoder,
                  seed=seed, backend="reference") as renderer:
        release = render_frames(renderer, held, batch_size)
    rows = []
    for recipe in recipes:
        with Renderer(avatar, device=device, sampler=recipe.sampler, steps=recipe.steps, decoder=recipe.decoder,
                      seed=seed, backend="reference") as renderer:
            pred = render_frames(renderer, held, batch_size)
            scores = frame_scores(pred, truth, mask)
            row = {"recipe": str(recipe), "sampler": recipe.sampler, "steps": recipe.steps, "decoder": recipe.decoder}
            row.update({key: mean_score(s[key] for s in scores) for key in scores[0]})
            row["psnr_vs_release"] = mean_score(psnr(pred, release).tolist())
            seq = sequence_scores(renderer, held, sequence, scores, batch_size)
            row["flicker_ratio"], row["gain"] = seq["flicker"]["ratio"], seq["neutral"]["gain"]
            row["frame_ms"] = frame_time(renderer, held[:timing_frames])
        row["fps"] = 1e3 / row["frame_ms"]
        rows.append(row)
    recorded = avatar.config.recipe
    return json_safe({
        "avatar": avatar.config.name, "data": str(data) if data is not None else "synthetic (regenerated)",
        "frames": len(held), "device": str(device), "threads": torch.get_num_threads(),
        "recorded_recipe": str(recorded) if recorded else None, "weights": weights_sha256(avatar, weights_file),
        "autoencoder": {key: mean_score(s[key] for s in ceiling) for key in ceiling[0]}, "recipes": rows})


def frame_time(renderer, frames: list) -> float:
    """Median milliseconds of one frame rendered on its own (after one untimed frame)."""
    renderer.render(frames[0].camera, frames[0].code, frames[0].mesh)
    times = []
    for f in frames:
        t0 = time.perf_counter()
        renderer.render(f.camera, f.code, f.mesh)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def markdown(result: dict) -> str:
    """The result as a Markdown table."""
    a = result["autoencoder"]
    lines = [f"# Quality against recipes: avatar {result['avatar']}", "",
             f"{result['frames']} held-out frames ({result['data']}); frame time: the median of single frames "
             f"rendered one at a time by the reference backend on {result['device']} ({result['threads']} threads); "
             f"recorded recipe: {result['recorded_recipe'] or 'none (the release: ddpm:20+vae)'}.", "",
             "| recipe | PSNR frame | PSNR head mask | SSIM | expression gain | flicker vs truth | vs own DDPM-20 | "
             "frame time | fps |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["recipes"]:
        lines.append(f"| {r['recipe']} | {_f(r['psnr'], 2)} dB | {_f(r['psnr_mask'], 2)} dB | {_f(r['ssim'], 3)} | "
                     f"{_f(r['gain'], 2)} dB | {_f(r['flicker_ratio'], 2)}x | {_vs_release(r)} | "
                     f"{_f(r['frame_ms'], 1)} ms | {_f(r['fps'], 1)} |")
    lines.append(f"| VAE ceiling (decode(encode(truth))) | {_f(a['psnr'], 2)} dB | {_f(a['psnr_mask'], 2)} dB | "
                 f"{_f(a['ssim'], 3)} | | | | | |")
    return "\n".join(lines) + "\n"


def plot(result: dict) -> bytes:
    """PNG: PSNR (frame and head mask) against the measured frame time, one point per recipe."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for key, label, colour in (("psnr", "frame", "tab:blue"), ("psnr_mask", "head mask", "tab:orange")):
        for decoder, marker in (("vae", "o"), ("tiny", "^")):
            rows = [r for r in result["recipes"] if r["decoder"] == decoder and r[key] is not None]
            if rows:
                ax.scatter([r["frame_ms"] for r in rows], [r[key] for r in rows], color=colour, marker=marker,
                           label=f"PSNR {label}, {decoder} decoder")
        for r in result["recipes"]:
            if r[key] is not None:
                ax.annotate(r["recipe"], (r["frame_ms"], r[key]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    ax.set_xlabel(f"frame time, ms ({result['device']}, {result['threads']} threads, one frame in flight)")
    ax.set_ylabel("PSNR against the truth, dB")
    ax.set_title(f"avatar {result['avatar']}: quality against recipes ({result['frames']} held-out frames)",
                 fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def write_results(result: dict, stem: str | Path) -> list[Path]:
    """`<stem>.json`, `<stem>.md` and `<stem>.png`, each written to a temporary file and renamed."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    files = {".json": json.dumps(result, indent=1) + "\n", ".md": markdown(result), ".png": plot(result)}
    return [write_atomic(stem.with_name(stem.name + ext), data) for ext, data in files.items()]


def _vs_release(row: dict) -> str:
    if row["recipe"] == str(RELEASE):
        return "(itself)"
    return f"{_f(row['psnr_vs_release'], 1)} dB"


def _f(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
