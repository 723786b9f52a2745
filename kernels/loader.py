"""Run-time loader for the `.cu` files beside it: NVRTC and the CUDA driver API through cuda-python.

A kernel source is compiled once per GPU architecture (to a cubin: no PTX, so the driver never JIT-compiles
and a newer NVRTC of the same CUDA major still loads on an older driver), loaded once per device into the
device's primary context (the one torch uses), and launched on torch's current stream. Once a function is
loaded, `KernelFunction.launch` allocates no device memory, copies nothing between host and device and
never synchronises, so it can be captured in a CUDA graph.

cuda-python is optional (`pip install 'diffusion-avatars-engine[cuda]'`); both its module layouts work:
`cuda.bindings.{driver,nvrtc}` (cuda-python >= 12.6 and 13) and the legacy `cuda.{cuda,nvrtc}`.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from pathlib import Path
from typing import Any, Sequence

import torch

from engine.errors import BackendError

INSTALL_HINT = "pip install 'diffusion-avatars-engine[cuda]'"
SOURCE_DIR = Path(__file__).resolve().parent
# No FMA contraction: the torch twins run their operations one kernel at a time, each rounded on its own.
NVRTC_OPTIONS = ("--fmad=false",)

_lock = threading.Lock()
_cubins: dict[tuple[str, str], bytes] = {}
_functions: dict[tuple[str, str, int], "KernelFunction"] = {}
_contexts: dict[int, Any] = {}


@functools.cache
def _bindings() -> tuple[Any, Any] | None:
    try:
        from cuda.bindings import driver, nvrtc
    except ImportError:
        try:
            from cuda import cuda as driver, nvrtc  # cuda-python < 12.6
        except ImportError:
            return None
    return driver, nvrtc


def bindings() -> tuple[Any, Any]:
    """cuda-python's `(driver, nvrtc)` modules; `BackendError` with the install command when missing."""
    mods = _bindings()
    if mods is None:
        raise BackendError(f"the fused CUDA kernels need cuda-python, which is not installed; run: {INSTALL_HINT}")
    return mods


def has_cuda_python() -> bool:
    """Whether cuda-python can be imported (says nothing about a GPU or the NVRTC library)."""
    return _bindings() is not None


def _check(result: Any, what: str) -> Any:
    """Unpack a cuda-python call's `(status, *values)`; raise `BackendError` naming the call on failure."""
    driver, nvrtc = bindings()
    status, values = result[0], result[1:]
    if isinstance(status, nvrtc.nvrtcResult):
        ok = status == nvrtc.nvrtcResult.NVRTC_SUCCESS
        describe = nvrtc.nvrtcGetErrorString
    else:
        ok = status == driver.CUresult.CUDA_SUCCESS
        describe = driver.cuGetErrorString
    if not ok:
        message = describe(status)[1]
        message = message.decode() if isinstance(message, bytes) else str(message)
        raise BackendError(
            f"{what} failed: {status.name if hasattr(status, 'name') else status} ({message}); check that the "
            f"NVIDIA driver, the GPU and cuda-python ({INSTALL_HINT}) belong to the same CUDA major version"
        )
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def source(name: str) -> str:
    """The text of `kernels/<name>.cu`."""
    path = SOURCE_DIR / f"{name}.cu"
    if not path.is_file():
        known = sorted(p.stem for p in SOURCE_DIR.glob("*.cu"))
        raise BackendError(f"no kernel source {path.name} in {SOURCE_DIR}; known kernels: {known}")
    return path.read_text()


