"""The conditioning image on the CPU as one compiled loop (numba): `engine.conditioning.build_condition`'s result,
written straight into its output, in any memory layout (channels-last by default), with no temporaries.

Why: the reference builds the image from whole-image tensors (normalised coordinates, four `grid_sample` lookups
over every pixel including the background, `torch.where` per channel group, a concatenation, a permute and a copy):
6-7 ms at the demo's 128 px on one core. Here one pass over the pixels writes each pixel's 73 values once, and
only covered pixels look their features up (its time: `benchmarks/results/demo-cpu-stages.md`, "condition").

Values: the reference's formulas in float32 (min-max normalised coordinates, depth / depth_max * 2 - 1, bilinear
wrap-addressed texels with centres at (i + 0.5) / R); the bilinear position is computed directly rather than through
`grid_sample`'s grid normalisation, so features agree to float32 rounding of the position (tests/test_condition_numba.py
states the tolerance). `NumbaConditioner` packs an avatar's texels once (float32, each texel's channels adjacent).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .conditioning import PackedTextures, _check_raster, _check_textures, coordinate_range
from .config import ConditioningConfig
from .errors import BackendError, InputError

try:
    import numba
    from numba import prange
except ImportError:  # said when the conditioner is chosen
    numba, prange = None, range


def _kernel(mask, depth, canonical, normals, texels, lo, span, depth_max, out):
    """mask, depth [B, H, W]; canonical [B, H, W, D]; normals [B, H, W, 3]; texels [P, R, R, C] (the 3 planes, then
    the ambient map when D = 5); lo, span [D]; all float32 -> out [B, H, W, Ctot] (any strides)."""
    one, two, half = np.float32(1), np.float32(2), np.float32(0.5)
    n_maps, res, _, channels = texels.shape
    dims = canonical.shape[3]
    has_ambient = dims == 5
    r = np.float32(res)
    u_of = np.array((0, 0, 1, 3))  # the coordinate pair each map is looked up by: xy, xz, yz, ambient
    v_of = np.array((1, 2, 2, 4))
    first_feature = 7 + (2 if has_ambient else 0)
    height = mask.shape[1]
    for row in prange(mask.shape[0] * height):  # rows split over the threads (torch's count, set per call)
        b, y = row // height, row % height
        coords = np.empty(dims, dtype=np.float32)
        for x in range(mask.shape[2]):
            px = out[b, y, x]
            if not mask[b, y, x] > half:
                px[:] = 0
                px[0:4] = -one
                if has_ambient:
                    px[7:9] = -one
                continue
            px[0] = depth[b, y, x] / depth_max * two - one
            for k in range(dims):
                coords[k] = (canonical[b, y, x, k] - lo[k]) / span[k]
            for k in range(3):
                px[1 + k] = coords[k] * two - one
                px[4 + k] = normals[b, y, x, k]
            if has_ambient:
                px[7] = coords[3] * two - one
                px[8] = coords[4] * two - one
            for p in range(n_maps):
                tex = texels[p]
                u, v = coords[u_of[p]], coords[v_of[p]]
                # texel centres at (i + 0.5) / R, wrapping: position frac(u) * R - 0.5 between columns i0, i0 + 1
                fx = (u - math.floor(u)) * r - half
                fy = (v - math.floor(v)) * r - half
                x0, y0 = math.floor(fx), math.floor(fy)
                wx, wy = np.float32(fx - x0), np.float32(fy - y0)
                c0, c1 = int(x0) % res, (int(x0) + 1) % res
                r0, r1 = int(y0) % res, (int(y0) + 1) % res
                w00, w01 = (one - wx) * (one - wy), wx * (one - wy)
                w10, w11 = (one - wx) * wy, wx * wy
                base = first_feature + p * channels
                for ch in range(channels):
                    px[base + ch] = (w00 * tex[r0, c0, ch] + w01 * tex[r0, c1, ch]
                                     + w10 * tex[r1, c0, ch] + w11 * tex[r1, c1, ch])


_compiled = None


def _compiled_kernel():
    global _compiled
    if _compiled is None:
        if numba is None:
            raise BackendError("the numba conditioner needs numba: pip install numba (a wheel); or use 'torch'")
        _compiled = numba.njit(cache=True, nogil=True, parallel=True, error_model="numpy")(_kernel)
    return _compiled


class NumbaConditioner:
    """`build_condition` for one avatar's textures on the CPU: the texels packed once (float32, each texel's channels
    adjacent, the ambient map after the three planes), then `conditioner(raster, out=None)` per frame.

    textures: `NeuralTextures` or `PackedTextures` of `config` (any dtype and device; copied to the CPU as float32).
    """

    def __init__(self, textures, config: ConditioningConfig):
        maps = [textures.planes.detach()] + ([textures.ambient.detach()[None]] if textures.ambient is not None else [])
        self.texels = torch.cat([m.to("cpu", torch.float32) for m in maps]).permute(0, 2, 3, 1).contiguous()
        self.planes_view = PackedTextures(self.texels[:3].permute(0, 3, 1, 2),
                                          self.texels[3].permute(2, 0, 1) if len(maps) == 2 else None)
        self.config = config
        lo, hi = coordinate_range(config)
        self.lo = np.asarray(lo, dtype=np.float32)
        self.span = (torch.tensor(hi, dtype=torch.float32) - torch.tensor(lo, dtype=torch.float32)).numpy()
        self.kernel = _compiled_kernel()

    def __call__(self, raster, out: torch.Tensor | None = None) -> torch.Tensor:
        """The conditioning image float32 `[B, config.channels, H, W]` of CPU raster buffers (`RasterBuffers`),
        channels in `config.channel_layout()` order. out: a float32 CPU tensor of that shape in any layout, written in
        place and returned; default: a new one with channels-last strides (memory `[B, H, W, C]`)."""
        config = self.config
        mask, depth, canonical, normals = _check_raster(raster, config)
        _check_textures(self.planes_view, config, mask.device)
        if mask.device.type != "cpu":
            raise BackendError(f"the numba conditioner runs on the CPU, the raster is on {mask.device}; use 'torch'")
        b, h, w, _ = mask.shape
        shape = (b, config.channels, h, w)
        if out is None:
            out = torch.empty(b, h, w, config.channels).permute(0, 3, 1, 2)
        elif tuple(out.shape) != shape or out.dtype != torch.float32 or out.device.type != "cpu":
            raise InputError(f"out must be a float32 CPU tensor {list(shape)}, got {out.dtype} {list(out.shape)} on "
                             f"{out.device}")
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        self.kernel(mask[..., 0].numpy(), depth[..., 0].numpy(), canonical.numpy(), normals.numpy(),
                    self.texels.numpy(), self.lo, self.span, np.float32(config.depth_max),
                    out.permute(0, 2, 3, 1).numpy())
        return out
