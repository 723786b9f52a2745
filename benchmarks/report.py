"""The report of `avatar bench`: environment facts, one console line per case, and the JSON + Markdown files.

The Markdown table shows each case's stage times, frame rate, latency and fidelity, then each CUDA-graph case
against the baseline (`reference` under float16 autocast, same run) and the targets, goals and floors of
`shared/design/performance.md`.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
from pathlib import Path

import torch

from .measure import GRAPH_BACKENDS

RESULTS = Path(__file__).parent / "results"
# performance.md, one H100, sd21 structure at 512 x 512, batch 1.
FLOORS_MS = {(20, "vae"): 30.8, (4, "vae"): 8.7, (4, "tiny"): 5.7, (2, "tiny"): 2.9, (1, "tiny"): 1.6}
STEP_GFLOP, PEAK_TFLOPS = 804 + 284, 790.0  # UNet + ControlNet per step; dense bf16/fp16 rate measured there


def device_info(device: torch.device) -> dict:
    """The device's name and, on CUDA, compute capability, SM count, memory and CUDA/cuDNN versions."""
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                "memory_gib": round(p.total_memory / 2**30, 1), "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version()}
    return {"name": f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads"}


def new_report(args, device: torch.device, config, load_ms: int) -> dict:
    """A report without cases yet: format, date, device, host, versions and the run's settings."""
    import diffusers

    from engine.config import UNetConfig

    return {
        "format": "diffusion-avatars-bench", "version": 3,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(device), "host": platform.node(), "cpu_count": os.cpu_count(),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "python": platform.python_version()},
        "settings": {"avatar": args.avatar, "image_size": config.image_size, "sampler": args.sampler,
                     "raster": args.raster, "repeat": args.repeat, "stream_frames": args.stream_frames,
                     "threads": torch.get_num_threads(), "avatar_load_ms": load_ms, "warmup": args.warmup,
                     "attention": args.attention, "compile": args.compile,
                     "sd21_structure": config.unet == UNetConfig() and config.image_size == 512},
        "cases": [],
    }


def case_line(c: dict) -> str:
    """One case as a console line: fps, ms per frame, median stage times and fidelity (or the error)."""
    head = f"{c['backend']:>14} {c['dtype']:>8} {c['decoder']:>4} {c['mesh']:>4} {c['steps']:>2} steps:"
    if "error" in c:
        return f"{head} FAILED {c['error']}"
    stages = " ".join(f"{k}={v['median_ms']:.2f}" for k, v in c["stages"].items())
    fid = " | " + " ".join(f"{k} {v:.3g}" for k, v in c["fidelity"].items()) if "fidelity" in c else ""
    two = c.get("depth2")
    pipelined = f", depth 2: {two['fps']:.2f} fps at {two['latency']['median_ms']:.2f} ms" if two else ""
    return (f"{head} {c['fps']:7.2f} fps at {c['latency']['median_ms']:8.2f} ms latency (depth 1){pipelined} | "
            f"median ms: {stages}{fid}")


def save(report: dict, stem: Path) -> None:
    """Write `<stem>.json` and `<stem>.md` (each atomically)."""
    from engine.files import write_atomic

    for suffix, text in ((".json", json.dumps(report, indent=1)), (".md", markdown(report))):
        write_atomic(stem.with_suffix(suffix), text)


def _stage_cell(stages: dict, stage: str, key: str = "median_ms") -> str:
    """A stage's time (ms) as a table cell; "-" for a stage the case does not time."""
    return f"{stages[stage][key]:.2f}" if stage in stages else "-"


def _raster_cell(stages: dict) -> str:
    """Streamed cases time rasterise + condition as one stage; sequential ones time them apart."""
    if "raster+condition" in stages:
        return f"{stages['raster+condition']['median_ms']:.2f}"
    if "rasterise" not in stages:
        return "-"
    r, c = stages["rasterise"]["median_ms"], stages["condition"]["median_ms"]
    return f"{r + c:.2f} [{r:.2f} / {c:.2f}]"


COLUMNS = ("backend | dtype | decoder | mesh (faces) | steps | fps, depth 1 | latency ms, depth 1 (p90) | "
           "fps, depth 2 | latency ms, depth 2 (p90) | first frame s | "
           "upload | raster+cond (kernels) [rasterise / condition] | prep | step (p90) | decode | copy back | "
           "peak GiB | captures after 1st | recompiles | first-step rel err | PSNR dB")


