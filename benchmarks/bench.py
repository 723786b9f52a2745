"""`avatar bench`: per-stage times, frame rate, latency and fidelity of each backend, side by side in one run.

Cases run as mesh x decoder x steps x backend, so each step count's baseline and fast path finish together. A
case: a first frame (time to first frame = build + warm-up + capture), `--repeat` sequential frames (stage
times, median and p90), and for CUDA-graph backends a depth-2 stream of `--stream-frames` frames (end-to-end
fps, input-to-output latency). `<out>.json` + `<out>.md` are rewritten as each case finishes; a failing case is
recorded with its error and the run goes on. Stage times: registry backends (`reference`, ...) by synced wall
clock; `compiled` by CUDA events per stream (upload, raster + condition, copy back) and inside its graph (prep =
expression K/V + conditioning embedding, each step, decode + to-pixels). `compiled-eager`: no CUDA graph.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import math
import os
import platform
import statistics
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"
# performance.md, one H100, sd21 structure at 512 x 512, batch 1.
FLOORS_MS = {(20, "vae"): 30.8, (4, "vae"): 8.7, (4, "tiny"): 5.7, (2, "tiny"): 2.9, (1, "tiny"): 1.6}
STEP_GFLOP, PEAK_TFLOPS = 804 + 284, 790.0  # UNet + ControlNet per step; dense bf16/fp16 rate measured there
# name -> (CUDA graph, ControlNet on a second stream)
GRAPH_BACKENDS = {"compiled": (True, False), "compiled-parallel": (True, True), "compiled-eager": (False, False)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--avatar", default="tiny", help="a preset, a shipped avatar or an avatar folder (default: tiny)")
    a("--device", default="cpu", help="torch device (default: cpu)")
    a("--backends", default="reference", help="comma-separated: reference, compiled, compiled-parallel (ControlNet "
      "on a second stream), compiled-eager (no CUDA graph), or any registered backend (default: reference)")
    a("--dtypes", default="float32", help="comma-separated dtypes for the reference (default: float32)")
    a("--compiled-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
      help="weights of the compiled backends (default: float16)")
    a("--sampler", default="ddpm", choices=["ddpm", "ddim"], help="sampler (default: ddpm)")
    a("--steps", default="4,20", help="comma-separated step counts (default: 4,20)")
    a("--decoders", default="vae", help="comma-separated: vae, tiny (compiled backends only) (default: vae)")
    a("--meshes", default="head", help="comma-separated: head (the avatar's), 100k (default: head)")
    a("--repeat", type=int, default=5, help="timed sequential frames per case (default: 5)")
    a("--stream-frames", type=int, default=30, help="frames streamed per CUDA graph case (default: 30)")
    a("--warmup", type=int, default=3, help="eager runs before a CUDA graph capture (default: 3)")
    a("--attention", default="flash", choices=["flash", "auto"], help="SDPA backends of the compiled backends")
    a("--compile", action="store_true", help="torch.compile the compiled backend's transformer blocks")
    a("--no-fidelity", action="store_true", help="skip the comparisons with the float32 reference")
    a("--raster", default="torch", choices=["torch", "nvdiffrast"], help="rasteriser (default: torch)")
    a("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a("--out", default=None, help="results file stem (default: benchmarks/results/<avatar>-<device>)")
    a("--engines", default=None, help="export folder of the onnxruntime backend (`avatar export --to onnx`)")


@dataclass
class StageTimer:
    """Wall-clock stage times with a device sync before each read: `start()`, then `mark(stage)` after each."""

    device: torch.device
    times: dict[str, list[float]] = field(default_factory=dict)

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


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                "memory_gib": round(p.total_memory / 2**30, 1), "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version()}
    return {"name": f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads"}


def synthetic_mesh(faces: int = 100_000, variant: int = 0, canonical_dims: int = 5):
    """A closed head-sized ellipsoid (latitude-longitude grid) with about `faces` triangles; each `variant` has
    another grid (another face count and topology), as per-frame marching-cubes meshes do. Canonical xyz = 4 *
    position (the NPHM scale), 2 smooth ambient values; analytic normals. CPU tensors."""
    from engine.geometry import Mesh

    faces = faces * (1 + 0.01 * (variant % 4 - 1.5))  # 98.5 %, 99.5 %, 100.5 %, 101.5 % of the target
    n_lat = int(math.sqrt(faces / 2)) + 1 + 3 * (variant % 4) - 4
    n_lon = max(3, round(faces / (2 * (n_lat - 1))))
    t, p = np.meshgrid(np.pi * np.arange(1, n_lat) / n_lat, 2 * np.pi * np.arange(n_lon) / n_lon, indexing="ij")
    d = np.stack([np.sin(t) * np.sin(p), np.cos(t), np.sin(t) * np.cos(p)], -1).reshape(-1, 3)
    d = np.concatenate([[[0, 1, 0]], d, [[0, -1, 0]]])  # poles first and last
    semi = np.array([0.074, 0.088, 0.092]) * (1 + 0.03 * np.sin(5 * np.arctan2(d[:, :1], d[:, 2:])))
    pos, normals = d * semi, d / semi**2
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    ring = lambda i, j: 1 + i * n_lon + (j % n_lon)  # noqa: E731
    i, j = np.arange(n_lat - 2)[:, None], np.arange(n_lon)
    a, b, c, e = ring(i, j), ring(i + 1, j), ring(i + 1, j + 1), ring(i, j + 1)
    quads = np.stack([np.stack([a, b, c], -1), np.stack([a, c, e], -1)], 2).reshape(-1, 3)
    caps = [np.stack([np.zeros_like(j), ring(0, j), ring(0, j + 1)], 1),
            np.stack([np.full_like(j, len(pos) - 1), ring(n_lat - 2, j + 1), ring(n_lat - 2, j)], 1)]
    tris = [caps[0], quads, caps[1]]
    ambient = 0.15 * np.sin(np.stack([2.5 * d[:, 0] + 0.8 * d[:, 2], 2.5 * d[:, 1] - 1.2 * d[:, 2] + 0.3], 1))
    canonical = np.concatenate([4 * pos, ambient], 1)[:, :canonical_dims]
    return Mesh(torch.from_numpy(pos).float(), torch.from_numpy(np.concatenate(tris)),
                torch.from_numpy(canonical).float(), normals=torch.from_numpy(normals).float())


def time_frame(renderer, frame, timer: StageTimer) -> None:
    """One frame through the renderer's stages, marking each (the same calls as Renderer.render_batch)."""
    from engine.frame import to_pixels
    from engine.raster import rasterize
    from engine.renderer import as_codes

    cfg = renderer.config
    timer.start()
    codes = as_codes(frame.expression)
    mesh = _mesh(renderer.avatar, frame).to(renderer.device)
    timer.mark("upload")
    raster = rasterize(mesh, frame.camera, backend=renderer.raster_backend, znear=cfg.conditioning.znear,
                       zfar=cfg.conditioning.zfar)
    timer.mark("rasterise")
    condition = renderer.backend.condition(raster)
    tokens = renderer.avatar.expression_tokens(codes.to(renderer.device))
    timer.mark("condition")
    latent = renderer.backend.denoise(condition, tokens, on_step=lambda i: timer.mark("step"))
    image = renderer.backend.decode(latent)
    timer.mark("decode")
    to_pixels(image).cpu()
    timer.mark("copy back")


