"""`avatar bench`: per-stage times, frame rate, latency and fidelity of each backend, side by side in one run.

Cases run as mesh x decoder x steps x backend, so each step count's baseline and fast path finish together. A
case: a first frame (time to first frame = build + warm-up + capture), `--repeat` sequential frames (stage
times, median and p90; depth 1, one frame in flight: the case's fps and latency), and for CUDA-graph backends a
depth-2 stream of `--stream-frames` frames (throughput and input-to-output latency with two frames in flight).
`<out>.json` + `<out>.md` are rewritten as each case finishes; a failing case is recorded with its error and the
run goes on. How each stage is timed: `benchmarks.measure`; what the files
hold: `benchmarks.report`. `compiled-eager`: no CUDA graph.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import math
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from engine.command_options import device as device_name
from engine.devices import DEVICES
from engine.raster import CHOICES as RASTER_CHOICES

from .measure import GRAPH_BACKENDS, compiled_case, decoder_times, fidelity, frame_mesh, registry_case
from .report import RESULTS, case_line, new_report, save


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's options."""
    a = p.add_argument
    a("--avatar", default="tiny", help="a preset, a shipped avatar or an avatar folder (default: tiny)")
    a("--device", type=device_name, default="auto", help=f"torch device: {DEVICES} (default: auto)")
    a("--backends", default="reference", help="comma-separated: reference, compiled, compiled-parallel (ControlNet "
      "on a second stream), compiled-eager (no CUDA graph), or any registered backend (default: reference)")
    a("--dtypes", default="float32", help="comma-separated dtypes for the reference (default: float32)")
    a("--compiled-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
      help="weights of the compiled backends (default: float16)")
    a("--sampler", default="ddpm", choices=["ddpm", "ddim"], help="sampler (default: ddpm)")
    a("--steps", default="4,20", help="comma-separated step counts (default: 4,20)")
    a("--decoders", default="vae", help="comma-separated: vae, tiny (the avatar's trained tiny decoder; for an avatar "
      "without one, a TAESD-shaped one with random weights, for timing) (default: vae)")
    a("--meshes", default="head", help="comma-separated: head (the avatar's), 100k (default: head)")
    a("--repeat", type=int, default=5, help="timed sequential frames per case (default: 5)")
    a("--stream-frames", type=int, default=30, help="frames streamed per CUDA graph case (default: 30)")
    a("--warmup", type=int, default=3, help="eager runs before a CUDA graph capture (default: 3)")
    a("--attention", default="flash", choices=["flash", "auto"], help="SDPA backends of the compiled backends")
    a("--compile", action="store_true", help="torch.compile the compiled backend's transformer blocks")
    a("--no-fidelity", action="store_true", help="skip the comparisons with the float32 reference")
    a("--raster", default="auto", choices=RASTER_CHOICES,
      help="rasteriser (default: auto = numba on the CPU where installed, else the torch reference)")
    a("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a("--out", default=None, help="results file stem (default: benchmarks/results/<avatar>-<device>)")
    a("--engines", default=None, help="export folder of the onnxruntime backend (`avatar export --to onnx`)")


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

    def ring(i, j):
        """The vertex index of latitude ring `i`, longitude `j` (wrapping around)."""
        return 1 + i * n_lon + (j % n_lon)

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


def run(args) -> dict:
    """Run every case, print a line for each and rewrite the report files after each -> the report."""
    from engine.avatars import load_avatar
    from engine.errors import ConfigError
    from engine.frame import Frame
    from engine.sequence import orbit

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    steps = [int(s) for s in str(args.steps).split(",") if s]
    if args.repeat < 1:
        raise ConfigError(f"--repeat must be at least 1, got {args.repeat}")
    t0 = time.perf_counter()
    avatar = load_avatar(args.avatar)  # on the CPU: each case's Renderer puts what its backend needs on the device
    load_ms = round((time.perf_counter() - t0) * 1e3)
    random_tiny = "tiny" in args.decoders.split(",") and avatar.tiny_decoder is None
    if random_tiny:
        add_random_tiny_decoder(avatar)
    cfg = avatar.config
    frames = orbit(cfg, frames=max(args.repeat, args.stream_frames, 2) + 1)
    stem = Path(args.out or RESULTS / f"{Path(args.avatar).name}-{device.type}")
    report = new_report(args, device, cfg, load_ms)
    report["settings"]["tiny_decoder"] = ("random weights, TAESD's shape (timing only)" if random_tiny else
                                          "trained" if avatar.tiny_decoder is not None else None)
    for mesh_name in args.meshes.split(","):
        if mesh_name not in ("head", "100k"):
            raise ConfigError(f"unknown --meshes entry {mesh_name!r}; use head or 100k")
        variants = [synthetic_mesh(100_000, v, cfg.conditioning.canonical_dims) for v in range(4)] \
            if mesh_name == "100k" else [None]
        case_frames = [Frame(f.camera, f.expression, variants[i % len(variants)]) for i, f in enumerate(frames)]
        for decoder, n, backend in itertools.product(args.decoders.split(","), steps, args.backends.split(",")):
            graph = backend in GRAPH_BACKENDS
            for dtype in ([args.compiled_dtype] if graph else args.dtypes.split(",")):
                case = {"backend": backend, "dtype": dtype, "sampler": args.sampler, "steps": n, "decoder": decoder,
                        "mesh": mesh_name, "raster": args.raster,
                        "faces": frame_mesh(avatar, case_frames[0]).num_faces}
                case.update(_run_case(avatar, case_frames, device, case, graph, args))
                report["cases"].append(case)
                print(case_line(case), flush=True)
                save(report, stem)
    if {"vae", "tiny"} <= set(args.decoders.split(",")):
        report["decoders"] = decoder_times(avatar, frames[1], device, args.repeat, args.raster)
        d = report["decoders"]
        print(f"decoders, alternating on one latent: vae {d['vae']['median_ms']:.2f} ms, tiny "
              f"{d['tiny']['median_ms']:.2f} ms (tiny / vae {d['ratio']:.2f})", flush=True)
        save(report, stem)
    print(f"results: {stem.with_suffix('.json')} and .md")
    return report


def add_random_tiny_decoder(avatar) -> None:
    """Give an avatar without a trained tiny decoder a TAESD-shaped one (64 channels, three blocks a stage, one
    upsampling per VAE downsampling) with seeded random weights, so that both decoders' times can be compared."""
    from engine.recipe import TinyDecoderConfig
    from engine.tiny_decoder import build_tiny_decoder

    vae = avatar.config.vae
    shape = TinyDecoderConfig(vae.latent_channels, 64, (3,) * (vae.downsample.bit_length() - 1) + (1,))
    avatar.config = avatar.config.replace(tiny_decoder=shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        avatar.tiny_decoder = build_tiny_decoder(shape).eval().requires_grad_(False)


def _run_case(avatar, frames, device, case, graph, args) -> dict:
    """One case's measurements, plus its peak GPU memory on CUDA; an error is recorded rather than raised."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    renderer = None
    try:
        if graph:
            graphs, parallel = GRAPH_BACKENDS[case["backend"]]
            result, renderer = compiled_case(avatar, frames, device, case["dtype"], case["steps"], case["decoder"],
                                             graphs and device.type == "cuda", parallel, args)  # CPU: eager
            try:
                if not args.no_fidelity:
                    result["fidelity"] = fidelity(avatar, renderer, frames[1], args)
            except Exception as e:  # keep the timings
                traceback.print_exc()
                result["fidelity_error"] = f"{type(e).__name__}: {e}"
        else:
            result = registry_case(avatar, frames, device, case["backend"], case["dtype"], case["steps"],
                                   case["decoder"], args)
    except Exception as e:  # one failing case must not lose the others' figures
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}"}
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        result["case_peak_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    if renderer is not None:
        renderer.close()
    return result
