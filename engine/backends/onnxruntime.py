"""The `onnxruntime` backend: the shared frame with ONNX Runtime running the graphs that `avatar export` wrote.

    prepare(condition, tokens)   conditioning.onnx: condition [B, C, H, W] -> the ControlNet's conditioning
                                 embedding [B, C0, h, w], once per frame; the tokens are passed on as float32
    predict(i, sample, state)    denoiser.onnx: (latent, timestep = sampler.timesteps[i], cond_embedding, tokens)
                                 -> v [B, c, h, w], once per step (the timestep is a graph input: any sampler)
    decode(latent)               decoder.onnx (or tiny_decoder.onnx for decoder="tiny"): latent -> image
                                 [B, 3, H, W] in [-1, 1]
The loop (fixed noise, sampler steps), rasterising, conditioning and the expression tokens stay the shared torch
code. Inputs and outputs are bound to torch tensors' memory (IOBinding: no copies through numpy), every graph
input and output is float32 (a half-precision graph casts inside).

The engines folder is checked against the avatar before any session is built: shapes, batch, dtype and the
weights' sha256 (`export.manifest.check_manifest`); a mismatch is a ConfigError naming both sides.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..devices import DTYPES
from ..errors import BackendError, CheckpointError, ConfigError, InputError
from . import Backend

NEEDED = ("conditioning", "denoiser")  # and the decoder's graph: DECODER_GRAPHS
DECODER_GRAPHS = {"vae": "decoder", "tiny": "tiny_decoder"}
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


class OnnxRuntimeBackend(Backend):
    """The shared frame on ONNX Runtime sessions of an export folder (`avatar export --to onnx`).

    Args (the first five are the registry's): avatar, sampler, noise, device, dtype (None: the graphs' own;
        otherwise it must be the dtype they were exported in),
        engines: the export folder (`manifest.json` + the graphs).
        decoder: "vae" (the `decoder` graph) or "tiny" (the `tiny_decoder` graph, exported where the avatar has a
            trained tiny decoder).
        providers: ONNX Runtime execution providers in order of preference (a list or a comma-separated
            string); default: on CUDA the TensorRT and CUDA providers the installed onnxruntime has, then the
            CPU provider; on the CPU the CPU provider.
        threads: ONNX Runtime's intra-op threads (default: torch's, `torch.get_num_threads()`); inter-op 1.
        spinning: let ONNX Runtime's idle pool threads spin (default off: after each run they would spin on the
            cores that torch's rasterising and conditioning need next; on 2 cores the demo's frame took 211 ms with
            spinning and 101 ms without: benchmarks/results/demo-cpu-onnxruntime-runs.log, runs 3 and 4).
        check_weights: compare the weights' sha256 with the manifest's (default True).
    """

    name = "onnxruntime"

    def __init__(self, avatar, sampler, noise, device, dtype=None, *, engines=None, decoder: str = "vae",
                 providers=None, threads: int | None = None, spinning: bool = False, check_weights: bool = True):
        super().__init__(avatar, sampler, noise, device, dtype)
        if engines is None:
            raise ConfigError("the onnxruntime backend needs an export folder: Renderer(..., backend='onnxruntime', "
                              "backend_options={'engines': DIR}) or `avatar render --engines DIR`; write one with "
                              "`avatar export --avatar A --to onnx --out DIR`")
        from export.manifest import check_manifest, read_manifest

        ort = _onnxruntime()
        self.engines = Path(engines)
        self.manifest = read_manifest(self.engines)
        want = None if dtype is None else str(dtype).removeprefix("torch.")
        check_manifest(self.manifest, avatar, dtype=want, source=f"the engines in {self.engines}",
                       weights=check_weights)
        avatar.check_decoder(decoder)
        self._decoder = DECODER_GRAPHS[decoder]
        needed = (*NEEDED, self._decoder)
        missing = [g for g in needed if g not in self.manifest["graphs"]]
        if missing:
            raise CheckpointError(f"the engines in {self.engines} have no {missing} graph(s); export them again "
                                  "(`avatar export --to onnx` writes all, the tiny decoder's where the avatar has one)")
        self.dtype = DTYPES[self.manifest["dtype"]]
        self.batch = int(self.manifest["batch"])
        self.providers = self._providers(ort, providers)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        self.sessions, self._outputs = {}, {}
        for name in needed:
            graph = self.manifest["graphs"][name]
            try:
                self.sessions[name] = ort.InferenceSession(str(self.engines / graph["file"]), options,
                                                           providers=self.providers)
            except Exception as e:  # onnxruntime's exception types derive from Exception only
                raise BackendError(f"ONNX Runtime cannot load {self.engines / graph['file']} with {self.providers} "
                                   f"({type(e).__name__}: {e}); the CPU provider runs float32 and float16 graphs, "
                                   "not bfloat16: export with --dtype float32 or float16") from e
            (out,) = graph["outputs"]
            self._outputs[name] = (out["name"], tuple(out["shape"]))
        self._device = (self.device.type, self.device.index or 0)
        # One float32 [B] timestep tensor per step: a step binds it, nothing is built per step.
        self._timesteps = [torch.full((self.batch,), float(t), device=self.device)
                           for t in sampler.timesteps.tolist()]

    def _providers(self, ort, providers) -> list[str]:
        """The providers asked for (each must be installed), or the default order for this device."""
        available = ort.get_available_providers()
        if providers is None:
            gpu = [p for p in GPU_PROVIDERS if p in available]
            if self.device.type != "cuda":
                return ["CPUExecutionProvider"]
            if not gpu:
                raise BackendError(f"the installed onnxruntime has no CUDA or TensorRT provider (it has "
                                   f"{available}); install onnxruntime-gpu or render with --device cpu")
            return gpu + ["CPUExecutionProvider"]
        if isinstance(providers, str):
            providers = [p.strip() for p in providers.split(",") if p.strip()]
        unknown = [p for p in providers if p not in available]
        if unknown or not providers:
            raise ConfigError(f"ONNX Runtime providers {unknown or providers} are not available in the installed "
                              f"onnxruntime; it has {available}")
        return list(providers)

    # -- running a graph -----------------------------------------------------------------------------
    def _run(self, name: str, **inputs: torch.Tensor) -> torch.Tensor:
        """Run graph `name` on float32 torch tensors (bound in place) -> its output, a new float32 tensor."""
        session = self.sessions[name]
        binding = session.io_binding()
        kind, index = self._device
        keep = []  # the bound tensors must outlive the run
        for key, t in inputs.items():
            t = t.to(self.device, torch.float32).contiguous()
            keep.append(t)
            binding.bind_input(key, kind, index, np.float32, list(t.shape), t.data_ptr())
        out_name, shape = self._outputs[name]
        out = torch.empty(shape, dtype=torch.float32, device=self.device)
        binding.bind_output(out_name, kind, index, np.float32, list(shape), out.data_ptr())
        if kind == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # inputs written on torch's stream
        session.run_with_iobinding(binding)
        return out

    # -- what the shared loop calls --------------------------------------------------------------------
    def prepare(self, condition: torch.Tensor, tokens: torch.Tensor):
        """condition `[B, C, H, W]`, tokens `[B, T, D]` -> (conditioning embedding `[B, C0, h, w]`, tokens),
        float32 on the device; B must be the export's batch."""
        if condition.dim() != 4 or condition.shape[0] != self.batch or tokens.shape[0] != self.batch:
            raise ConfigError(f"the engines in {self.engines} were exported for batch {self.batch}, got a condition "
                              f"{tuple(condition.shape)} and tokens {tuple(tokens.shape)}; export with --batch "
                              f"{condition.shape[0]} or render {self.batch} frame(s) at a time")
        want = tuple(self.manifest["graphs"]["conditioning"]["inputs"][0]["shape"])
        if tuple(condition.shape) != want:
            raise InputError(f"condition must be {want} for these engines, got {tuple(condition.shape)}")
        return self._run("conditioning", condition=condition), tokens.to(self.device, torch.float32).contiguous()

    def predict(self, i: int, sample: torch.Tensor, state) -> torch.Tensor:
        cond_embedding, tokens = state
        return self._run("denoiser", latent=sample, timestep=self._timesteps[i], cond_embedding=cond_embedding,
                         tokens=tokens)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self._run(self._decoder, latent=latent)

    def close(self) -> None:
        """Free the sessions."""
        self.sessions.clear()


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendError("the onnxruntime backend needs onnxruntime: pip install "
                           "'diffusion-avatars-engine[onnx]'") from e
    return onnxruntime
