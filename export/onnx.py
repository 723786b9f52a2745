"""`export_onnx`: an avatar's networks as static-shape ONNX graphs plus a manifest, in one folder.

Per graph (`export.graphs`: conditioning, denoiser, decoder, tokens, and the tiny decoder where the avatar has one):
1. `torch.onnx.export(module, inputs, dynamo=True, opset_version=opset, optimize=True)`: torch.export traces the
   module, onnxscript's optimizer folds constants and removes dead nodes;
2. onnxslim (`slim=True`, graphs under `EXTERNAL_BYTES`): a second constant-folding / fusion pass;
3. saved with external data (`<file>.data`) when the weights pass `EXTERNAL_BYTES` (protobuf's 2 GB limit);
4. `onnx.checker.check_model(path, full_check=True)` and strict shape inference (written into the file:
   every intermediate tensor has its type and static shape), then every input and output shape is checked;
5. optionally (`verify=True`) run once in ONNX Runtime's CPU provider against the torch module on seeded inputs.
Everything is written into a temporary folder beside `out`, renamed to `out` when complete (`staged_folder`): a
failed export leaves nothing (and an earlier export at `out` stays as it was).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import platform
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from engine.devices import DTYPES
from engine.errors import BackendError, ConfigError
from engine.files import FILE_MODE

from .graphs import GRAPHS, OUTPUTS, example_inputs, graph_module, output_shape
from .manifest import MANIFEST, avatar_facts, write_manifest

MIN_OPSET = 18
BF16_OPSET = 22  # the first opset whose Conv (and most arithmetic) accepts bfloat16
EXTERNAL_BYTES = 1 << 30  # weights past 1 GiB go to external data (protobuf caps a file at 2 GB)
ONNX_TYPES = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32"}


def export_onnx(avatar, out: str | os.PathLike, dtype: str = "float32", batch: int = 1, opset: int | None = None,
                graphs: tuple[str, ...] | None = None, slim: bool = True, verify: bool = True, log=None) -> dict:
    """Export `avatar` (an `engine.model.Avatar` with weights on the CPU; unchanged) to the folder `out`; returns the
    manifest (also written to `out/manifest.json`, format in `export.manifest`).

    dtype: the graphs' compute dtype ("float32", "float16", "bfloat16"; inputs and outputs stay float32);
    batch: the static batch size; opset: 18 or newer (22 or newer for bfloat16; default: the lowest that works);
    graphs: a subset of `GRAPHS` (default: all of them, the tiny decoder's where the avatar has one); slim: run
    onnxslim;
    verify: compare each graph with its torch module in ONNX Runtime (skipped for graphs with external data);
    log: a callable taking one line of progress (e.g. print). ConfigError for bad arguments or an unwritable or
    occupied `out`; BackendError when the exporter or a check fails.
    """
    log = log or (lambda line: None)
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    if not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"batch must be a positive integer, got {batch!r}")
    low = BF16_OPSET if dtype == "bfloat16" else MIN_OPSET
    opset = low if opset is None else opset
    if not isinstance(opset, int) or opset < low:
        why = " for bfloat16 graphs (opset 18's Conv has no bfloat16)" if dtype == "bfloat16" else ""
        raise ConfigError(f"opset must be {low} or newer{why}, got {opset!r}")
    if graphs is None:
        graphs = tuple(g for g in GRAPHS if g != "tiny_decoder" or avatar.tiny_decoder is not None)
    unknown = [g for g in graphs if g not in GRAPHS]
    if unknown or not graphs:
        raise ConfigError(f"unknown graph(s) {unknown}; choose from {list(GRAPHS)}")
    device = avatar.prompt_embedding.device
    if device.type != "cpu":
        raise ConfigError(f"export traces the networks on the CPU, but this avatar is on {device}; load it with "
                          "device='cpu' (it has no weights on 'meta')")
    with staged_folder(Path(out)) as tmp:
        entries = {}
        for name in graphs:
            t0 = time.perf_counter()
            entries[name] = _export_graph(name, avatar, DTYPES[dtype], batch, opset, tmp, slim, verify)
            entries[name]["export_s"] = round(time.perf_counter() - t0, 2)
            e = entries[name]
            err = f", max abs err {e['max_abs_err']:.2e} against torch" if e["max_abs_err"] is not None else \
                f" (not run in ONNX Runtime: {e['not_verified']})" if e.get("not_verified") else ""
            log(f"{name}: {e['file']} ({e['bytes'] / 2**20:.1f} MiB, {e['nodes']} nodes) in {e['export_s']:.1f} s{err}")
        manifest = {"target": "onnx", "created": datetime.datetime.now(datetime.UTC).isoformat(
            timespec="seconds"), "dtype": dtype, "batch": batch, "opset": opset, "avatar": avatar_facts(avatar),
            "graphs": entries, "versions": _versions()}
        write_manifest(tmp, manifest)
    return manifest


@contextlib.contextmanager
def staged_folder(out: Path):
    """A new temporary folder beside `out` to write into: renamed onto `out` when the block completes (an earlier
    export there is replaced), removed when it raises (an error, Ctrl-C): `out` is never half-written."""
    tmp = _temporary_folder(out)
    try:
        yield tmp
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _temporary_folder(out: Path) -> Path:
    """A new hidden folder beside `out`; ConfigError when `out` cannot be written or holds something else."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the graphs")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise ConfigError(f"--out {out} is a folder that is not empty and holds no {MANIFEST} (not an earlier "
                          "export); give a new or empty folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.export-"))
        tmp.chmod(FILE_MODE | (FILE_MODE & 0o444) >> 2)  # a normal folder's mode (mkdtemp's is 0700), r -> x
        return tmp
    except OSError as e:
        raise ConfigError(f"cannot write the export to {out} ({e}); give a writable --out folder") from e


