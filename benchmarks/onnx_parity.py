"""ONNX Runtime frames against the float32 torch reference: PSNR per avatar, graph dtype and sampler.

    python -m benchmarks.onnx_parity [--avatars tiny,demo] [--dtypes float32,float16] [--frames 4]
                                     [--out benchmarks/results/onnx-parity-cpu]

Each avatar is exported (`export.onnx.export_onnx`, into a temporary folder) once per dtype, then `--frames`
frames of its default orbit are rendered by `Renderer(backend="onnxruntime")` and `Renderer(backend="reference")`
(float32, the same fixed noise) with DDIM 4 and DDPM 20. Writes `<out>.json` and `<out>.md`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"
SAMPLERS = (("ddim", 4), ("ddpm", 20))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return 10 * math.log10(255**2 / mse) if mse > 0 else float("inf")


def measure(avatar_name: str, dtype: str, frames: int) -> list[dict]:
    from engine.avatars import load_avatar
    from engine.renderer import Renderer
    from engine.sequence import orbit
    from export.onnx import export_onnx

    avatar = load_avatar(avatar_name)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        export_onnx(avatar, Path(tmp) / "engines", dtype=dtype, graphs=("conditioning", "denoiser", "decoder"),
                    verify=False)
        export_s = time.perf_counter() - t0
        for sampler, steps in SAMPLERS:
            ref = Renderer(avatar, sampler=sampler, steps=steps)
            ort = Renderer(avatar, sampler=sampler, steps=steps, backend="onnxruntime",
                           backend_options={"engines": Path(tmp) / "engines"})
            scores = [psnr(ref.render(f.camera, f.expression), ort.render(f.camera, f.expression))
                      for f in orbit(avatar.config, frames=frames)]
            ort.backend.close()
            rows.append({"avatar": avatar_name, "graphs": dtype, "sampler": sampler, "steps": steps, "frames": frames,
                         "psnr_min_db": min(scores), "psnr_mean_db": float(np.mean(np.minimum(scores, 200.0))),
                         "identical_frames": sum(math.isinf(s) for s in scores), "export_s": round(export_s, 1)})
            print(rows[-1], flush=True)
    return rows


def markdown(report: dict) -> str:
    lines = ["# ONNX Runtime frames vs the float32 torch reference", "",
             (f"- {report['date']}, {report['host']} ({report['cpu']}), torch {report['versions']['torch']}, "
             f"onnxruntime {report['versions']['onnxruntime']} (CPU provider), {report['threads']} threads"),
             "- same fixed noise, the avatar's default orbit; inf = identical 8-bit frames (mean caps those at 200 dB)",
             ("- float16 graphs: ONNX Runtime's CPU provider computes float16 convolutions in float32 (it inserts "
             "casts), so these rows test the graphs' casts and rounded weights, not half-precision arithmetic"), "",
             "| avatar | graphs | sampler | steps | frames | PSNR min dB | PSNR mean dB | identical | export s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['avatar']} | {r['graphs']} | {r['sampler']} | {r['steps']} | {r['frames']} | "
                     f"{r['psnr_min_db']:.1f} | {r['psnr_mean_db']:.1f} | {r['identical_frames']} | {r['export_s']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    import onnxruntime

    from engine.files import write_atomic

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--avatars", default="tiny,demo")
    p.add_argument("--dtypes", default="float32,float16")
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--out", default=str(RESULTS / "onnx-parity-cpu"))
    args = p.parse_args(argv)
    report = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "host": platform.node(),
              "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}, "rows": []}
    stem = Path(args.out)
    for name in args.avatars.split(","):
        for dtype in args.dtypes.split(","):
            report["rows"] += measure(name, dtype, args.frames)
            write_atomic(stem.with_suffix(".json"), json.dumps(report, indent=1) + "\n")
            write_atomic(stem.with_suffix(".md"), markdown(report))
    return report


if __name__ == "__main__":
    main()
