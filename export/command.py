"""`avatar export`: an avatar's networks as ONNX graphs (TensorRT engines are a later stage).

    avatar export --avatar A --to onnx --out DIR [--dtype float32|float16|bfloat16] [--batch 1] [--opset 18]
                  [--no-slim] [--no-verify]

A command module (`add_arguments(parser)` + `run(args)`): the `avatar` command imports it when chosen; nothing
in the library imports it. Errors are the project's (`engine.errors`), which the command line reports as
`avatar export: error: ...` with exit code 2.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from engine.errors import BackendError

TARGETS = ("onnx", "tensorrt")


def add_arguments(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--avatar", required=True, help="a preset (tiny, sd21), an avatar shipped with the package, or an avatar folder")
    a("--to", required=True, choices=TARGETS, help="onnx: ONNX graphs + manifest.json (tensorrt: not yet available)")
    a("--out", required=True, help="the folder to write (created; an earlier export there is replaced)")
    a("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
      help="the graphs' compute dtype; inputs and outputs stay float32 (default: float32)")
    a("--batch", type=int, default=1, help="the graphs' static batch size (default: 1)")
    a("--opset", type=int, default=None, help="ONNX opset, 18 or newer (default: 18; bfloat16 needs 22, its default)")
    a("--no-slim", action="store_true", help="skip onnxslim's second folding pass")
    a("--no-verify", action="store_true", help="skip running each graph in ONNX Runtime against torch")
    a("--seed", type=int, default=0, help="weight seed of a preset (default: 0)")


def run(args) -> dict:
    if args.to == "tensorrt":
        raise BackendError("--to tensorrt is not yet available (it needs TensorRT: pip install "
                           "'diffusion-avatars-engine[tensorrt]', and a later release of this engine); export "
                           "--to onnx and run the graphs with --backend onnxruntime meanwhile")
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
