"""The one reader of a device name, `resolve_device("auto"|"cpu"|"cuda"|"cuda:N"|torch.device)`, and of a
precision, `resolve_dtype("float32"|"float16"|"bfloat16"|torch.dtype)` (`DTYPES`: the names).

Used by `Renderer`, `Avatar.from_pretrained` and the CLI's `--device`, so every entry point refuses a malformed
name or a GPU this machine lacks the same way (rather than, say, a safetensors error that blames the file).
"""

from __future__ import annotations

import torch

from .errors import BackendError, ConfigError

DEVICES = "auto (CUDA when present, else cpu), cpu, cuda or cuda:N"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str | torch.device = "auto", allow_meta: bool = False) -> torch.device:
    """"auto": CUDA when torch sees a GPU, else the CPU. Anything else is checked: an unknown name is a ConfigError,
    CUDA without a GPU (or an index past the last) a BackendError. `allow_meta`: also accept "meta" (structure
    only, no memory)."""
    if isinstance(device, str) and device.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device.strip() if isinstance(device, str) else device)
    except (RuntimeError, TypeError, ValueError):
        resolved = None
    kinds = ("cpu", "cuda", "meta") if allow_meta else ("cpu", "cuda")
    if resolved is None or resolved.type not in kinds:
        raise ConfigError(f"unknown device {str(device)!r} (use {DEVICES})")
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = "this torch build has no CUDA" if torch.version.cuda is None else "torch sees no CUDA GPU"
            raise BackendError(f"{str(resolved)!r} is not available: {why} (use cpu, or auto)")
        if (resolved.index or 0) >= count:
            raise BackendError(f"{str(resolved)!r} does not exist: this machine has {count} CUDA device(s), "
                               f"cuda:0 to cuda:{count - 1} (pick one of them, or auto)")
    return resolved


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ConfigError(f"dtype {dtype} is not supported; use torch.float32, torch.float16 or torch.bfloat16")
    return dtype
