"""Backends: interchangeable implementations of a frame's condition -> denoise -> decode stages.

A backend is chosen by name. The `reference` backend (in `engine.renderer`) is the specification; fast paths live
in their own modules and are imported only when chosen, so the reference path never imports them.

Every backend has the reference's interface (see `engine.renderer.ReferenceBackend`):
    condition(raster: RasterBuffers) -> [B, C, H, W]       the ControlNet input
    denoise(condition, tokens [B, T, D]) -> [B, c, h, w]  the final latent, from the renderer's fixed noise
    decode(latent) -> [B, 3, H, W] float in [-1, 1]
    pixels(image) -> [B, H, W, 3] uint8
"""

from __future__ import annotations

import importlib

import torch

from ..errors import ConfigError

# name -> "module:Class"; imported lazily.
_BACKENDS: dict[str, str] = {
    "reference": "engine.renderer:ReferenceBackend",
    "compiled": "engine.backends.compiled:CompiledBackend",
}


def register_backend(name: str, target: str) -> None:
    """Make `Renderer(backend=name)` build `target` ("package.module:Class")."""
    _BACKENDS[name] = target


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def default_backend(device) -> str:
    """`compiled` on CUDA (the fast path), `reference` elsewhere."""
    return "compiled" if torch.device(device).type == "cuda" else "reference"


def backend_class(name: str):
    """The class registered under `name`; an unknown name is a ConfigError listing the choices."""
    if name not in _BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose one of {backend_names()}")
    module, _, cls = _BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)