def _mesh(avatar, frame):
    """The frame's mesh, or the avatar's head model posed by the frame's code (CPU)."""
    from engine.renderer import as_codes

    return frame.mesh if frame.mesh is not None else avatar.head_model.posed_mesh(as_codes(frame.expression)[0])


def _stats(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"median_ms": statistics.median(ordered),
            "p90_ms": ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]}


def _reference_case(avatar, frames, device, backend, dtype, steps, args) -> dict:
    from engine.renderer import Renderer

    t0 = time.perf_counter()
    renderer = Renderer(avatar, device=device, sampler=args.sampler, steps=steps, dtype=dtype,
                        raster_backend=args.raster, backend=backend,
                        backend_options={"engines": args.engines} if backend == "onnxruntime" else None)
    with torch.no_grad():
        time_frame(renderer, frames[0], StageTimer(device))  # warm-up
        first = (time.perf_counter() - t0) * 1e3
        timer = StageTimer(device)
        for i in range(args.repeat):
            time_frame(renderer, frames[1 + i % (len(frames) - 1)], timer)
    per_frame = [sum(ts[i] for name, ts in timer.times.items() if name != "step")
                 + sum(timer.times["step"][i * steps:(i + 1) * steps]) for i in range(args.repeat)]
    frame = _stats(per_frame)
    return {"stages": {k: _stats(v) for k, v in timer.times.items()}, "frame": frame,
            "fps": 1e3 / frame["median_ms"], "latency": frame, "first_frame_ms": first, "captures": 0}