def _replace(tmp: Path, out: Path) -> None:
    """Rename the finished folder `tmp` onto `out`; an earlier export (or empty folder) there is removed after."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _quiet():
    """The exporter's and diffusers' notices (torchvision ops, deprecations, dtype casts) off the console."""
    from diffusers.utils import logging as dlogging

    level, onnx_logger = dlogging.get_verbosity(), logging.getLogger("torch.onnx")
    old = onnx_logger.level
    dlogging.set_verbosity_error()
    onnx_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        dlogging.set_verbosity(level)
        onnx_logger.setLevel(old)


def _export_graph(name: str, avatar, dtype: torch.dtype, batch: int, opset: int, folder: Path, slim: bool,
                  verify: bool) -> dict:
    """Export, fold, save, check one graph into `folder`; returns its manifest entry."""
    import onnx

    inputs = example_inputs(name, avatar.config, batch)
    with _quiet():
        module = graph_module(name, avatar, dtype).eval()
        try:
            program = torch.onnx.export(module, tuple(inputs.values()), dynamo=True, opset_version=opset,
                                        input_names=list(inputs), output_names=[OUTPUTS[name]], optimize=True,
                                        verbose=False)
        except Exception as e:  # the exporter raises many types: name the graph, keep the cause
            raise BackendError(f"torch.onnx.export of the {name} graph failed: {type(e).__name__}: {e}") from e
    weights = sum(v.const_value.nbytes for v in program.model.graph.initializers.values()
                  if v.const_value is not None)
    external = weights > EXTERNAL_BYTES
    path = folder / f"{name}.onnx"
    if slim and not external:
        model = _slim(program.model_proto)
        onnx.save_model(model, str(path))
    else:
        program.save(str(path), external_data=external)
    del program
    try:
        onnx.checker.check_model(str(path), full_check=True)
        onnx.shape_inference.infer_shapes_path(str(path), str(path), check_type=True, strict_mode=True,
                                               data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise BackendError(f"the exported {name} graph fails onnx's checker or shape inference: {e}") from e
    model = onnx.load(str(path), load_external_data=False)
    entry = {"file": path.name, "external_data": None, "bytes": path.stat().st_size, "nodes": len(model.graph.node),
             "inputs": [_value(v) for v in model.graph.input], "outputs": [_value(v) for v in model.graph.output],
             "max_abs_err": None, "not_verified": None}
    data = folder / f"{path.name}.data"
    if external:
        if not data.is_file():
            raise BackendError(f"the {name} graph's external data {data.name} was not written")
        entry["external_data"], entry["bytes"] = data.name, entry["bytes"] + data.stat().st_size
    _check_shapes(name, entry, inputs, avatar.config)
    if verify and not external:
        entry["max_abs_err"], entry["not_verified"] = _verify(path, module, inputs)
    elif verify:
        entry["not_verified"] = "a graph with external data is not run at export, to bound memory"
    return entry


def _slim(model):
    """onnxslim's constant folding and dead-node removal (no fusions that change the op set); a failing slim
    pass keeps the exporter's graph."""
    import onnxslim

    try:
        with _quiet():
            return onnxslim.slim(model)
    except Exception as e:  # noqa: BLE001 -- onnxslim is an optimisation: never lose the export for it
        warnings.warn(f"onnxslim failed ({type(e).__name__}: {e}); keeping the exporter's graph", stacklevel=2)
        return model


def _value(v) -> dict:
    t = v.type.tensor_type
    return {"name": v.name, "shape": [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim],
            "dtype": ONNX_TYPES.get(t.elem_type, str(t.elem_type))}


def _check_shapes(name: str, entry: dict, inputs: dict, config) -> None:
    """BackendError unless the graph's inputs are `inputs` (names, shapes, float32) and its output has the static
    shape `output_shape` gives."""
    got = [(v["name"], v["shape"], v["dtype"]) for v in entry["inputs"]]
    want = [(k, list(t.shape), "float32") for k, t in inputs.items()]
    if got != want:
        raise BackendError(f"the {name} graph's inputs are {got}, expected {want}")
    outs = [(v["name"], v["shape"], v["dtype"]) for v in entry["outputs"]]
    want = [(OUTPUTS[name], output_shape(name, config, next(iter(inputs.values())).shape[0]), "float32")]
    if outs != want:
        raise BackendError(f"the {name} graph's outputs are {outs}, expected {want}")


def _verify(path: Path, module, inputs: dict) -> tuple[float | None, str | None]:
    """(max absolute difference between the graph in ONNX Runtime (CPU) and the torch module on `inputs`, None),
    or (None, why it could not run)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    except Exception as e:  # noqa: BLE001 -- ONNX Runtime's errors derive from Exception only; e.g. bfloat16
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    with torch.no_grad():
        want = module(*inputs.values()).numpy()
    return float(np.abs(got - want).max()), None


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import diffusers
    import onnx
    import onnx_ir
    import onnxruntime
    import onnxscript
    import onnxslim

    try:
        engine_version = version("diffusion-avatars-engine")
    except PackageNotFoundError:
        engine_version = None
    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__, "onnx_ir": onnx_ir.__version__, "onnxslim": onnxslim.__version__,
            "onnxruntime": onnxruntime.__version__,
            "engine": engine_version, "python": platform.python_version()}
