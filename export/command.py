"""`avatar export`: an avatar's networks as ONNX graphs, and those graphs as TensorRT engines.

    avatar export --avatar A --to onnx --out DIR [--dtype float32|float16|bfloat16] [--batch 1] [--opset 18]
                  [--no-slim] [--no-verify]
    avatar export --to tensorrt --onnx DIR --out DIR [--timing-cache FILE] [--workspace GIB] [--rebuild]

A command module (`add_arguments(parser)` + `run(args)`): the `avatar` command imports it when chosen; nothing
in the library imports it. Errors are the project's (`engine.errors`), which the command line reports as
`avatar export: error: ...` with exit code 2.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from engine.errors import ConfigError

TARGETS = ("onnx", "tensorrt")


def add_arguments(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--avatar", help="--to onnx: a preset (tiny, sd21), an avatar shipped with the package, or an avatar folder")
    a("--to", required=True, choices=TARGETS, help="onnx: ONNX graphs + manifest.json; tensorrt: one TensorRT engine "
      "per graph of an ONNX export (--onnx), built on this machine's GPU")
    a("--out", required=True, help="the folder to write (created; an earlier export there is replaced, and of an "
      "earlier TensorRT build the engines still valid are kept)")
    a("--onnx", help="--to tensorrt: the ONNX export folder (`avatar export --to onnx`; its --dtype is the engines' "
      "precision, e.g. float16)")
    a("--timing-cache", default=None, help="--to tensorrt: the TensorRT timing cache file to read and update "
      "(default: timing.cache in --out, kept across builds)")
    a("--workspace", type=float, default=None, help="--to tensorrt: the builder's workspace limit in GiB "
      "(default: TensorRT's, the GPU's memory)")
    a("--rebuild", action="store_true", help="--to tensorrt: build every engine, even those still valid")
    a("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
      help="the graphs' compute dtype; inputs and outputs stay float32 (default: float32)")
    a("--batch", type=int, default=1, help="the graphs' static batch size (default: 1)")
    a("--opset", type=int, default=None, help="ONNX opset, 18 or newer (default: 18; bfloat16 needs 22, its default)")
    a("--no-slim", action="store_true", help="skip onnxslim's second folding pass")
    a("--no-verify", action="store_true", help="skip running each graph in ONNX Runtime against torch")
    a("--seed", type=int, default=0, help="weight seed of a preset (default: 0)")


def run(args) -> dict:
    if args.to == "tensorrt":
        return _tensorrt(args)
    if args.avatar is None:
        raise ConfigError("--to onnx needs --avatar (a preset, a shipped avatar or an avatar folder)")
    from engine.avatars import load_avatar

    from .onnx import export_onnx

    t0 = time.perf_counter()
    avatar = load_avatar(args.avatar, device="cpu", seed=args.seed)
    print(f"exporting {avatar.config.name!r} ({args.dtype}, batch {args.batch}) to "
          f"{Path(args.out).resolve()}", flush=True)
    manifest = export_onnx(avatar, args.out, dtype=args.dtype, batch=args.batch, opset=args.opset,
                           slim=not args.no_slim, verify=not args.no_verify, log=lambda s: print(f"  {s}", flush=True))
    size = sum(g["bytes"] for g in manifest["graphs"].values())
    print(f"wrote {len(manifest['graphs'])} graphs ({size / 2**20:.1f} MiB) and manifest.json to "
          f"{Path(args.out).resolve()} in {time.perf_counter() - t0:.1f} s")
    return manifest


def _tensorrt(args) -> dict:
    if args.onnx is None:
        raise ConfigError("--to tensorrt needs --onnx DIR, an ONNX export (`avatar export --avatar A --to onnx --out "
                          "DIR`, with --dtype float16 for float16 engines)")
    if args.avatar is not None:
        raise ConfigError("--to tensorrt builds from --onnx DIR, which names its avatar; drop --avatar")
    if args.workspace is not None and args.workspace <= 0:
        raise ConfigError(f"--workspace must be a positive number of GiB, got {args.workspace}")
    from .tensorrt_build import build_engines

    t0 = time.perf_counter()
    print(f"building TensorRT engines from {Path(args.onnx).resolve()} into {Path(args.out).resolve()}", flush=True)
    manifest = build_engines(args.onnx, args.out, timing_cache=args.timing_cache, workspace_gib=args.workspace,
                             rebuild=args.rebuild, log=lambda s: print(f"  {s}", flush=True))
    built = sum(not g["kept"] for g in manifest["graphs"].values())
    trt = manifest["tensorrt"]
    print(f"wrote {len(manifest['graphs'])} engines ({built} built, {len(manifest['graphs']) - built} kept) for "
          f"{trt['gpu']} with TensorRT {trt['version']} to {Path(args.out).resolve()} in "
          f"{time.perf_counter() - t0:.1f} s")
    return manifest
