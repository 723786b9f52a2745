"""Neural textures and the conditioning image, checked against hand-computed values."""

from types import SimpleNamespace

import pytest
import torch

from engine.conditioning import (
    NeuralTextures,
    build_condition,
    normalized_coordinates,
    texture_from_release_row,
    texture_to_release_row,
)
from engine.config import ConditioningConfig
from engine.errors import CheckpointError, InputError

R = 4


def _coded_textures(dims: int = 5, channels: int = 2) -> tuple[NeuralTextures, ConditioningConfig]:
    """Textures whose texel (row v, column u) of plane k, channel c holds 100k + 10v + u + 1000c
    (ambient map: 300 + 10v + u + 1000c), so every value says where it came from."""
    cfg = ConditioningConfig(canonical_dims=dims, texture_resolution=R, texture_channels=channels)
    tex = NeuralTextures(cfg, generator=torch.Generator().manual_seed(0))
    v = torch.arange(R, dtype=torch.float32)[:, None]
    u = torch.arange(R, dtype=torch.float32)[None, :]
    c = torch.arange(channels, dtype=torch.float32)[:, None, None] * 1000
    with torch.no_grad():
        for k in range(3):
            tex.planes[k] = 100 * k + 10 * v + u + c
        if tex.ambient is not None:
            tex.ambient.copy_(300 + 10 * v + u + c)
    return tex, cfg


def _plane0(coords_uv) -> torch.Tensor:
    """Channel 0 of plane (x,y) looked up at the given (u, v) pairs (z and ambient at 0.5)."""
    tex, _ = _coded_textures(dims=3)
    pts = torch.tensor([[u, v, 0.5] for u, v in coords_uv], dtype=torch.float32)
    return tex.lookup(pts.reshape(1, 1, -1, 3))[0, 0, :, 0]


def centre(i: int) -> float:
    return (i + 0.5) / R


def test_init_shapes_seeded_and_normal():
    cfg = ConditioningConfig(canonical_dims=5, texture_resolution=32, texture_channels=16)
    a = NeuralTextures(cfg, generator=torch.Generator().manual_seed(3))
    b = NeuralTextures(cfg, generator=torch.Generator().manual_seed(3))
    assert a.planes.shape == (3, 16, 32, 32) and a.ambient.shape == (16, 32, 32)
    assert torch.equal(a.planes, b.planes) and torch.equal(a.ambient, b.ambient)
    assert abs(a.planes.mean().item()) < 0.05 and abs(a.planes.std().item() - 1) < 0.05
    assert a.channels == 64
    no_amb = NeuralTextures(ConditioningConfig(canonical_dims=3, texture_resolution=8))
    assert no_amb.ambient is None and no_amb.channels == 48
    assert [n for n, _ in no_amb.named_parameters()] == ["planes"]


def test_texel_centres_exact_u_column_v_row():
    pts = [(centre(i), centre(j)) for j in range(R) for i in range(R)]
    got = _plane0(pts)
    want = torch.tensor([10.0 * j + i for j in range(R) for i in range(R)])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_halfway_is_mean():
    got = _plane0([(2 / R, centre(1)), (centre(2), 3 / R), (2 / R, 3 / R)])
    # between columns 1 and 2 of row 1; between rows 2 and 3 of column 2; the 4 texels around (2, 3)
    want = torch.tensor([(11 + 12) / 2, (22 + 32) / 2, (21 + 22 + 31 + 32) / 4])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_wraps_across_the_border():
    row = 10.0 * 1  # row 1
    got = _plane0([(0.01, centre(1)), (0.99, centre(1)), (0.0, centre(1)), (1.0, centre(1)), (centre(1), 0.01)])
    # u = 0.01 sits at pixel 0.04 - 0.5 = -0.46: 0.54 of column 0, 0.46 of column R-1 (wrapped)
    # u = 0.99 sits at pixel 3.46: 0.54 of column 3, 0.46 of column 0 (wrapped)
    want = torch.tensor(
        [
            row + 0.54 * 0 + 0.46 * 3,
            row + 0.54 * 3 + 0.46 * 0,
            row + 1.5,  # the border itself: the mean of columns 0 and 3
            row + 1.5,
            1 + 0.54 * 0 + 0.46 * 30,  # v = 0.01 in column 1 mixes rows 0 and 3
        ]
    )
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # out-of-range coordinates wrap: only the fractional part matters
    shifted = _plane0([(0.3 + 1, 0.7 - 2), (0.3 - 1, 0.7 + 3)])
    torch.testing.assert_close(shifted, _plane0([(0.3, 0.7)] * 2), atol=1e-4, rtol=0)