def markdown(report: dict) -> str:
    """The report as Markdown: the run's facts, one table row per case, then `_goals`."""
    st, dev = report["settings"], report["device"]
    lines = [f"# avatar bench: {st['avatar']} ({st['image_size']}x{st['image_size']})", "",
             f"- device: {dev['name']} ({', '.join(f'{k} {v}' for k, v in dev.items() if k != 'name')}; host "
             f"{report['host']}, {report['cpu_count']} cores)",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
             "- settings: " + ", ".join(f"{k} {v}" for k, v in st.items()) + f", date {report['date']}",
             "- depth 1: one frame in flight (sequential frames: fps = 1 / latency, the project's fps); depth 2: "
             "two frames in flight (CUDA-graph backends streamed; others overlap nothing, '-'); latency: submit to "
             "pixels in host memory; stage ms: compiled = CUDA events (GPU), others = synced wall clock",
             "", f"| {COLUMNS} |", "|" + "---|" * (COLUMNS.count("|") + 1)]
    for c in report["cases"]:
        name = f"| {c['backend']} | {c['dtype']} | {c['decoder']} | {c['mesh']} ({c['faces']}) | {c['steps']} |"
        if "error" in c:
            lines.append(f"{name} failed: {c['error']} |")
            continue
        lat, fid = c["latency"], c.get("fidelity", {})
        two = c.get("depth2")
        ms = functools.partial(_stage_cell, c["stages"])
        kern = f" ({c['raster_kernel_ms']:.3f})" if c.get("raster_kernel_ms") is not None else ""
        cells = [f"{c['fps']:.2f}", f"{lat['median_ms']:.2f} ({lat['p90_ms']:.2f})",
                 f"{two['fps']:.2f}" if two else "-",
                 f"{two['latency']['median_ms']:.2f} ({two['latency']['p90_ms']:.2f})" if two else "-",
                 f"{c['first_frame_ms'] / 1e3:.1f}", ms("upload"),
                 _raster_cell(c["stages"]) + kern, ms("prep"), f"{ms('step')} ({ms('step', 'p90_ms')})", ms("decode"),
                 ms("copy back"), f"{c.get('peak_gib', 0):.2f}", str(c.get("captures_after_first", "-")),
                 str(c.get("recompiles", "-")), f"{fid.get('first_step_rel_err', float('nan')):.2e}",
                 f"{fid.get('psnr_db', float('nan')):.1f}"]
        lines.append(name + " " + " | ".join(cells) + " |")
    d = report.get("decoders")
    if d:
        vae, tiny = d["vae"], d["tiny"]
        lines += ["", f"Decoders on one frame's latent, timed alternately ({d['repeat']} rounds, reference, float32): "
                      f"VAE {vae['median_ms']:.2f} ms (p90 {vae['p90_ms']:.2f}), tiny {tiny['median_ms']:.2f} ms (p90 "
                      f"{tiny['p90_ms']:.2f}): tiny / VAE = {d['ratio']:.2f}."]
    return "\n".join(lines + [""] + _goals(report)) + "\n"


def _goals(report: dict) -> list[str]:
    """Each graph case against the baseline (reference float16, same steps and mesh), targets, goals, floors."""
    ok = [c for c in report["cases"] if "error" not in c]
    base = {(c["steps"], c["mesh"]): c for c in ok if c["backend"] == "reference" and c["dtype"] == "float16"}
    sd21 = report["settings"]["sd21_structure"]
    lines = ["## Against the baseline, targets, goals and floors", "",
             "Baseline: `reference` under float16 autocast (the release's loop), same run. Targets (goals): 20 steps "
             ">= 5x (10x) the baseline; 4 steps >= 30 fps (60 fps) end to end with latency < 25 ms; raster + condition "
             "of a 100k-triangle mesh < 1 ms of GPU time. Floors: performance.md (one H100, sd21 at 512).", "",
             "| case | fps | x baseline | target | goal | latency ms | frame ms / floor ms | step TFLOP/s (% of 790) |",
             "|---|---|---|---|---|---|---|---|"]
    for c in ok:
        if c["backend"] not in GRAPH_BACKENDS:
            continue
        b = base.get((c["steps"], c["mesh"]))
        ratio = c["fps"] / b["fps"] if b else None
        target = goal = "-"
        if c["steps"] == 20 and ratio:
            target, goal = f"{'met' if ratio >= 5 else 'missed'} (5x)", f"{ratio / 10:.2f} of 10x"
        elif c["steps"] <= 4:
            target, goal = f"{'met' if c['fps'] >= 30 else 'missed'} (30 fps)", f"{c['fps'] / 60:.2f} of 60 fps"
        floor = FLOORS_MS.get((c["steps"], c["decoder"])) if sd21 else None
        fl = f"{1e3 / c['fps']:.1f} / {floor} = {1e3 / c['fps'] / floor:.1f}x" if floor else "-"
        step = c["stages"].get("step")
        tf = STEP_GFLOP / step["median_ms"] if step and sd21 else None
        eff = f"{tf:.0f} ({tf / PEAK_TFLOPS * 100:.0f}%)" if tf else "-"
        lines.append(f"| {c['backend']} {c['dtype']} {c['decoder']} {c['mesh']} {c['steps']} steps | {c['fps']:.2f} | "
                     f"{f'{ratio:.2f}' if ratio else '-'} | {target} | {goal} | {c['latency']['median_ms']:.1f} | "
                     f"{fl} | {eff} |")
        if c["mesh"] == "100k" and c.get("raster_kernel_ms") is not None:
            ms = c["raster_kernel_ms"]
            lines.append(f"| ... raster + condition of {c['faces']} faces | | | {'met' if ms < 1 else 'missed'} "
                         f"(< 1 ms): {ms:.3f} ms GPU | | | | |")
    return lines
