"""The numba conditioner against hand-computed values (the coded textures of test_conditioning) and against
`build_condition` on the demo's head.

Tolerance: depth, coordinates, normals and the background exactly as the reference (the same float32 formulas);
texture features within FEATURE_ATOL of the reference for N(0, 1) texels (the bilinear position is computed without
grid_sample's grid normalisation: float32 rounding of the position, times the texture's slope).
"""

import pytest
import torch

from engine.backends import ReferenceConditioner, default_conditioner, make_conditioner
from engine.condition_numba import NumbaConditioner
from engine.conditioning import NeuralTextures, build_condition
from engine.config import ConditioningConfig
from engine.errors import ConfigError, InputError
from engine.geometry import Camera
from engine.heads import load_head_model
from engine.raster import rasterize
from test_conditioning import _coded_textures, _raster, centre

FEATURE_ATOL = 1e-4


def test_coded_textures_every_group_and_background():
    tex, cfg = _coded_textures(dims=5, channels=2)
    raster, cells = _raster(cfg)
    cond = NumbaConditioner(tex, cfg)(raster)
    assert cond.shape == (1, cfg.channels, 2, 2) and cond.dtype == torch.float32
    assert cond.permute(0, 2, 3, 1).is_contiguous()  # channels-last
    for (y, x), (ix, iy, iz, a0, a1) in cells.items():
        want = [raster.depth[0, y, x, 0].item() - 1] + [2 * centre(i) - 1 for i in (ix, iy, iz)]
        want += raster.normals[0, y, x].tolist() + [2 * centre(a0) - 1, 2 * centre(a1) - 1]
        for k, (u, v) in enumerate(((ix, iy), (ix, iz), (iy, iz))):
            want += [100 * k + 10 * v + u, 1000 + 100 * k + 10 * v + u]
        want += [300 + 10 * a1 + a0, 1300 + 10 * a1 + a0]
        torch.testing.assert_close(cond[0, :, y, x], torch.tensor(want), atol=1e-3, rtol=0)
    torch.testing.assert_close(cond[0, :, 1, 1], torch.tensor([-1.0] * 4 + [0.0] * 3 + [-1.0] * 2 + [0.0] * 8))


def test_wraps_across_the_border():
    # halfway between the last and the first texel column of plane (x,y): the mean of columns R-1 and 0
    tex, cfg = _coded_textures(dims=3, channels=1)
    lo, hi = cfg.canonical_min, cfg.canonical_max
    u = 1.0  # normalised: frac 0, i.e. position -0.5 texels: between column R-1 and column 0
    canonical = torch.tensor([lo[0] + u * (hi[0] - lo[0]), lo[1] + centre(2) * (hi[1] - lo[1]), lo[2]])
    one = torch.ones(1, 1, 1, 1)
    raster = type("R", (), dict(mask=one, depth=one, canonical=canonical.reshape(1, 1, 1, 3),
                                normals=torch.zeros(1, 1, 1, 3)))
    cond = NumbaConditioner(tex, cfg)(raster)
    assert abs(cond[0, 7, 0, 0].item() - (10 * 2 + (0 + 3) / 2)) < 1e-3  # row 2, columns 3 and 0


@pytest.fixture(scope="module")
def head_raster():
    mesh = load_head_model("synthetic").posed_mesh(torch.full((8,), 0.3))
    cam = Camera.look_at(eye=(0.36, 0.1, 0.93), width=128, height=128, fx=455.4)
    return rasterize(mesh, cam, backend="torch")


@pytest.mark.parametrize("dims", [5, 3])
def test_demo_head_matches_build_condition(head_raster, dims):
    cfg = ConditioningConfig(canonical_dims=dims, texture_resolution=128, texture_channels=16)
    tex = NeuralTextures(cfg, generator=torch.Generator().manual_seed(4))
    raster = head_raster if dims == 5 else type(head_raster)(head_raster.mask, head_raster.depth,
                                                             head_raster.canonical[..., :3], head_raster.normals)
    with torch.no_grad():
        ref = build_condition(raster, tex, cfg)
    conditioner = NumbaConditioner(tex, cfg)
    nchw = torch.full_like(ref, float("nan"))
    for cond in (conditioner(raster), conditioner(raster, out=nchw)):
        first = 9 if dims == 5 else 7
        torch.testing.assert_close(cond[:, :first], ref[:, :first], atol=1e-6, rtol=0)
        torch.testing.assert_close(cond[:, first:], ref[:, first:], atol=FEATURE_ATOL, rtol=0)
    assert (raster.mask < 0.5).any() and (raster.mask > 0.5).sum() > 3000


def test_registry_default_and_errors(head_raster):
    cfg = ConditioningConfig(canonical_dims=5, texture_resolution=128, texture_channels=16)
    tex = NeuralTextures(cfg)
    assert default_conditioner("cpu") == "numba" and default_conditioner("cuda") == "torch"
    assert isinstance(make_conditioner("auto", tex, cfg, "cpu"), NumbaConditioner)
    assert isinstance(make_conditioner("torch", tex, cfg, "cpu"), ReferenceConditioner)
    with pytest.raises(ConfigError, match="numba"):
        make_conditioner("opencl", tex, cfg, "cpu")
    with pytest.raises(InputError, match="float32 CPU tensor"):
        NumbaConditioner(tex, cfg)(head_raster, out=torch.empty(1, 73, 128, 128, dtype=torch.float16))