def _compiled_case(avatar, frames, device, dtype, steps, decoder, graphs, parallel, args) -> tuple[dict, object]:
    from engine.backends.compiled import CompiledBackend, dynamo_graphs
    from engine.pipeline import RenderPipeline
    from engine.renderer import Renderer

    t0 = time.perf_counter()
    renderer = Renderer(avatar, device=device, sampler=args.sampler, steps=steps, raster_backend=args.raster,
                        backend="reference")
    backend = CompiledBackend(renderer.avatar, renderer.sampler, renderer.noise, device, getattr(torch, dtype),
                              decoder=decoder, graphs=graphs, timing=device.type == "cuda", warmup=args.warmup,
                              attention=args.attention, compile=args.compile, parallel_controlnet=parallel)
    renderer.backend = backend
    seq = RenderPipeline(renderer, depth=1, timing=True)
    list(seq.run(frames[:1]))
    first = (time.perf_counter() - t0) * 1e3
    captures0, graphs0 = backend.captures, dynamo_graphs()
    list(seq.run(frames[1 + i % (len(frames) - 1)] for i in range(args.repeat)))
    recs = seq.records[1:]
    stages = {"host": _stats([r.host_ms for r in recs])}
    for name, key in (("upload", "upload"), ("raster+condition", "raster"), ("denoise+decode", "compute"),
                      ("copy back", "copy")) if recs[0].gpu_ms else ():
        stages[name] = _stats([r.gpu_ms[key] for r in recs])
    for name in ("prep", "steps", "decode") if recs[0].graph_ms else ():
        stages[name.rstrip("s")] = _stats([float(t) for r in recs for t in np.atleast_1d(r.graph_ms[name])])
    frame = _stats([r.latency_ms for r in recs])
    result = {"stages": stages, "frame": frame, "fps": 1e3 / frame["median_ms"], "latency": frame,
              "first_frame_ms": first, "sequential_fps": 1e3 / frame["median_ms"]}
    if graphs and args.stream_frames > 1:
        pipe = RenderPipeline(renderer, depth=2)
        n = args.stream_frames
        list(pipe.run(frames[1 + i % (len(frames) - 1)] for i in range(n)))
        done = [r.t_done for r in pipe.records]
        result["fps"] = (n - 1) / (done[-1] - done[0])
        result["latency"] = _stats([r.latency_ms for r in pipe.records[1:]])
        result["stream"] = {"frames": n, "depth": 2, **pipe.stats()}
    result.update(captures=backend.captures, captures_after_first=backend.captures - captures0,
                  recompiles=dynamo_graphs() - graphs0, sequential=seq.stats())
    if device.type == "cuda":
        result["raster_kernel_ms"] = _raster_kernel_ms(renderer, frames[1])
    return result, renderer


def _raster_kernel_ms(renderer, frame, iters: int = 5) -> float | None:
    """GPU kernel time (profiler) of rasterise + condition for one frame's mesh, already on the device."""
    from engine.raster import rasterize

    try:
        from torch.profiler import ProfilerActivity, profile

        mesh, cfg = _mesh(renderer.avatar, frame).to(renderer.device), renderer.config.conditioning
        def run():
            return renderer.backend.condition(rasterize(mesh, frame.camera, backend=renderer.raster_backend,
                                                        znear=cfg.znear, zfar=cfg.zfar))

        run()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                run()
            torch.cuda.synchronize()
        us = sum(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
                 for e in prof.key_averages())
        return us / 1e3 / iters
    except Exception as e:  # the profiler is a nicety: never fail the case for it
        print(f"  (raster kernel timing unavailable: {e})")
        return None


