"""Fused CUDA kernels (`.cu` sources beside this file) with a run-time loader and torch fallbacks.

Each kernel has a torch twin in the module it speeds up; see `kernels.ops`. The `.cu` files are plain CUDA
C++ without includes, compiled at run time by NVRTC (`kernels.loader`) and checked with `nvcc -c` in CI.
"""

from .ops import PackedTextures, available, build_condition_fused, pack_textures, preload, to_pixels_fused

__all__ = ["PackedTextures", "available", "build_condition_fused", "pack_textures", "preload", "to_pixels_fused"]
