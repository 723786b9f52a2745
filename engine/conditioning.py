"""The conditioning image: neural textures and the ControlNet's input tensor (model.md, "One frame", steps 3-4).

`build_condition` is the plain reference every fused kernel is tested against: it does exactly what
model.md's channel table says, in that order, with no shortcuts.

Texture storage: a texture is `[C, R, R]` with texel (row v, column u), i.e. `tex[:, v, u]`; the first
coordinate of a pair addresses the column, the second the row (model.md: "u selecting the column, v the
row"). Texel `i` has its centre at `(i + 0.5) / R`; addressing wraps, so 0 and 1 are the same place.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConditioningConfig
from .errors import CheckpointError, InputError

# The release stores the three planes as `neural_texture_lookup_{uv,uw,vw}` (canonical x=u, y=v, z=w),
# in the order of `NeuralTextures.planes`: (x,y), (x,z), (y,z).
RELEASE_PLANE_NAMES = ("uv", "uw", "vw")

# Coordinate index pairs (first = column u, second = row v) of the three planes.
_PLANE_PAIRS = ((0, 1), (0, 2), (1, 2))


class NeuralTextures(nn.Module):
    """The learnable feature planes of one avatar.

    `planes`: Parameter `[3, C, R, R]` float32, planes for the canonical pairs (x,y), (x,z), (y,z).
    `ambient`: Parameter `[C, R, R]` float32 addressed by the 2 ambient coordinates, or None when
    `config.canonical_dims == 3`. Both are initialised N(0, 1) like the release (`generator` seeds them).
    """

    def __init__(self, config: ConditioningConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        c, r = config.texture_channels, config.texture_resolution
        self.planes = nn.Parameter(torch.randn(3, c, r, r, generator=generator))
        if config.has_ambient:
            self.ambient = nn.Parameter(torch.randn(c, r, r, generator=generator))
        else:
            self.register_parameter("ambient", None)

    @property
    def channels(self) -> int:
        """Feature channels a lookup returns: 3 C, plus C with the ambient map."""
        return self.planes.shape[1] * (4 if self.ambient is not None else 3)

    def lookup(self, coords01: torch.Tensor) -> torch.Tensor:
        """`texture_lookup` on these textures."""
        return texture_lookup(self.planes, self.ambient, coords01)


class PackedTextures(NamedTuple):
    """Neural-texture tensors without the module: `planes` `[3, C, R, R]` and `ambient` `[C, R, R]` or None, one
    dtype and device, any strides. `build_condition` reads them like `NeuralTextures`. From `pack_textures`
    they are in the fused conditioning kernel's fastest storage: channels-last strides, a texel's C features
    adjacent in memory (`ambient` is `[R, R, C]` in memory).
    """

    planes: torch.Tensor
    ambient: torch.Tensor | None

    def lookup(self, coords01: torch.Tensor) -> torch.Tensor:
        """`texture_lookup` on these textures."""
        return texture_lookup(self.planes, self.ambient, coords01)


# The texel dtypes the fused conditioning kernel reads (kernels/condition.cu's DTYPE_* values).
PACKED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def pack_textures(textures: NeuralTextures | PackedTextures, dtype: torch.dtype = torch.float16) -> PackedTextures:
    """A copy of `textures` (`planes` `[3, C, R, R]`, `ambient` `[C, R, R]` or None) in `dtype` (one of
    `PACKED_DTYPES`) with each texel's features adjacent in memory: a bilinear tap of the fused kernel then reads
    one 32-byte sector (C = 16, half) instead of C scattered values. Build once per avatar, not per frame.
    Detached, on the input's device."""
    if dtype not in PACKED_DTYPES:
        raise InputError(f"textures can be packed as {', '.join(map(str, PACKED_DTYPES))}, not {dtype}")
    planes = textures.planes.detach().to(dtype).contiguous(memory_format=torch.channels_last)
    ambient = textures.ambient
    if ambient is not None:
        ambient = ambient.detach().to(dtype).permute(1, 2, 0).contiguous().permute(2, 0, 1)
    return PackedTextures(planes, ambient)