def _fidelity(avatar, renderer, frame, args) -> dict:
    """The backend against the float32 reference fed the same inputs: first step's v (relative L2 error) and,
    with the VAE decoder, the frame's PSNR. TF32 is off for the reference."""
    from engine.conditioning import build_condition
    from engine.raster import rasterize
    from engine.renderer import Renderer, as_codes

    device, cfg = renderer.device, renderer.config
    code, mesh = as_codes(frame.expression), _mesh(avatar, frame).to(device)
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False,
                                                     allow_tf32=False):
        raster = rasterize(mesh, frame.camera, backend=renderer.raster_backend, znear=cfg.conditioning.znear,
                           zfar=cfg.conditioning.zfar)
        cond = build_condition(raster, avatar.textures, cfg.conditioning)
        tokens = avatar.expression_tokens(code.to(device))
        t0 = renderer.sampler.timesteps[0].to(device)
        v_ref = avatar.predict(renderer.noise.latent, t0, cond, tokens).float()
        v = renderer.backend.first_step(cond, tokens)
        out = {"first_step_rel_err": float((v - v_ref).norm() / v_ref.norm()), "finite": bool(torch.isfinite(v).all())}
        if renderer.backend.nets.decoder_name == "vae":
            ref = Renderer(avatar, device=device, sampler=args.sampler, steps=renderer.sampler.num_steps,
                           raster_backend=renderer.raster_backend, backend="reference")
            a = ref.render(frame.camera, frame.expression, frame.mesh).astype(np.float64)
            b = renderer.render(frame.camera, frame.expression, frame.mesh).astype(np.float64)
            mse = float(((a - b) ** 2).mean())
            out["psnr_db"] = 10 * math.log10(255**2 / mse) if mse > 0 else float("inf")
    return out


def run(args) -> dict:
    import diffusers

    from engine.avatars import load_avatar
    from engine.config import UNetConfig
    from engine.errors import ConfigError
    from engine.renderer import Frame
    from engine.sequence import orbit

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    steps = [int(s) for s in str(args.steps).split(",") if s]
    if args.repeat < 1:
        raise ConfigError(f"--repeat must be at least 1, got {args.repeat}")
    t0 = time.perf_counter()
    avatar = load_avatar(args.avatar, device=device)
    load_ms = round((time.perf_counter() - t0) * 1e3)
    cfg = avatar.config
    frames = orbit(cfg, frames=max(args.repeat, args.stream_frames, 2) + 1)
    stem = Path(args.out or RESULTS / f"{Path(args.avatar).name}-{device.type}")
    report = {
        "format": "diffusion-avatars-bench", "version": 2,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(device), "host": platform.node(), "cpu_count": os.cpu_count(),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "python": platform.python_version()},
        "settings": {"avatar": args.avatar, "image_size": cfg.image_size, "sampler": args.sampler,
                     "raster": args.raster, "repeat": args.repeat, "stream_frames": args.stream_frames,
                     "threads": torch.get_num_threads(), "avatar_load_ms": load_ms, "warmup": args.warmup,
                     "attention": args.attention, "compile": args.compile,
                     "sd21_structure": cfg.unet == UNetConfig() and cfg.image_size == 512},
        "cases": [],
    }
    for mesh_name in args.meshes.split(","):
        if mesh_name not in ("head", "100k"):
            raise ConfigError(f"unknown --meshes entry {mesh_name!r}; use head or 100k")
        variants = [synthetic_mesh(100_000, v, cfg.conditioning.canonical_dims) for v in range(4)] \
            if mesh_name == "100k" else [None]
        case_frames = [Frame(f.camera, f.expression, variants[i % len(variants)]) for i, f in enumerate(frames)]
        for decoder, n, backend in itertools.product(args.decoders.split(","), steps, args.backends.split(",")):
            graph = backend in GRAPH_BACKENDS
            for dtype in ([args.compiled_dtype] if graph else args.dtypes.split(",") if decoder == "vae" else []):
                case = {"backend": backend, "dtype": dtype, "sampler": args.sampler, "steps": n, "decoder": decoder,
                        "mesh": mesh_name, "raster": args.raster, "faces": _mesh(avatar, case_frames[0]).num_faces}
                case.update(_run_case(avatar, case_frames, device, case, graph, args))
                report["cases"].append(case)
                print(_row(case), flush=True)
                _save(report, stem)
    print(f"results: {stem.with_suffix('.json')} and .md")
    return report


