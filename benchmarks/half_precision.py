"""Which half-precision graph feeds a strongly typed TensorRT build: the project's own float16 export, or NVIDIA
ModelOpt AutoCast's conversion of the float32 export (`modelopt.onnx.autocast.convert_to_mixed_precision`)?

    python -m benchmarks.half_precision --fp32 DIR --fp16 DIR [--fp32 DIR --fp16 DIR ...] [--names tiny,demo]
                                        [--out benchmarks/results/half-precision-cpu]

DIR: `avatar export --to onnx` folders of one avatar, `--dtype float32` and `--dtype float16`. For each graph:
node op types and the dtype each computes in (its first input's), the Cast count, and fidelity in ONNX Runtime's CPU
provider against the float32 graph on seeded inputs (max abs and relative L2 error). Writes `<out>.json` and
`<out>.md`. Needs nvidia-modelopt, whose `[onnx]` extra pins onnx 1.21 (protobuf >= 5), which the project's pins
(onnx 1.17, protobuf < 5 for MediaPipe) exclude: run it in a separate environment with nvidia-modelopt, onnx and
onnxruntime; it imports nothing of the engine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
GRAPHS = ("conditioning", "denoiser", "decoder")
TYPE_NAMES = {1: "float32", 10: "float16", 16: "bfloat16", 11: "float64", 7: "int64", 6: "int32", 9: "bool"}
HEAVY = ("Conv", "MatMul", "Gemm")
KEEP_FP32 = ("Softmax", "LayerNormalization", "GroupNormalization", "InstanceNormalization", "ReduceMean")


def compute_types(model) -> dict[str, Counter]:
    """op type -> Counter of the dtype each node of that type computes in (its first input's element type)."""
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    for n in g.node:
        if n.op_type == "Constant":
            types[n.output[0]] = n.attribute[0].t.data_type if n.attribute else 0
    out: dict[str, Counter] = {}
    for n in g.node:
        name = n.input[0] if n.input else n.output[0]
        out.setdefault(n.op_type, Counter())[TYPE_NAMES.get(types.get(name, 0), "untyped")] += 1
    return out


def seeded_inputs(session, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feed = {}
    for i in session.get_inputs():
        x = rng.standard_normal(i.shape).astype(np.float32)
        feed[i.name] = np.full(i.shape, 500.0, np.float32) if i.name == "timestep" else x
    return feed


def fidelity(reference, candidate, feed) -> dict:
    want, got = reference.run(None, feed)[0].astype(np.float64), candidate.run(None, feed)[0].astype(np.float64)
    return {"max_abs_err": float(np.abs(got - want).max()),
            "rel_l2_err": float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))}


def summary(model) -> dict:
    types = compute_types(model)
    heavy = sum((types.get(op, Counter()) for op in HEAVY), Counter())
    kept = sum((types.get(op, Counter()) for op in KEEP_FP32), Counter())
    return {"nodes": len(model.graph.node), "casts": sum(types.get("Cast", Counter()).values()),
            "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
            "ir_version": model.ir_version, "conv_matmul_gemm": dict(heavy), "softmax_norms": dict(kept),
            "by_op": {op: dict(c) for op, c in sorted(types.items())}}


def compare(name: str, fp32: Path, fp16: Path, work: Path) -> list[dict]:
    import onnx
    import onnxruntime as ort
    from modelopt.onnx.autocast import convert_to_mixed_precision

    rows = []
    for graph in GRAPHS:
        reference = ort.InferenceSession(str(fp32 / f"{graph}.onnx"), providers=["CPUExecutionProvider"])
        feed = seeded_inputs(reference)
        converted = convert_to_mixed_precision(onnx_path=str(fp32 / f"{graph}.onnx"), low_precision_type="fp16",
                                               keep_io_types=True)
        autocast_path = work / f"{name}-{graph}-autocast.onnx"
        onnx.save(converted, str(autocast_path))
        for source, path in (("project float16 export", fp16 / f"{graph}.onnx"), ("ModelOpt AutoCast fp16",
                                                                                  autocast_path)):
            model = onnx.load(str(path))
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            rows.append({"avatar": name, "graph": graph, "source": source, **summary(model),
                         **fidelity(reference, session, feed)})
    return rows


def _counts(c: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "-"


def markdown(rows: list[dict], versions: dict) -> str:
    lines = ["# Half-precision graphs for a strongly typed TensorRT build: project export vs ModelOpt AutoCast", "",
             f"{datetime.date.today().isoformat()}, CPU, ONNX Runtime CPU provider (which computes float16 "
             "convolutions in float32 with inserted casts: errors reflect the graphs' cast placement and rounded "
             "weights and activations, not half-precision arithmetic on a GPU). Reference: the float32 graph on the "
             "same seeded inputs (timestep 500). " + ", ".join(f"{k} {v}" for k, v in versions.items()), "",
             "| avatar | graph | source | nodes | Casts | opset / IR | Conv+MatMul+Gemm compute in | Softmax + norms "
             "compute in | max abs err | rel L2 err |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['avatar']} | {r['graph']} | {r['source']} | {r['nodes']} | {r['casts']} | "
                     f"{r['opset']} / {r['ir_version']} | {_counts(r['conv_matmul_gemm'])} | "
                     f"{_counts(r['softmax_norms'])} | {r['max_abs_err']:.2e} | {r['rel_l2_err']:.2e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fp32", action="append", required=True, help="a float32 export folder (repeatable)")
    p.add_argument("--fp16", action="append", required=True, help="the float16 export folder of the same avatar")
    p.add_argument("--names", default=None, help="comma-separated avatar names for the table (default: folder names)")
    p.add_argument("--out", default=str(RESULTS / "half-precision-cpu"), help="output stem (.json and .md)")
    args = p.parse_args(argv)
    if len(args.fp32) != len(args.fp16):
        p.error("give one --fp16 folder per --fp32 folder")
    names = args.names.split(",") if args.names else [Path(d).name for d in args.fp32]
    from importlib.metadata import version

    versions = {k: version(k) for k in ("nvidia-modelopt", "onnx", "onnxruntime")}
    versions["python"] = platform.python_version()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name, fp32, fp16 in zip(names, args.fp32, args.fp16):
            rows += compare(name, Path(fp32), Path(fp16), Path(work))
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"versions": versions, "rows": rows}, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(rows, versions))
    print(markdown(rows, versions))


if __name__ == "__main__":
    main()
