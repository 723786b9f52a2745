"""A stand-in `tensorrt` module for tests on machines without TensorRT: the documented Python API calls that
`export.tensorrt_build` and `engine.backends.tensorrt` make, recorded, with engines that really compute.

A "built" plan is JSON naming its graph and I/O tensors (read from the ONNX file by the fake parser). A fake
execution context reads its inputs from, and writes its outputs to, the memory at the addresses bound with
`set_tensor_address` (CPU tensors here, device memory for TensorRT), through ctypes, computing closed forms
(`conditioning`, `denoiser`, `decoder` below, numpy) that a test reproduces with torch: an input copied to the wrong
buffer, a wrong timestep or a missing execution changes the frame. Every call is appended to `calls`.
"""

from __future__ import annotations

import ctypes
import json
import types

import numpy as np
import onnx

ONNX_TYPES = {1: "FLOAT", 10: "HALF", 16: "BF16", 6: "INT32", 7: "INT64", 9: "BOOL"}


def conditioning(condition, channels: int, size: int):
    """[B, C, H, W] -> [B, channels, size, size]: the channel mean, block-averaged, plus 0.01 per output channel."""
    b, _, h, _ = condition.shape
    f = h // size
    m = condition.mean(axis=1).reshape(b, size, f, size, f).mean(axis=(2, 4))
    return m[:, None] + 0.01 * np.arange(channels, dtype=np.float32)[None, :, None, None]


def denoiser(latent, timestep, cond_embedding, tokens):
    c = latent.shape[1]
    return (0.5 * latent - 1e-3 * timestep[:, None, None, None] + 0.1 * cond_embedding[:, :c]
            + 0.05 * tokens.mean(axis=(1, 2))[:, None, None, None])


def decoder(latent, size: int):
    f = size // latent.shape[-1]
    return np.tanh(latent[:, :3].repeat(f, axis=2).repeat(f, axis=3))


def _array(address: int, shape) -> np.ndarray:
    n = int(np.prod(shape))
    return np.ctypeslib.as_array((ctypes.c_float * n).from_address(address)).reshape(shape)


class FakeTensorRT(types.ModuleType):
    def __init__(self, version: str = "10.8.0.43"):
        super().__init__("tensorrt")
        self.__version__ = version
        self.calls: list[tuple] = []
        self.failing_graph = None  # the graph whose build returns None, as a failed TensorRT build does
        trt = self

        class Logger:
            WARNING = 2

            def __init__(self, level):
                self.level = level

        class NetworkDefinitionCreationFlag:
            STRONGLY_TYPED = 0

        class MemoryPoolType:
            WORKSPACE = 0

        class DataType:
            FLOAT, HALF, BF16, INT32, INT64, BOOL = "FLOAT", "HALF", "BF16", "INT32", "INT64", "BOOL"

        class TensorIOMode:
            INPUT, OUTPUT = "INPUT", "OUTPUT"

        class Network:
            def __init__(self, flags):
                self.flags, self.graph, self.io = flags, None, []

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger):
                self.network = network

            def parse_from_file(self, path):
                trt.calls.append(("parse", path))
                g = onnx.load(path, load_external_data=False).graph
                self.network.graph = path.rsplit("/", 1)[-1].removesuffix(".onnx")
                self.network.io = [(v.name, [d.dim_value for d in v.type.tensor_type.shape.dim],
                                    ONNX_TYPES[v.type.tensor_type.elem_type], mode)
                                   for mode, group in (("INPUT", g.input), ("OUTPUT", g.output)) for v in group]
                return True

        class TimingCache:
            def __init__(self, data: bytes):
                self.data = data

            def serialize(self):
                return self.data + b"+"

        class BuilderConfig:
            def create_timing_cache(self, data):
                trt.calls.append(("create_timing_cache", bytes(data)))
                return TimingCache(bytes(data))

            def set_timing_cache(self, cache, ignore_mismatch):
                trt.calls.append(("set_timing_cache", ignore_mismatch))
                return not cache.data.startswith(b"foreign")

            def set_memory_pool_limit(self, pool, size):
                trt.calls.append(("workspace", size))

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                trt.calls.append(("create_network", flags))
                return Network(flags)

            def create_builder_config(self):
                return BuilderConfig()

            def build_serialized_network(self, network, config):
                trt.calls.append(("build", network.graph, network.flags))
                if network.graph == trt.failing_graph:
                    return None
                return json.dumps({"graph": network.graph, "io": network.io, "tensorrt": trt.__version__}).encode()

        class Engine:
            def __init__(self, plan):
                self.graph, self.io = plan["graph"], plan["io"]
                self.num_io_tensors = len(self.io)

            def _tensor(self, name):
                return next(t for t in self.io if t[0] == name)

            def get_tensor_name(self, i):
                return self.io[i][0]

            def get_tensor_mode(self, name):
                return self._tensor(name)[3]

            def get_tensor_shape(self, name):
                return tuple(self._tensor(name)[1])

            def get_tensor_dtype(self, name):
                return self._tensor(name)[2]

            def create_execution_context(self):
                return Context(self)

        class Context:
            def __init__(self, engine):
                self.engine, self.addresses = engine, {}

            def set_tensor_address(self, name, address):
                trt.calls.append(("set_tensor_address", self.engine.graph, name))
                self.addresses[name] = address

            def execute_async_v3(self, stream_handle):
                trt.calls.append(("execute_async_v3", self.engine.graph, stream_handle))
                x = {n: _array(self.addresses[n], shape) for n, shape, _, mode in self.engine.io}
                if self.engine.graph == "conditioning":
                    out = x["cond_embedding"]
                    out[...] = conditioning(x["condition"], out.shape[1], out.shape[2])
                elif self.engine.graph == "denoiser":
                    x["v"][...] = denoiser(x["latent"], x["timestep"], x["cond_embedding"], x["tokens"])
                elif self.engine.graph == "decoder":
                    x["image"][...] = decoder(x["latent"], x["image"].shape[-1])
                return True

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                plan = json.loads(bytes(data))
                return Engine(plan) if plan["tensorrt"] == trt.__version__ else None

        for cls in (Logger, NetworkDefinitionCreationFlag, MemoryPoolType, DataType, TensorIOMode, OnnxParser,
                    Builder, Runtime):
            setattr(self, cls.__name__, cls)

    def executions(self) -> list[tuple[str, int]]:
        return [(graph, stream) for call, graph, stream in (c for c in self.calls if c[0] == "execute_async_v3")]
