"""Fused CUDA kernels (`.cu` sources beside this file) with a run-time loader and their entry points.

The entry points (`kernels.ops`) take tensors and layout numbers only and run on CUDA tensors; this package
imports nothing from `engine` but `engine.errors`. Each kernel's torch twin lives in the module it speeds up
(`engine.conditioning.build_condition`, `engine.frame.to_pixels`), and `engine.fused` picks the kernel or the
twin for the engine's types. The `.cu` files are plain CUDA C++ without includes, compiled at run time by NVRTC
(`kernels.loader`) and checked with `nvcc -c` where the CUDA toolkit is installed.
"""

from .ops import available, check_condition_args, check_pixels_args, fused_condition, fused_pixels, preload

__all__ = ["available", "check_condition_args", "check_pixels_args", "fused_condition", "fused_pixels", "preload"]
