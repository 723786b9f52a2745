"""The measurements of `avatar bench`: stage times, frame rate, latency and fidelity of one backend on one case.

Registry backends (`reference`, ...) are timed by a synced wall clock around each stage of a frame; the compiled
backends (`GRAPH_BACKENDS`) run through `engine.pipeline.RenderPipeline`, which times them by CUDA events per
stream (upload, raster + condition, copy back) and inside their graph (prep = expression K/V + conditioning
embedding, each step, decode + to-pixels). Fidelity compares a backend with the float32 reference fed the same
inputs. Each call into the renderer's backend sits in one function per measurement.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch

# name -> (CUDA graph, ControlNet on a second stream)
GRAPH_BACKENDS = {"compiled": (True, False), "compiled-parallel": (True, True), "compiled-eager": (False, False)}


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
        """Start timing the first stage."""
        self._last = self._now()

    def mark(self, stage: str) -> None:
        """End `stage` (ms since the previous mark or the start, appended to `times[stage]`); the next one starts."""
        now = self._now()
        self.times.setdefault(stage, []).append((now - self._last) * 1e3)
        self._last = now


def frame_mesh(avatar, frame):
    """The frame's mesh, or the avatar's head model posed by the frame's code (CPU)."""
    from engine.frame import as_codes

    return frame.mesh if frame.mesh is not None else avatar.head_model.posed_mesh(as_codes(frame.expression)[0])


def median_p90(values: list[float]) -> dict:
    """Times (ms) -> {"median_ms", "p90_ms"}."""
    ordered = sorted(values)
    return {"median_ms": statistics.median(ordered),
            "p90_ms": ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]}


def time_frame(renderer, frame, timer: StageTimer) -> None:
    """One frame through the renderer's stages, marking each (the same calls as Renderer.render_batch)."""
    from engine.frame import as_codes, to_pixels
    from engine.raster import rasterize

    cfg = renderer.config
    timer.start()
    codes = as_codes(frame.expression)
    mesh = frame_mesh(renderer.avatar, frame).to(renderer.device)
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


def registry_case(avatar, frames, device, backend, dtype, steps, decoder, args) -> dict:
    """A registry backend: a warm-up frame (time to first frame), then `args.repeat` sequential timed frames (one
    frame in flight: the frame time is the latency; these backends overlap nothing, so there is no depth 2)."""
    from engine.renderer import Renderer

    t0 = time.perf_counter()
    renderer = Renderer(avatar, device=device, sampler=args.sampler, steps=steps, dtype=dtype, decoder=decoder,
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
    frame = median_p90(per_frame)
    return {"stages": {k: median_p90(v) for k, v in timer.times.items()}, "frame": frame,
            "fps": 1e3 / frame["median_ms"], "latency": frame, "depth1": _depth(1e3 / frame["median_ms"], frame),
            "first_frame_ms": first, "captures": 0}


def decoder_times(avatar, frame, device, repeat: int, raster: str) -> dict:
    """Both decoders of the reference on one frame's latent, timed alternately (vae, tiny, vae, ...) so that load
    from other processes weighs on both alike: {"vae": median/p90, "tiny": median/p90, "ratio" (tiny / vae median),
    "repeat"}."""
    from engine.frame import as_codes
    from engine.renderer import Renderer

    with Renderer(avatar, device=device, steps=1, decoder="vae", raster_backend=raster,
                  backend="reference") as renderer, torch.no_grad():
        latent = renderer.latents([frame.camera], as_codes(frame.expression), [frame.mesh])
        timer = StageTimer(torch.device(device))
        for _ in range(repeat + 1):  # the first round warms up
            for name in ("vae", "tiny"):
                timer.start()
                renderer.avatar.decode(latent, name)
                timer.mark(name)
    times = {name: median_p90(ts[1:]) for name, ts in timer.times.items()}
    return {**times, "ratio": times["tiny"]["median_ms"] / times["vae"]["median_ms"], "repeat": repeat}


def _depth(fps: float, latency: dict) -> dict:
    return {"fps": fps, "latency": latency}


def compiled_case(avatar, frames, device, dtype, steps, decoder, graphs, parallel, args) -> tuple[dict, object]:
    """A compiled backend: the first frame (build + warm-up + capture), `args.repeat` sequential frames (depth 1:
    one frame in flight, its fps and latency are the case's) and, with CUDA graphs, a depth-2 stream of
    `args.stream_frames` frames (throughput with two frames in flight, and its latency) -> (result, the renderer,
    for `fidelity`)."""
    from engine.backends.compiled import dynamo_graphs
    from engine.pipeline import RenderPipeline
    from engine.renderer import Renderer

    t0 = time.perf_counter()
    options = {"decoder": decoder, "graphs": graphs, "timing": device.type == "cuda", "warmup": args.warmup,
               "attention": args.attention, "compile": args.compile, "parallel_controlnet": parallel}
    renderer = Renderer(avatar, device=device, sampler=args.sampler, steps=steps, dtype=dtype,
                        raster_backend=args.raster, backend="compiled", backend_options=options)
    backend = renderer.backend
    seq = RenderPipeline(renderer, depth=1, timing=True)
    list(seq.run(frames[:1]))
    first = (time.perf_counter() - t0) * 1e3
    captures0, graphs0 = backend.captures, dynamo_graphs()
    list(seq.run(frames[1 + i % (len(frames) - 1)] for i in range(args.repeat)))
    recs = seq.records[1:]
    stages = {"host": median_p90([r.host_ms for r in recs])}
    for name, key in (("upload", "upload"), ("raster+condition", "raster"), ("denoise+decode", "compute"),
                      ("copy back", "copy")) if recs[0].gpu_ms else ():
        stages[name] = median_p90([r.gpu_ms[key] for r in recs])
    for name in ("prep", "steps", "decode") if recs[0].graph_ms else ():
        stages[name.rstrip("s")] = median_p90([float(t) for r in recs for t in np.atleast_1d(r.graph_ms[name])])
    frame = median_p90([r.latency_ms for r in recs])
    result = {"stages": stages, "frame": frame, "fps": 1e3 / frame["median_ms"], "latency": frame,
              "depth1": _depth(1e3 / frame["median_ms"], frame), "first_frame_ms": first}
    if graphs and args.stream_frames > 1:
        pipe = RenderPipeline(renderer, depth=2)
        n = args.stream_frames
        list(pipe.run(frames[1 + i % (len(frames) - 1)] for i in range(n)))
        done = [r.t_done for r in pipe.records]
        result["depth2"] = _depth((n - 1) / (done[-1] - done[0]), median_p90([r.latency_ms for r in pipe.records[1:]]))
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

        mesh, cfg = frame_mesh(renderer.avatar, frame).to(renderer.device), renderer.config.conditioning

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


def fidelity(avatar, renderer, frame, args) -> dict:
    """The backend against the float32 reference fed the same inputs: first step's v (relative L2 error) and,
    with the VAE decoder, the frame's PSNR. TF32 is off for the reference."""
    from engine.conditioning import build_condition
    from engine.frame import as_codes
    from engine.raster import rasterize
    from engine.renderer import Renderer

    device, cfg = renderer.device, renderer.config
    code, mesh = as_codes(frame.expression), frame_mesh(avatar, frame).to(device)
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
