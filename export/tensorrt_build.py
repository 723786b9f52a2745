"""`build_engines`: TensorRT engines from an ONNX export folder, one per graph, strongly typed, static shapes.

Written against NVIDIA's documented Python API (TensorRT 10.x and 11.x); it has not run on this project's machines,
where TensorRT cannot be installed. Per graph of the ONNX export (`avatar export --to onnx`):
1. checks (`export.tensorrt_support`): every operator and its data type in TensorRT's documented list, static input
   and output shapes, and the graph's tensor types against the export's dtype: a strongly typed network computes in
   the types the graph says, so a float16 engine comes from the float16 export (the builder's FP16/BF16 flags are
   gone in TensorRT 11);
2. the cache key (`EngineKey`): the graph's sha256 (with its external data), the GPU's name and compute capability,
   TensorRT's version. An engine of an earlier build at `out` with the same key and an intact plan file is kept;
   any other is rebuilt, and the log names the part that changed;
3. the build: `Builder.create_network(1 << STRONGLY_TYPED)` (the flag is needed on 10.x; 11.x builds only strongly
   typed networks and ignores it), `OnnxParser.parse_from_file`, an `IBuilderConfig` with the shared timing cache
   and an optional workspace limit, `Builder.build_serialized_network`: `<graph>.plan`.
The timing cache (`timing.cache` in `out`, or the file `timing_cache` names) is read before the first build and
written after the last (`ITimingCache.serialize`), so later builds skip the kernel timings they share. A cache from
another TensorRT or GPU is refused by TensorRT (`set_timing_cache(..., ignore_mismatch=False)`) and started afresh.
Everything is written into a temporary folder renamed onto `out` when complete (`export.onnx.staged_folder`).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from engine.errors import BackendError, CheckpointError, ConfigError
from engine.files import write_atomic

from .manifest import MANIFEST, read_manifest, write_manifest
from .onnx import staged_folder
from .tensorrt_support import graph_dtype, graph_problems, opset_problem, precision_problems

INSTALL = ("TensorRT is not installed: pip install 'diffusion-avatars-engine[tensorrt]' (TensorRT 10 or 11 with a "
           "CUDA build of torch; it needs an NVIDIA GPU of the Turing generation or later, compute capability 7.5+, "
           "and a driver for CUDA 12 or 13, r535 or newer on Linux)")
TIMING_CACHE = "timing.cache"


def load_tensorrt():
    """The `tensorrt` module (10.x or 11.x); BackendError with how to install it."""
    try:
        import tensorrt
    except ImportError as e:
        raise BackendError(INSTALL) from e
    if tensorrt_major(tensorrt) < 10:
        raise BackendError(f"TensorRT {tensorrt.__version__} is installed; the engines need TensorRT 10 or 11 "
                           "(strongly typed networks, name-based I/O): "
                           "pip install 'diffusion-avatars-engine[tensorrt]'")
    return tensorrt


def tensorrt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def current_gpu(device=None) -> tuple[str, str]:
    """(name, compute capability "major.minor") of the CUDA device; BackendError without one."""
    import torch

    if not torch.cuda.is_available():
        raise BackendError("TensorRT engines are built and run on an NVIDIA GPU, and torch sees no CUDA device here "
                           "(a CPU build of torch, or no GPU or driver); on the CPU use --backend onnxruntime")
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


@dataclass(frozen=True)
class EngineKey:
    """What an engine is valid for: one graph (its sha256), one GPU model (name and compute capability), one
    TensorRT version. Serialized engines are portable across none of them."""

    graph_sha256: str
    gpu: str
    compute_capability: str
    tensorrt: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EngineKey:
        return cls(**{f.name: str(data.get(f.name)) for f in fields(cls)})

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def mismatch(self, now: EngineKey) -> str | None:
        """Why an engine built for `self` is not valid for `now` (each differing part named), or None."""
        why = []
        if self.graph_sha256 != now.graph_sha256:
            why.append(f"the ONNX graph changed (sha256 {self.graph_sha256[:12]}... -> {now.graph_sha256[:12]}...)")
        if (self.gpu, self.compute_capability) != (now.gpu, now.compute_capability):
            why.append(f"it was built for {self.gpu} (compute capability {self.compute_capability}), this GPU is "
                       f"{now.gpu} ({now.compute_capability})")
        if self.tensorrt != now.tensorrt:
            why.append(f"it was built with TensorRT {self.tensorrt}, this is TensorRT {now.tensorrt}")
        return "; ".join(why) or None


def file_sha256(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def graph_sha256(folder: Path, entry: dict) -> str:
    """sha256 of an ONNX graph file and its external data (if any), in that order."""
    files = [folder / entry["file"]] + ([folder / entry["external_data"]] if entry.get("external_data") else [])
    return file_sha256(*files)


def build_engines(onnx_dir, out, *, timing_cache=None, workspace_gib: float | None = None, rebuild: bool = False,
                  device=None, log=None) -> dict:
    """Build (or keep, where an earlier build at `out` is valid) one TensorRT engine per graph of the ONNX export
    `onnx_dir` into the folder `out`; returns the manifest (also `out/manifest.json`, target "tensorrt").

    timing_cache: the timing cache file (default `out/timing.cache`, carried over from the earlier build);
    workspace_gib: the builder's workspace limit (default TensorRT's: the device's memory); rebuild: build every
    engine even where a valid one exists; device: the CUDA device (default torch's current one); log: a callable
    taking one line of progress. BackendError without TensorRT or a GPU, or when a graph fails the checks or the
    build; ConfigError / CheckpointError for a folder that is not an ONNX export or an unwritable `out`.
    """
    log = log or (lambda line: None)
    trt = load_tensorrt()
    source, out = Path(onnx_dir), Path(out)
    if out.resolve() == source.resolve():
        raise ConfigError(f"--out {out} is the --onnx folder: the engines would replace the graphs; give another --out")
    onnx_manifest = read_manifest(source)
    if onnx_manifest.get("target") != "onnx":
        raise ConfigError(f"--onnx {source} holds a {onnx_manifest.get('target')!r} export, not ONNX graphs; give the "
                          "folder `avatar export --to onnx` wrote")
    graphs = onnx_manifest["graphs"]
    _check_graphs(source, graphs, onnx_manifest["dtype"], tensorrt_major(trt), log)
    gpu, capability = current_gpu(device)
    earlier = (_earlier(out) or {}).get("graphs", {})
    cache_file = Path(timing_cache) if timing_cache else out / TIMING_CACHE
    builder = _Builder(trt, cache_file, workspace_gib, log)
    with staged_folder(out) as tmp:
        entries = {}
        for name, graph in graphs.items():
            key = EngineKey(graph_sha256(source, graph), gpu, capability, str(trt.__version__))
            old, plan, t0 = earlier.get(name), tmp / f"{name}.plan", time.perf_counter()
            why = "asked to rebuild" if rebuild else "no earlier engine" if old is None else _stale(old, key, out)
            if why is None:
                shutil.copy2(out / old["file"], plan)
                log(f"{name}: kept {old['file']} (same graph, GPU and TensorRT)")
            else:
                plan.write_bytes(builder.build(source / graph["file"]))
                log(f"{name}: built {plan.name} ({plan.stat().st_size / 2**20:.1f} MiB) in "
                    f"{time.perf_counter() - t0:.1f} s ({why})")
            entries[name] = {"file": plan.name, "external_data": None, "bytes": plan.stat().st_size,
                             "engine_sha256": file_sha256(plan), "onnx_file": graph["file"], "key": key.to_dict(),
                             "inputs": graph["inputs"], "outputs": graph["outputs"], "kept": why is None,
                             "build_s": None if why is None else round(time.perf_counter() - t0, 2)}
        data = builder.timing_cache()
        if timing_cache:
            write_atomic(cache_file, data)
        else:
            (tmp / TIMING_CACHE).write_bytes(data)
        manifest = {"target": "tensorrt", "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    "dtype": onnx_manifest["dtype"], "batch": onnx_manifest["batch"], "opset": onnx_manifest["opset"],
                    "avatar": onnx_manifest["avatar"], "onnx_folder": str(source.resolve()),
                    "tensorrt": {"version": str(trt.__version__), "gpu": gpu, "compute_capability": capability,
                                 "strongly_typed": True, "timing_cache": str(cache_file.resolve())},
                    "graphs": entries,
                    "versions": {**onnx_manifest.get("versions", {}), "tensorrt": str(trt.__version__)}}
        write_manifest(tmp, manifest)
    return manifest


def _check_graphs(source: Path, graphs: dict, dtype: str, major: int, log) -> None:
    """BackendError naming every problem a strongly typed TensorRT build would have with these graphs."""
    import onnx

    problems = []
    for name, graph in graphs.items():
        model = onnx.load(str(source / graph["file"]), load_external_data=False)
        found = graph_problems(model) + precision_problems(model, graph_dtype(name, dtype))
        problems += [f"{name}: {p}" for p in found]
        if (note := opset_problem(model, major)) is not None:
            log(f"{name}: warning: {note}; TensorRT's parser decides")
    if problems:
        shown = "\n  ".join(problems[:12]) + (f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise BackendError(f"the graphs in {source} cannot be built as strongly typed TensorRT engines:\n  {shown}")


def _earlier(out: Path) -> dict | None:
    """The manifest of an earlier TensorRT build at `out`, or None (nothing there, or not a TensorRT build)."""
    if not (out / MANIFEST).is_file():
        return None
    try:
        manifest = read_manifest(out)
    except (CheckpointError, ConfigError):
        return None  # a broken earlier build: everything is rebuilt, and the folder replaced
    return manifest if manifest.get("target") == "tensorrt" else None


class _Builder:
    """One `trt.Builder` and the timing cache its builds share (loaded from `cache_file` when TensorRT accepts it)."""

    def __init__(self, trt, cache_file: Path, workspace_gib: float | None, log):
        self.trt, self.workspace_gib = trt, workspace_gib
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.builder = trt.Builder(self.logger)
        config = self.builder.create_builder_config()
        data = cache_file.read_bytes() if cache_file.is_file() else b""
        self.cache = config.create_timing_cache(data)
        if data and not config.set_timing_cache(self.cache, False):
            log(f"the timing cache {cache_file} is from another TensorRT version or GPU: starting a new one")
            self.cache = config.create_timing_cache(b"")
        elif data:
            log(f"timing cache: {cache_file} ({len(data) / 2**10:.0f} KiB)")

    def build(self, path: Path) -> bytes:
        """One strongly typed engine from the ONNX graph at `path`, serialized."""
        trt = self.trt
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if tensorrt_major(trt) == 10 else 0
        network = self.builder.create_network(flags)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(path)):  # reads external data beside the file
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendError(f"TensorRT's ONNX parser rejects {path}: {errors}")
        config = self.builder.create_builder_config()
        config.set_timing_cache(self.cache, False)
        if self.workspace_gib:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(self.workspace_gib * 2**30))
        plan = self.builder.build_serialized_network(network, config)
        if plan is None:
            raise BackendError(f"TensorRT could not build an engine from {path} (its log above says why)")
        return bytes(plan)

    def timing_cache(self) -> bytes:
        return bytes(self.cache.serialize())


def _stale(old: dict, key: EngineKey, out: Path) -> str | None:
    """Why the earlier engine `old` (a manifest entry of the build at `out`) cannot be kept, or None."""
    why = EngineKey.from_dict(old.get("key", {})).mismatch(key)
    if why is None and file_sha256(out / old["file"]) != old.get("engine_sha256"):
        why = f"{old['file']} changed since it was built (sha256 differs from the manifest's)"
    return why
