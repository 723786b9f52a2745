"""The `tensorrt` backend: the shared frame with the TensorRT engines of `avatar export --to tensorrt`, every engine
execution enqueued on one CUDA stream.

    prepare(condition, tokens)   condition -> the `condition` buffer, tokens -> `tokens`; the conditioning engine
                                 -> `cond_embedding`, once per frame
    predict(i, sample, state)    sample -> `latent`, timestep i -> `timestep`; the denoiser engine -> `v` (returned
                                 as a copy), once per step
    decode(latent)               latent -> `latent`; the decoder engine -> `image` (a copy), once per frame
The buffers (`BufferPlan`, built from the manifest and checked against each engine's I/O tensors) are torch tensors
allocated once, and each engine's tensor addresses are bound to them once
(`IExecutionContext.set_tensor_address(name, tensor.data_ptr())`); inputs are copied into them on the stream. Every
execution is `execute_async_v3(stream)` on torch's current stream, the stream the shared loop's sampler arithmetic
runs on, so a frame is the conditioning engine, N denoiser executions and the decoder, with the steps' arithmetic
between them and no host synchronisation (nothing is read back). On CUDA `frame` captures all of it in one CUDA
graph (TensorRT's enqueue is captured like any kernel launch; one eager frame first, as TensorRT's diffusion demo
does before capturing) and replays it; where TensorRT cannot be captured the frame is enqueued eagerly, with a
warning. Written against NVIDIA's documented Python API; it has not run on this project's machines (no TensorRT).

The engines folder is checked before any engine is loaded: the avatar (shapes, batch, dtype, weights sha256:
`export.manifest.check_manifest`), and each engine's key against this GPU and TensorRT (`EngineKey`) and its plan
file against the manifest's sha256; a mismatch is a ConfigError naming both sides and the command that rebuilds.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..devices import DTYPES
from ..errors import BackendError, CheckpointError, ConfigError, InputError
from . import Backend

NEEDED = ("conditioning", "denoiser", "decoder")
# What a buffer name means to the backend: the tensors it writes before an execution and reads after.
WRITTEN = {"conditioning": ("condition",), "denoiser": ("latent", "timestep", "cond_embedding", "tokens"),
           "decoder": ("latent",)}
READ = {"conditioning": "cond_embedding", "denoiser": "v", "decoder": "image"}


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: str
    output: bool


class BufferPlan:
    """The buffers of a frame and which engine tensor binds which: one buffer per tensor name, shared where two
    graphs name the same tensor (the conditioning output `cond_embedding` is the denoiser's input; the denoiser's
    and the decoder's `latent`). Built from a manifest's graph entries (`inputs`, `outputs`); BackendError when two
    graphs disagree on a shared tensor, when a tensor the backend writes or reads is missing, or when the denoiser's
    `v` is not the shape of its `latent`."""

    def __init__(self, graphs: dict):
        self.graphs: dict[str, tuple[Tensor, ...]] = {}
        self.buffers: dict[str, tuple[tuple[int, ...], str]] = {}
        for name in NEEDED:
            entry = graphs[name]
            tensors = tuple(Tensor(v["name"], tuple(v["shape"]), v["dtype"], out) for out, group in
                            ((False, entry["inputs"]), (True, entry["outputs"])) for v in group)
            for t in tensors:
                known = self.buffers.setdefault(t.name, (t.shape, t.dtype))
                if known != (t.shape, t.dtype):
                    raise BackendError(f"graph {name!r} has {t.name} {list(t.shape)} {t.dtype}, another graph "
                                       f"{list(known[0])} {known[1]}; export the graphs again")
            names = {t.name: t.output for t in tensors}
            missing = [n for n in WRITTEN[name] if names.get(n) is not False] + \
                      ([READ[name]] if names.get(READ[name]) is not True else [])
            if missing:
                raise BackendError(f"the {name} engine has no {missing} (it has {sorted(names)}); export again")
            self.graphs[name] = tensors
        if self.buffers["v"] != self.buffers["latent"]:
            raise BackendError(f"the denoiser's v {self.buffers['v']} is not the shape of its latent "
                               f"{self.buffers['latent']}")

    def order(self, steps: int) -> list[str]:
        """The executions of one frame, in enqueue order."""
        return ["conditioning", *["denoiser"] * steps, "decoder"]

    def check_engine(self, name: str, engine, trt) -> None:
        """BackendError unless `engine` (an ICudaEngine) has exactly the I/O tensors the plan gives graph `name`."""
        types = {trt.DataType.FLOAT: "float32", trt.DataType.HALF: "float16", trt.DataType.BF16: "bfloat16",
                 trt.DataType.INT32: "int32", trt.DataType.INT64: "int64", trt.DataType.BOOL: "bool"}
        got = set()
        for i in range(engine.num_io_tensors):
            t = engine.get_tensor_name(i)
            mode = engine.get_tensor_mode(t)
            got.add(Tensor(t, tuple(int(d) for d in engine.get_tensor_shape(t)),
                           types.get(engine.get_tensor_dtype(t), str(engine.get_tensor_dtype(t))),
                           mode == trt.TensorIOMode.OUTPUT))
        want = set(self.graphs[name])
        if got != want:
            raise BackendError(f"the {name} engine's I/O tensors {sorted(map(_describe, got))} are not the manifest's "
                               f"{sorted(map(_describe, want))}; build the engines again")


def _describe(t: Tensor) -> str:
    return f"{'out' if t.output else 'in'} {t.name} {list(t.shape)} {t.dtype}"


def require_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        raise BackendError(f"the tensorrt backend runs on an NVIDIA GPU, got device {device}; render with --device "
                           "cuda, or use --backend onnxruntime on the CPU")


class TensorRTBackend(Backend):
    """The shared frame on the TensorRT engines of a build folder (`avatar export --to tensorrt`).

    Args (the first five are the registry's): avatar, sampler, noise, device (CUDA), dtype (None: the engines' own;
        otherwise it must be the dtype their graphs were exported in),
        engines: the build folder (`manifest.json` + `<graph>.plan`).
        graphs: capture each frame in a CUDA graph (default True).
        check_weights: compare the weights' sha256 with the manifest's (default True).
    """

    name = "tensorrt"
    own_networks = ("unet", "controlnet", "vae")  # the engines hold their own weights: these stay off the device

    def __init__(self, avatar, sampler, noise, device, dtype=None, *, engines=None, graphs: bool = True,
                 check_weights: bool = True):
        super().__init__(avatar, sampler, noise, device, dtype)
        if engines is None:
            raise ConfigError("the tensorrt backend needs a build folder: Renderer(..., backend='tensorrt', "
                              "backend_options={'engines': DIR}); build one with `avatar export --to tensorrt --onnx "
                              "ONNX_DIR --out DIR`")
        from export import tensorrt_build as build
        from export.manifest import check_manifest, read_manifest

        trt = build.load_tensorrt()
        require_cuda(self.device)
        self.engines = Path(engines)
        self.manifest = manifest = read_manifest(self.engines)
        if manifest.get("target") != "tensorrt":
            raise ConfigError(f"{self.engines} holds a {manifest.get('target')!r} export, not TensorRT engines; build "
                              f"them with `avatar export --to tensorrt --onnx {self.engines} --out DIR`, or render it "
                              "with --backend onnxruntime")
        want = None if dtype is None else str(dtype).removeprefix("torch.")
        check_manifest(manifest, avatar, dtype=want, source=f"the engines in {self.engines}", weights=check_weights)
        missing = [g for g in NEEDED if g not in manifest["graphs"]]
        if missing:
            raise CheckpointError(f"the engines in {self.engines} have no {missing} engine(s); build them again")
        gpu, capability = build.current_gpu(self.device)
        for name in NEEDED:
            entry = manifest["graphs"][name]
            key = build.EngineKey.from_dict(entry["key"])
            why = key.mismatch(build.EngineKey(key.graph_sha256, gpu, capability, str(trt.__version__)))
            if why is None and build.file_sha256(self.engines / entry["file"]) != entry["engine_sha256"]:
                why = f"{entry['file']} changed since it was built"
            if why is not None:
                raise ConfigError(f"the {name} engine in {self.engines} cannot run here: {why}; build it again on this "
                                  f"machine: avatar export --to tensorrt --onnx {manifest['onnx_folder']} --out "
                                  f"{self.engines}")
        self.dtype = DTYPES[manifest["dtype"]]
        self.batch = int(manifest["batch"])
        self.plan = BufferPlan(manifest["graphs"])
        self.buffers = {n: torch.empty(shape, dtype=DTYPES.get(d, torch.float32), device=self.device)
                        for n, (shape, d) in self.plan.buffers.items()}
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engines, self.contexts = {}, {}
        for name in NEEDED:
            self._engines[name], self.contexts[name] = self._load(trt, name)
        self._timesteps = torch.tensor(sampler.timesteps.tolist(), dtype=torch.float32, device=self.device)[:, None] \
            .expand(-1, self.batch).contiguous()  # [N, B]: step i copies row i into `timestep`
        self.graphs = bool(graphs)
        self._graph = None
        self.executions: list[str] = []  # the engines enqueued since the last frame began (its warm-up and capture
        # on the first captured frame; nothing on a replay, which enqueues the captured graph)

    def _load(self, trt, name: str):
        entry = self.manifest["graphs"][name]
        path = self.engines / entry["file"]
        engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise BackendError(f"TensorRT {trt.__version__} cannot deserialise {path} (its log above says why); build "
                               f"it again: avatar export --to tensorrt --onnx {self.manifest['onnx_folder']} --out "
                               f"{self.engines}")
        self.plan.check_engine(name, engine, trt)
        context = engine.create_execution_context()
        if context is None:
            raise BackendError(f"TensorRT could not create an execution context for {path} (out of GPU memory?)")
        for t in self.plan.graphs[name]:
            context.set_tensor_address(t.name, self.buffers[t.name].data_ptr())
        return engine, context

    def _execute(self, name: str) -> None:
        stream = torch.cuda.current_stream(self.device).cuda_stream
        if not self.contexts[name].execute_async_v3(stream):
            raise BackendError(f"TensorRT could not enqueue the {name} engine (its log above says why)")
        self.executions.append(name)

    # -- what the shared loop calls --------------------------------------------------------------------
    def prepare(self, condition: torch.Tensor, tokens: torch.Tensor):
        """condition `[B, C, H, W]`, tokens `[B, T, D]` -> None: the state (the conditioning embedding, the tokens)
        lives in the bound buffers. B must be the build's batch."""
        self._check(condition, tokens)
        self.buffers["condition"].copy_(condition)
        self.buffers["tokens"].copy_(tokens)
        self._execute("conditioning")
        return None

    def predict(self, i: int, sample: torch.Tensor, state) -> torch.Tensor:
        self.buffers["latent"].copy_(sample)
        self.buffers["timestep"].copy_(self._timesteps[i])
        self._execute("denoiser")
        return self.buffers["v"].clone()

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        self.buffers["latent"].copy_(latent)
        self._execute("decoder")
        return self.buffers["image"].clone()

    # -- the frame ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def frame(self, condition: torch.Tensor, tokens: torch.Tensor, on_step=None) -> torch.Tensor:
        """The shared frame: one CUDA graph replay once captured (its output buffer, valid until the next frame;
        `on_step(i)` then runs after the replay, once per step), else the enqueues themselves."""
        self._check(condition, tokens)
        self.executions = []
        if self.graphs and self._graph is None:
            self._graph = self._capture(condition, tokens)
        if self._graph is None:
            return super().frame(condition, tokens, on_step)
        graph, static_condition, static_tokens, pixels = self._graph
        static_condition.copy_(condition)
        static_tokens.copy_(tokens)
        graph.replay()
        for i in range(self.sampler.num_steps if on_step is not None else 0):
            on_step(i)
        return pixels

    def _capture(self, condition, tokens):
        """(graph, static condition, static tokens, static pixels) of one captured frame, or None where the capture
        fails (then `graphs` is switched off, with a warning)."""
        static_condition, static_tokens = condition.clone(), tokens.clone()
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            super().frame(static_condition, static_tokens)  # eager first: TensorRT sets itself up outside capture
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                pixels = super().frame(static_condition, static_tokens)
        except (RuntimeError, BackendError) as e:
            warnings.warn(f"TensorRT's enqueue could not be captured in a CUDA graph ({e}); enqueueing each frame "
                          "instead", stacklevel=3)
            torch.cuda.synchronize(self.device)
            self.graphs = False
            return None
        return graph, static_condition, static_tokens, pixels

    def _check(self, condition, tokens) -> None:
        if condition.dim() != 4 or condition.shape[0] != self.batch or tokens.shape[0] != self.batch:
            raise ConfigError(f"the engines in {self.engines} were built for batch {self.batch}, got a condition "
                              f"{tuple(condition.shape)} and tokens {tuple(tokens.shape)}; export with --batch "
                              f"{condition.shape[0]} or render {self.batch} frame(s) at a time")
        for name, t in (("condition", condition), ("tokens", tokens)):
            if tuple(t.shape) != self.plan.buffers[name][0]:
                raise InputError(f"{name} must be {self.plan.buffers[name][0]} for these engines, got {tuple(t.shape)}")

    def close(self) -> None:
        """Free the graph, the execution contexts, the engines and the buffers."""
        if self._graph is not None:
            self._graph[0].reset()
        self._graph = None
        self.contexts, self._engines, self.buffers = {}, {}, {}
        super().close()
