"""`avatar bench`: per-stage times and frame rate of each backend, side by side in one run.

Each case renders one warm-up frame (its wall time is reported as time to first frame), then `--repeat` timed
frames. Stages are timed with a device sync before each clock read, so stage times add up to the frame time.
Results go to the console as a table and to `benchmarks/results/<name>.json` + `.md`, naming the device,
versions and settings, rewritten as each case finishes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--avatar", default="tiny", help="a preset, a shipped avatar or an avatar folder (default: tiny)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--backends", default="reference", help="comma-separated backends (default: reference)")
    p.add_argument("--dtypes", default="float32", help="comma-separated dtypes for the reference (default: float32)")
    p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"], help="sampler (default: ddpm)")
    p.add_argument("--steps", default="4,20", help="comma-separated step counts (default: 4,20)")
    p.add_argument("--repeat", type=int, default=5, help="timed frames per case (default: 5)")
    p.add_argument("--raster", default="torch", choices=["torch", "nvdiffrast"], help="rasteriser (default: torch)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="results file stem (default: benchmarks/results/<avatar>-<device>)")


@dataclass
class StageTimer:
    """Wall-clock stage times with a device sync before each read."""

    device: torch.device
    times: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self):
        self._last = self._now()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self) -> None:
        self._last = self._now()

    def mark(self, stage: str) -> None:
        now = self._now()
        self.times.setdefault(stage, []).append((now - self._last) * 1e3)
        self._last = now


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads"


def time_frame(renderer, frame, timer: StageTimer) -> None:
    """One frame through the renderer's stages, marking each (the same calls as Renderer.render_batch)."""
    from engine.raster import rasterize
    from engine.renderer import as_codes

    cfg = renderer.config
    timer.start()
    codes = as_codes(frame.expression).to(renderer.device)
    mesh = renderer.avatar.head_model.posed_mesh(codes[0]).to(renderer.device)
    timer.mark("geometry")
    raster = rasterize(mesh, frame.camera, backend=renderer.raster_backend, znear=cfg.conditioning.znear,
                       zfar=cfg.conditioning.zfar)
    timer.mark("rasterise")
    condition = renderer.backend.condition(raster)
    timer.mark("condition")
    tokens = renderer.avatar.expression_tokens(codes)
    timer.mark("tokens")
    latent = renderer.backend.denoise(condition, tokens, on_step=lambda i: timer.mark("step"))
    image = renderer.backend.decode(latent)
    timer.mark("decode")
    renderer.backend.pixels(image).cpu()
    timer.mark("copy back")


def run_case(avatar, frame, device, backend, dtype, sampler, steps, repeat, raster) -> dict:
    from engine.renderer import Renderer

    t0 = time.perf_counter()
    renderer = Renderer(avatar, device=device, sampler=sampler, steps=steps, dtype=dtype, raster_backend=raster,
                        backend=backend)
    with torch.no_grad():
        time_frame(renderer, frame, StageTimer(device))  # warm-up: loads, compiles, captures
        first = (time.perf_counter() - t0) * 1e3
        timer = StageTimer(device)
        for _ in range(repeat):
            time_frame(renderer, frame, timer)
    per_frame = [sum(ts[i] for name, ts in timer.times.items() if name != "step")
                 + sum(timer.times["step"][i * steps:(i + 1) * steps]) for i in range(repeat)]
    stages = {name: {"median_ms": statistics.median(ts), "p90_ms": _p90(ts)} for name, ts in timer.times.items()}
    frame_ms = statistics.median(per_frame)
    return {"backend": backend, "dtype": dtype, "sampler": sampler, "steps": steps, "repeat": repeat,
            "stages": stages, "frame_ms": frame_ms, "frame_p90_ms": _p90(per_frame), "fps": 1e3 / frame_ms,
            "first_frame_ms": first}


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]


def run(args) -> dict:
    import diffusers

    from engine.avatars import load_avatar
    from engine.errors import ConfigError
    from engine.sequence import orbit

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    steps = [int(s) for s in str(args.steps).split(",") if s]
    if args.repeat < 1:
        raise ConfigError(f"--repeat must be at least 1, got {args.repeat}")
    avatar = load_avatar(args.avatar, device=device)
    frame = orbit(avatar.config, frames=1)[0]
    stem = args.out or RESULTS / f"{Path(args.avatar).name}-{device.type}"
    report = {
        "format": "diffusion-avatars-bench", "version": 1,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device), "host": platform.node(), "cpu_count": os.cpu_count(),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version()},
        "settings": {"avatar": args.avatar, "image_size": avatar.config.image_size, "sampler": args.sampler,
                     "raster": args.raster, "repeat": args.repeat, "threads": torch.get_num_threads()},
        "cases": [],
    }
    for backend in args.backends.split(","):
        dtypes = args.dtypes.split(",") if backend == "reference" else ["float16"]
        for dtype in dtypes:
            for n in steps:
                case = run_case(avatar, frame, device, backend, dtype, args.sampler, n, args.repeat, args.raster)
                report["cases"].append(case)
                print(_row(case), flush=True)
                _save(report, Path(stem))
    print(f"results: {Path(stem).with_suffix('.json')} and .md")
    return report


def _row(case: dict) -> str:
    s = case["stages"]
    cols = " ".join(f"{k}={v['median_ms']:.2f}" for k, v in s.items())
    return (f"{case['backend']:>10} {case['dtype']:>8} {case['sampler']} {case['steps']:>2} steps: "
            f"{case['frame_ms']:8.1f} ms/frame {case['fps']:7.2f} fps | median ms: {cols}")


def _save(report: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(report, indent=1)), (".md", _markdown(report))):
        tmp = stem.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, stem.with_suffix(suffix))


def _markdown(report: dict) -> str:
    st = report["settings"]
    lines = [
        f"# avatar bench: {st['avatar']} ({st['image_size']}x{st['image_size']})", "",
        f"- device: {report['device']} (host {report['host']}, {report['cpu_count']} cores)",
        f"- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"- settings: sampler {st['sampler']}, raster {st['raster']}, {st['repeat']} timed frames per case, "
        f"{st['threads']} CPU threads, date {report['date']}", "",
        "| backend | dtype | steps | ms/frame (median) | p90 | fps | first frame ms | rasterise | condition | "
        "step (median) | decode |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in report["cases"]:
        s = c["stages"]
        lines.append(
            f"| {c['backend']} | {c['dtype']} | {c['steps']} | {c['frame_ms']:.1f} | {c['frame_p90_ms']:.1f} | "
            f"{c['fps']:.2f} | {c['first_frame_ms']:.0f} | {s['rasterise']['median_ms']:.2f} | "
            f"{s['condition']['median_ms']:.2f} | {s['step']['median_ms']:.2f} | {s['decode']['median_ms']:.2f} |")
    return "\n".join(lines) + "\n"