def test_plane_order_pairs_and_ambient_map():
    tex, _ = _coded_textures(dims=5)
    # x at column 1, y at column 2, z at column 3; ambient (0, 3)
    pts = torch.tensor([centre(1), centre(2), centre(3), centre(0), centre(3)]).reshape(1, 1, 1, 5)
    got = tex.lookup(pts)[0, 0, 0]
    assert got.shape == (8,)
    # (x,y): u=1, v=2; (x,z): u=1, v=3; (y,z): u=2, v=3; ambient: u=0, v=3; 2 channels each
    want = torch.tensor([21, 1021, 131, 1131, 232, 1232, 330, 1330], dtype=torch.float32)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)


def test_lookup_rejects_wrong_coordinate_count():
    tex, _ = _coded_textures(dims=5)
    with pytest.raises(InputError, match=r"\[B, H, W, 5\]"):
        tex.lookup(torch.zeros(1, 2, 2, 3))


def test_release_row_round_trip_layout():
    c, r = 3, 2
    row = torch.arange(r * r * c, dtype=torch.float32)
    tex = texture_from_release_row(row, r, c)
    assert tex.shape == (c, r, r)
    # row-major R x R x C: element (v, u, ch) sits at (v * R + u) * C + ch
    assert tex[2, 1, 0].item() == (1 * r + 0) * c + 2
    assert tex[1, 0, 1].item() == (0 * r + 1) * c + 1
    assert torch.equal(texture_to_release_row(tex), row)
    with pytest.raises(CheckpointError, match="2\\*2\\*3 = 12"):
        texture_from_release_row(torch.zeros(13), r, c)


def _raster(cfg: ConditioningConfig):
    """A 2 x 2 raster: pixels (0,0), (0,1), (1,0) on the head, (1,1) background (all zero)."""
    # normalised coordinates at texel centres: (x, y, z, a0, a1) column indices per pixel
    cells = {(0, 0): (1, 2, 3, 0, 3), (0, 1): (3, 0, 1, 2, 2), (1, 0): (0, 3, 2, 1, 0)}
    lo = cfg.canonical_min + cfg.ambient_min
    hi = cfg.canonical_max + cfg.ambient_max
    d = cfg.canonical_dims
    canonical = torch.zeros(1, 2, 2, d)
    mask = torch.zeros(1, 2, 2, 1)
    depth = torch.zeros(1, 2, 2, 1)
    normals = torch.zeros(1, 2, 2, 3)
    for (y, x), idx in cells.items():
        for k in range(d):
            canonical[0, y, x, k] = lo[k] + centre(idx[k]) * (hi[k] - lo[k])
        mask[0, y, x] = 1
        depth[0, y, x] = 0.5 + y + 0.25 * x
        normals[0, y, x] = torch.nn.functional.normalize(torch.tensor([x - 0.5, y - 0.5, 1.0]), dim=0)
    return SimpleNamespace(mask=mask, depth=depth, canonical=canonical, normals=normals), cells


def test_full_condition_every_group_and_background():
    tex, cfg = _coded_textures(dims=5, channels=2)
    raster, cells = _raster(cfg)
    cond = build_condition(raster, tex, cfg)
    assert cond.shape == (1, 1 + 3 + 3 + 2 + 2 * 3 + 2, 2, 2) == (1, cfg.channels, 2, 2)
    assert cond.dtype == torch.float32
    for (y, x), (ix, iy, iz, a0, a1) in cells.items():
        px = cond[0, :, y, x]
        n = raster.normals[0, y, x]
        want = [raster.depth[0, y, x, 0].item() / 2 * 2 - 1]
        want += [2 * centre(i) - 1 for i in (ix, iy, iz)]
        want += n.tolist()
        want += [2 * centre(a0) - 1, 2 * centre(a1) - 1]
        for k, (u, v) in enumerate(((ix, iy), (ix, iz), (iy, iz))):
            want += [100 * k + 10 * v + u, 1000 + 100 * k + 10 * v + u]
        want += [300 + 10 * a1 + a0, 1300 + 10 * a1 + a0]
        torch.testing.assert_close(px, torch.tensor(want, dtype=torch.float32), atol=1e-3, rtol=0)
    bg = cond[0, :, 1, 1]
    torch.testing.assert_close(bg, torch.tensor([-1.0] * 4 + [0.0] * 3 + [-1.0] * 2 + [0.0] * 8))