def nvrtc_archs() -> list[int]:
    """The architectures (e.g. 90 for sm_90) the installed NVRTC can build for."""
    _, nvrtc = bindings()
    return list(_check(nvrtc.nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs"))


def compile_cubin(name: str, arch: str) -> bytes:
    """Compile `kernels/<name>.cu` with NVRTC for `arch` (like "sm_90") and return the cubin (cached).

    Needs cuda-python and the NVRTC library but no GPU. Compile errors raise `BackendError` with NVRTC's log.
    """
    key = (name, arch)
    with _lock:
        if key in _cubins:
            return _cubins[key]
    _, nvrtc = bindings()
    number = int(arch.removeprefix("sm_")) if arch.removeprefix("sm_").isdigit() else None
    supported = nvrtc_archs()
    if number not in supported:
        raise BackendError(
            f"NVRTC cannot build for {arch} (it supports sm_{', sm_'.join(map(str, supported))}); install the "
            f"cuda-python and NVRTC of the CUDA version that matches this GPU: {INSTALL_HINT}"
        )
    prog = _check(nvrtc.nvrtcCreateProgram(source(name).encode(), f"{name}.cu".encode(), 0, [], []),
                  "nvrtcCreateProgram")
    try:
        options = [f"--gpu-architecture={arch}".encode(), *(o.encode() for o in NVRTC_OPTIONS)]
        status = nvrtc.nvrtcCompileProgram(prog, len(options), options)[0]
        if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            size = _check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            log = bytes(size)  # a fresh buffer: NVRTC writes into it
            _check(nvrtc.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
            text = log.rstrip(b" \x00").decode(errors="replace")
            raise BackendError(
                f"NVRTC could not compile kernels/{name}.cu for {arch} ({status.name}):\n{text}\n"
                f"fix the source (check it with `nvcc -c -arch={arch} kernels/{name}.cu`)"
            )
        size = _check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        cubin = bytes(size)
        _check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
    finally:
        _check(nvrtc.nvrtcDestroyProgram(prog), "nvrtcDestroyProgram")
    with _lock:
        _cubins[key] = cubin
    return cubin


def device_arch(device: torch.device) -> str:
    """The `sm_XY` name of a CUDA device's architecture."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def _primary_context(index: int) -> Any:
    """Make device `index`'s primary context (the one torch's runtime uses) current on this thread."""
    driver, _ = bindings()
    ctx = _contexts.get(index)
    if ctx is None:
        # torch creates the primary context lazily: a tiny allocation makes sure it exists before we retain it.
        torch.cuda.init()
        torch.empty(1, device=torch.device("cuda", index))
        _check(driver.cuInit(0), "cuInit")
        dev = _check(driver.cuDeviceGet(index), "cuDeviceGet")
        ctx = _check(driver.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
        _contexts[index] = ctx
    current = _check(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
    if current is None or int(current) != int(ctx):
        _check(driver.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    return ctx


class KernelFunction:
    """One `extern "C" __global__` function loaded on one device. Build with `get_function`."""

    def __init__(self, name: str, function: str, index: int, module: Any, handle: Any):
        self.name, self.function, self.index = name, function, index
        self._module, self._handle = module, handle  # the module must outlive the function handle
        self._param_sizes = self._query_param_sizes()

    def _query_param_sizes(self) -> tuple[int, ...] | None:
        """The kernel's parameter sizes in bytes, read from the cubin; None where the driver can't say."""
        driver, _ = bindings()
        query = getattr(driver, "cuFuncGetParamInfo", None)  # CUDA >= 12.4
        if query is None:
            return None
        sizes = []
        while True:
            result = query(self._handle, len(sizes))
            if result[0] != driver.CUresult.CUDA_SUCCESS:
                break  # CUDA_ERROR_INVALID_VALUE past the last parameter
            sizes.append(int(result[2]))
        return tuple(sizes) if sizes else None

    def launch(self, grid: int, block: int, args: Sequence[Any], stream: int | None = None) -> None:
        """Launch on a 1-D grid. `args`: ctypes values (`ptr`, `i32`, `i64`, `f32`) in the kernel's order.

        `stream` is a raw `cudaStream_t` (default: torch's current stream on this device). Graph-capturable.
        """
        driver, _ = bindings()
        sizes = tuple(ctypes.sizeof(a) for a in args)
        if self._param_sizes is not None and sizes != self._param_sizes:
            raise BackendError(
                f"{self.name}.cu:{self.function} takes parameters of {self._param_sizes} bytes, was given "
                f"{sizes}; the Python wrapper and the .cu source disagree: fix the wrapper's argument list"
            )
        if stream is None:
            stream = torch.cuda.current_stream(self.index).cuda_stream
        _primary_context(self.index)
        # kernelParams as the address of a void*[n] array, one pointer per argument value: the form every
        # cuda-python version accepts. `args` and `pointers` stay alive until the call returns, and the
        # driver copies the values at launch (and into the graph node while capturing).
        pointers = (ctypes.c_void_p * len(args))(*(ctypes.addressof(a) for a in args))
        _check(
            driver.cuLaunchKernel(self._handle, grid, 1, 1, block, 1, 1, 0, stream, ctypes.addressof(pointers), 0),
            f"cuLaunchKernel({self.name}.cu:{self.function})",
        )


def get_function(name: str, function: str, device: torch.device | str | int) -> KernelFunction:
    """`function` of `kernels/<name>.cu`, compiled for and loaded on a CUDA `device` (cached per device)."""
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type != "cuda":
        raise BackendError(f"CUDA kernels run on CUDA devices, got {device}; use the torch fallback on {device.type}")
    index = torch.cuda.current_device() if device.index is None else device.index
    key = (name, function, index)
    with _lock:
        if key in _functions:
            return _functions[key]
    driver, _ = bindings()
    cubin = compile_cubin(name, device_arch(torch.device("cuda", index)))
    _primary_context(index)
    # The driver copies the image while loading, so a temporary buffer suffices.
    image = ctypes.create_string_buffer(cubin, len(cubin))
    module = _check(driver.cuModuleLoadData(ctypes.addressof(image)), f"cuModuleLoadData({name}.cu)")
    handle = _check(driver.cuModuleGetFunction(module, function.encode()), f"cuModuleGetFunction({function})")
    kernel = KernelFunction(name, function, index, module, handle)
    with _lock:
        return _functions.setdefault(key, kernel)


# ctypes wrappers for kernel arguments; their sizes must match the .cu parameter types.
def ptr(tensor: torch.Tensor | None) -> ctypes.c_void_p:
    """A tensor's device address (`T*`), or NULL for None."""
    return ctypes.c_void_p(0 if tensor is None else tensor.data_ptr())


def i32(value: int) -> ctypes.c_int32:
    return ctypes.c_int32(int(value))


def i64(value: int) -> ctypes.c_int64:
    return ctypes.c_int64(int(value))


def f32(value: float) -> ctypes.c_float:
    return ctypes.c_float(float(value))