def _run_case(avatar, frames, device, case, graph, args) -> dict:
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    renderer = None
    try:
        if graph:
            graphs, parallel = GRAPH_BACKENDS[case["backend"]]
            result, renderer = _compiled_case(avatar, frames, device, case["dtype"], case["steps"], case["decoder"],
                                              graphs and device.type == "cuda", parallel, args)  # CPU: eager
            try:
                if not args.no_fidelity:
                    result["fidelity"] = _fidelity(avatar, renderer, frames[1], args)
            except Exception as e:  # keep the timings
                traceback.print_exc()
                result["fidelity_error"] = f"{type(e).__name__}: {e}"
        else:
            result = _reference_case(avatar, frames, device, case["backend"], case["dtype"], case["steps"], args)
    except Exception as e:  # one failing case must not lose the others' figures
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}"}
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        result["case_peak_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    if renderer is not None and hasattr(renderer.backend, "close"):
        renderer.backend.close()
    return result


def _row(c: dict) -> str:
    head = f"{c['backend']:>14} {c['dtype']:>8} {c['decoder']:>4} {c['mesh']:>4} {c['steps']:>2} steps:"
    if "error" in c:
        return f"{head} FAILED {c['error']}"
    stages = " ".join(f"{k}={v['median_ms']:.2f}" for k, v in c["stages"].items())
    fid = " | " + " ".join(f"{k} {v:.3g}" for k, v in c["fidelity"].items()) if "fidelity" in c else ""
    return f"{head} {c['fps']:7.2f} fps, {c['frame']['median_ms']:8.2f} ms/frame | median ms: {stages}{fid}"


def _save(report: dict, stem: Path) -> None:
    from engine.files import write_atomic

    for suffix, text in ((".json", json.dumps(report, indent=1)), (".md", _markdown(report))):
        write_atomic(stem.with_suffix(suffix), text)


def _raster_cell(stages: dict) -> str:
    """Streamed cases time rasterise + condition as one stage; sequential ones time them apart."""
    if "raster+condition" in stages:
        return f"{stages['raster+condition']['median_ms']:.2f}"
    if "rasterise" not in stages:
        return "-"
    r, c = stages["rasterise"]["median_ms"], stages["condition"]["median_ms"]
    return f"{r + c:.2f} [{r:.2f} / {c:.2f}]"


COLUMNS = ("backend | dtype | decoder | mesh (faces) | steps | fps | ms/frame (p90) | latency (p90) | first frame s | "
           "upload | raster+cond (kernels) [rasterise / condition] | prep | step (p90) | decode | copy back | peak GiB | captures after 1st | "
           "recompiles | first-step rel err | PSNR dB")


def _markdown(report: dict) -> str:
    st, dev = report["settings"], report["device"]
    lines = [f"# avatar bench: {st['avatar']} ({st['image_size']}x{st['image_size']})", "",
             f"- device: {dev['name']} ({', '.join(f'{k} {v}' for k, v in dev.items() if k != 'name')}; host "
             f"{report['host']}, {report['cpu_count']} cores)",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
             "- settings: " + ", ".join(f"{k} {v}" for k, v in st.items()) + f", date {report['date']}",
             "- fps: CUDA-graph backends streamed (2 frames in flight), others sequential; ms/frame: sequential, "
             "submit to pixels in host memory; stage ms: compiled = CUDA events (GPU), others = synced wall clock",
             "", f"| {COLUMNS} |", "|" + "---|" * (COLUMNS.count("|") + 1)]
    for c in report["cases"]:
        name = f"| {c['backend']} | {c['dtype']} | {c['decoder']} | {c['mesh']} ({c['faces']}) | {c['steps']} |"
        if "error" in c:
            lines.append(f"{name} failed: {c['error']} |")
            continue
        f, lat, fid = c["frame"], c["latency"], c.get("fidelity", {})
        ms = lambda stage, key="median_ms": f"{c['stages'][stage][key]:.2f}" if stage in c["stages"] else "-"  # noqa
        kern = f" ({c['raster_kernel_ms']:.3f})" if c.get("raster_kernel_ms") is not None else ""
        cells = [f"{c['fps']:.2f}", f"{f['median_ms']:.2f} ({f['p90_ms']:.2f})",
                 f"{lat['median_ms']:.2f} ({lat['p90_ms']:.2f})", f"{c['first_frame_ms'] / 1e3:.1f}", ms("upload"),
                 _raster_cell(c["stages"]) + kern, ms("prep"), f"{ms('step')} ({ms('step', 'p90_ms')})", ms("decode"),
                 ms("copy back"), f"{c.get('peak_gib', 0):.2f}", str(c.get("captures_after_first", "-")),
                 str(c.get("recompiles", "-")), f"{fid.get('first_step_rel_err', float('nan')):.2e}",
                 f"{fid.get('psnr_db', float('nan')):.1f}"]
        lines.append(name + " " + " | ".join(cells) + " |")
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