def test_depth_and_coordinate_mapping_is_min_max():
    cfg = ConditioningConfig(canonical_dims=5, texture_resolution=R, texture_channels=1)
    tex = NeuralTextures(cfg)
    canonical = torch.tensor([-1.0, 1.0, 0.5, -0.2, 0.1]).reshape(1, 1, 1, 5)
    raster = SimpleNamespace(
        mask=torch.ones(1, 1, 1, 1),
        depth=torch.full((1, 1, 1, 1), 2.0),
        canonical=canonical,
        normals=torch.tensor([0.0, 0.0, -1.0]).reshape(1, 1, 1, 3),
    )
    cond = build_condition(raster, tex, cfg)[0, :9, 0, 0]
    torch.testing.assert_close(cond, torch.tensor([1.0, -1.0, 1.0, 1.0, 0.0, 0.0, -1.0, -1.0, 0.5]))
    torch.testing.assert_close(
        normalized_coordinates(canonical, cfg)[0, 0, 0], torch.tensor([0.0, 1.0, 1.0, 0.0, 0.75])
    )


def test_three_d_layout_gives_55_channels_in_order():
    cfg = ConditioningConfig(canonical_dims=3, texture_resolution=8, texture_channels=16)
    assert cfg.channels == 55
    tex = NeuralTextures(cfg, generator=torch.Generator().manual_seed(1))
    raster = SimpleNamespace(
        mask=torch.ones(2, 3, 5, 1),
        depth=torch.rand(2, 3, 5, 1) * 2,
        canonical=torch.rand(2, 3, 5, 3) - 0.5,
        normals=torch.nn.functional.normalize(torch.randn(2, 3, 5, 3), dim=-1),
    )
    cond = build_condition(raster, tex, cfg)
    assert cond.shape == (2, 55, 3, 5)
    feats = tex.lookup(normalized_coordinates(raster.canonical, cfg)).permute(0, 3, 1, 2)
    torch.testing.assert_close(cond[:, 7:], feats)
    torch.testing.assert_close(cond[:, 4:7], raster.normals.permute(0, 3, 1, 2))


def test_73_channels_for_the_release_layout():
    cfg = ConditioningConfig()
    assert cfg.channels == 73
    small = ConditioningConfig(texture_resolution=8)
    raster, _ = _raster(small)
    assert build_condition(raster, NeuralTextures(small), small).shape == (1, 73, 2, 2)


def test_rejects_mismatched_inputs():
    tex, cfg = _coded_textures(dims=5)
    raster, _ = _raster(ConditioningConfig(canonical_dims=3))
    with pytest.raises(InputError, match="canonical_dims=5"):
        build_condition(raster, tex, cfg)
    raster, _ = _raster(cfg)
    with pytest.raises(InputError, match="no tensor `normals`"):
        build_condition(SimpleNamespace(mask=raster.mask, depth=raster.depth, canonical=raster.canonical), tex, cfg)
    tex3, cfg3 = _coded_textures(dims=3)
    with pytest.raises(InputError, match="ambient map"):
        build_condition(raster, tex3, cfg)
    bad = SimpleNamespace(**{**vars(raster), "depth": torch.zeros(1, 2, 3, 1)})
    with pytest.raises(InputError, match="`depth` must be"):
        build_condition(bad, tex, cfg)


def test_gradients_reach_the_textures():
    tex, cfg = _coded_textures(dims=5)
    raster, _ = _raster(cfg)
    build_condition(raster, tex, cfg).sum().backward()
    assert tex.planes.grad is not None and tex.planes.grad.abs().sum() > 0
    # each covered pixel's weights sum to 1 per channel: 3 pixels x 2 channels x 3 planes
    torch.testing.assert_close(tex.planes.grad.sum(), torch.tensor(18.0))
    torch.testing.assert_close(tex.ambient.grad.sum(), torch.tensor(6.0))