def texture_lookup(planes: torch.Tensor, ambient: torch.Tensor | None, coords01: torch.Tensor) -> torch.Tensor:
    """Bilinear, wrapping texture lookup.

    planes: `[3, C, R, R]` for the canonical pairs (x,y), (x,z), (y,z); ambient: `[C, R, R]` or None; same
    dtype and device, any strides.
    coords01: `[B, H, W, D]` float, canonical xyz (+ 2 ambient when D = 5, which needs `ambient`) normalised so
    that [0, 1] spans the texture once; values outside wrap around (only the fractional part matters).
    Returns `[B, H, W, 3C]` (or `[B, H, W, 4C]` with the ambient map) in the textures' dtype and device:
    the (x,y), (x,z), (y,z) plane features concatenated, then the ambient-map features.
    """
    want = 5 if ambient is not None else 3
    if coords01.dim() != 4 or coords01.shape[-1] != want:
        raise InputError(
            f"texture lookup needs coordinates [B, H, W, {want}], got {tuple(coords01.shape)}; pass "
            f"{'canonical xyz + 2 ambient' if want == 5 else 'canonical xyz'} normalised to [0, 1]"
        )
    b, h, w, _ = coords01.shape
    coords01 = coords01.to(planes.dtype)
    pairs = torch.stack([coords01[..., [i, j]] for i, j in _PLANE_PAIRS])  # [3, B, H, W, 2]
    feats = _sample_wrap(planes, pairs.reshape(3, b * h, w, 2))  # [3, C, B*H, W]
    feats = feats.reshape(3, -1, b, h, w).permute(2, 3, 4, 0, 1).reshape(b, h, w, -1)
    if ambient is None:
        return feats
    amb = _sample_wrap(ambient[None], coords01[..., 3:5].reshape(1, b * h, w, 2))  # [1, C, B*H, W]
    amb = amb.reshape(-1, b, h, w).permute(1, 2, 3, 0)
    return torch.cat([feats, amb], dim=-1)


def _sample_wrap(textures: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear wrap-addressed sampling of N textures `[N, C, R, R]` at `uv` `[N, Ho, Wo, 2]` -> `[N, C, Ho, Wo]`.

    Texel centres at (i + 0.5) / R as with grid_sample(align_corners=False). Wrapping is done by padding
    the texture circularly by one texel and sampling the padded copy at the equivalent position: frac(u)
    in [0, 1] lands at padded pixel frac(u) * R + 0.5, which lies inside [0.5, R + 0.5], so the bilinear
    footprint never leaves the padded texture and the result is exactly the wrapped one.
    """
    r = textures.shape[-1]
    padded = F.pad(textures, (1, 1, 1, 1), mode="circular")  # [N, C, R+2, R+2]
    frac = uv - torch.floor(uv)
    # grid_sample(align_corners=False) maps grid g to pixel ((g + 1) * size - 1) / 2; solve for g.
    grid = (2 * (frac * r + 0.5) + 1) / (r + 2) - 1
    return F.grid_sample(padded, grid, mode="bilinear", padding_mode="border", align_corners=False)


def texture_from_release_row(row: torch.Tensor, resolution: int, channels: int) -> torch.Tensor:
    """One person's row of a release embedding table `[R*R*C]` -> a texture `[C, R, R]` (same dtype).

    The release reshapes each row to R x R x C = (row v, column u, channel).
    """
    if row.dim() != 1 or row.numel() != resolution * resolution * channels:
        raise CheckpointError(
            f"a release texture row must have {resolution}*{resolution}*{channels} = "
            f"{resolution * resolution * channels} values, got shape {tuple(row.shape)}; check the texture "
            "resolution and channel count of the avatar config against the checkpoint"
        )
    return row.reshape(resolution, resolution, channels).permute(2, 0, 1).contiguous()


def texture_to_release_row(texture: torch.Tensor) -> torch.Tensor:
    """A texture `[C, R, R]` -> the release's row layout `[R*R*C]` (inverse of `texture_from_release_row`)."""
    if texture.dim() != 3 or texture.shape[1] != texture.shape[2]:
        raise InputError(f"a texture must be [C, R, R], got shape {tuple(texture.shape)}")
    return texture.permute(1, 2, 0).reshape(-1).contiguous()


def coordinate_range(config: ConditioningConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation box of the D = config.canonical_dims raster coordinates as (min, max), D floats each:
    canonical_min/max for xyz, then ambient_min/max for the 2 ambient values (D = 5)."""
    if not config.has_ambient:
        return tuple(config.canonical_min), tuple(config.canonical_max)
    return (*config.canonical_min, *config.ambient_min), (*config.canonical_max, *config.ambient_max)


def normalized_coordinates(canonical: torch.Tensor, config: ConditioningConfig) -> torch.Tensor:
    """Min-max normalise raster coordinates `[B, H, W, D]` to [0, 1] (not clamped) over `coordinate_range`.
    Same shape, dtype, device."""
    lo, hi = coordinate_range(config)
    lo_t = torch.tensor(lo, dtype=canonical.dtype, device=canonical.device)
    hi_t = torch.tensor(hi, dtype=canonical.dtype, device=canonical.device)
    return (canonical - lo_t) / (hi_t - lo_t)


def build_condition(raster, textures: NeuralTextures | PackedTextures, config: ConditioningConfig) -> torch.Tensor:
    """The ControlNet's conditioning image, exactly model.md's channel table.

    raster: any object with NHWC float32 tensors `mask` `[B, H, W, 1]` (1 covered, 0 not), `depth`
    `[B, H, W, 1]` (clip-space z), `canonical` `[B, H, W, D]` (D = config.canonical_dims) and `normals`
    `[B, H, W, 3]` (e.g. `engine.raster.RasterBuffers`).
    textures: `NeuralTextures` or `PackedTextures` from the same config, on the raster's device; the lookup runs
    in their dtype.
    Returns `[B, config.channels, H, W]` float32 NCHW on the raster's device, channels in
    `config.channel_layout()` order: depth, canonical xyz, normals, [ambient 2], plane features (x,y),
    (x,z), (y,z), [ambient-map features]. Off the head: -1 for depth, canonical and ambient, 0 otherwise.
    """
    mask, depth, canonical, normals = _check_raster(raster, config)
    _check_textures(textures, config, mask.device)
    covered = mask > 0.5

    coords01 = normalized_coordinates(canonical, config)
    depth_n = depth / config.depth_max * 2 - 1
    coords_n = coords01 * 2 - 1
    features = textures.lookup(coords01).to(canonical.dtype)

    neg_one = torch.tensor(-1.0, dtype=canonical.dtype, device=canonical.device)
    zero = torch.tensor(0.0, dtype=canonical.dtype, device=canonical.device)
    groups = [
        torch.where(covered, depth_n, neg_one),
        torch.where(covered, coords_n[..., :3], neg_one),
        torch.where(covered, normals, zero),
    ]
    if config.has_ambient:
        groups.append(torch.where(covered, coords_n[..., 3:5], neg_one))
    groups.append(torch.where(covered, features, zero))
    return torch.cat(groups, dim=-1).permute(0, 3, 1, 2).contiguous()


def _check_raster(raster, config: ConditioningConfig) -> tuple[torch.Tensor, ...]:
    tensors = []
    for name in ("mask", "depth", "canonical", "normals"):
        t = getattr(raster, name, None)
        if not isinstance(t, torch.Tensor):
            raise InputError(f"the raster buffers have no tensor `{name}`; pass engine.raster.RasterBuffers")
        if t.dim() != 4:
            raise InputError(f"raster `{name}` must be NHWC [B, H, W, C], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise InputError(f"raster `{name}` must be a float tensor, got {t.dtype}; convert it with .float()")
        tensors.append(t)
    mask, depth, canonical, normals = tensors
    b, h, w = mask.shape[:3]
    want = {"mask": 1, "depth": 1, "canonical": config.canonical_dims, "normals": 3}
    for name, t in zip(want, tensors):
        if tuple(t.shape) != (b, h, w, want[name]):
            hint = (
                " (the avatar's conditioning expects canonical_dims="
                f"{config.canonical_dims}: xyz{' + 2 ambient' if config.has_ambient else ''}; rasterise a head "
                "with matching canonical coordinates or use a matching config)"
                if name == "canonical"
                else ""
            )
            raise InputError(f"raster `{name}` must be [{b}, {h}, {w}, {want[name]}], got {tuple(t.shape)}{hint}")
        if t.device != mask.device:
            raise InputError(f"raster `{name}` is on {t.device} but `mask` on {mask.device}; move them together")
    return mask, depth, canonical, normals


def _check_textures(
    textures: NeuralTextures | PackedTextures, config: ConditioningConfig, device: torch.device
) -> None:
    if textures.planes.device != device:
        raise InputError(
            f"neural textures are on {textures.planes.device}, the raster on {device}; move them with .to(device)"
        )
    if textures.planes.shape[:2] != (3, config.texture_channels):
        raise InputError(
            f"neural textures have planes {tuple(textures.planes.shape)}, the config wants "
            f"[3, {config.texture_channels}, R, R]; build the textures from the same ConditioningConfig"
        )
    if (textures.ambient is not None) != config.has_ambient:
        raise InputError(
            f"neural textures {'have' if textures.ambient is not None else 'lack'} an ambient map but the config "
            f"has canonical_dims={config.canonical_dims}; build the textures from the same ConditioningConfig"
        )
