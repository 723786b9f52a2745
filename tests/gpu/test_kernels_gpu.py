"""Fused CUDA kernels against their torch twins on a GPU: parity on random inputs, layouts, texture dtypes,
and replay inside a CUDA graph. Skipped without CUDA. The kernels run through the engine-side ops
(`engine.fused`), which must launch them on CUDA tensors: a fallback to the twin there warns, and the warning is an
error here; `test_engine_ops_launch_the_kernels` checks the dispatch and the layout numbers directly.

Tolerance for the conditioning image: the kernel rounds its float32 result to half once; the reference is
computed in float32 (on the same GPU) and rounded to half too, so they differ by float32 rounding noise
(wrap addressing is computed differently) that can flip one half rounding: |got - ref| <= 2e-3 + 1e-3 |ref|.
Everything off the mesh must match exactly. to_pixels must be bit-exact (it computes in float32 like the
twin, which upcasts first).
"""

from types import SimpleNamespace

import pytest
import torch

import kernels
from engine.conditioning import NeuralTextures, PackedTextures, build_condition, pack_textures
from engine.config import ConditioningConfig
from engine.frame import to_pixels
from engine.fused import build_condition_fused, to_pixels_fused
from kernels import available, preload

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        torch.cuda.is_available() and not available(),
        reason="cuda-python or NVRTC missing: pip install 'diffusion-avatars-engine[cuda]'",
    ),
    # engine.fused's warning when it runs a twin on CUDA: these tests must run the kernels.
    pytest.mark.filterwarnings("error:fused CUDA kernels unavailable"),
]

DEVICE = "cuda"
ATOL, RTOL = 2e-3, 1e-3


def _raster(cfg: ConditioningConfig, b: int, h: int, w: int, g: torch.Generator) -> SimpleNamespace:
    """Random buffers: soft mask values (the 0.5 threshold is exercised), canonical coordinates spanning 10 %
    beyond the normalisation box on each side (wrapping is exercised), random unit normals."""
    dims = cfg.canonical_dims
    lo = torch.tensor(cfg.canonical_min + (cfg.ambient_min if dims == 5 else ()))
    hi = torch.tensor(cfg.canonical_max + (cfg.ambient_max if dims == 5 else ()))
    span = hi - lo
    normals = torch.randn(b, h, w, 3, generator=g)
    cpu = SimpleNamespace(
        mask=torch.rand(b, h, w, 1, generator=g),
        depth=torch.rand(b, h, w, 1, generator=g) * cfg.depth_max,
        canonical=lo - 0.1 * span + 1.2 * span * torch.rand(b, h, w, dims, generator=g),
        normals=normals / normals.norm(dim=-1, keepdim=True),
    )
    return SimpleNamespace(**{k: v.to(DEVICE) for k, v in vars(cpu).items()})


def _textures(cfg: ConditioningConfig, g: torch.Generator) -> NeuralTextures:
    return NeuralTextures(cfg, generator=g).to(DEVICE)


def _reference(raster, textures, cfg) -> torch.Tensor:
    """The twin in float32 on the GPU, on float32 copies of the texels the kernel reads."""
    if textures.planes.dtype != torch.float32:
        ambient = None if textures.ambient is None else textures.ambient.float()
        textures = PackedTextures(textures.planes.float(), ambient)
    with torch.no_grad():
        return build_condition(raster, textures, cfg)


def _assert_close(got: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> None:
    assert got.dtype == torch.float16
    assert not torch.isnan(got).any(), "some outputs were never written"
    err = (got.float() - ref).abs()
    bound = ATOL + RTOL * ref.abs()
    worst = (err - bound).max().item()
    assert worst <= 0, f"max |err| {err.max().item():.3g} exceeds the half tolerance by {worst:.3g}"
    off = (mask[..., 0] <= 0.5)[:, None].expand_as(ref)
    assert torch.equal(got.float()[off], ref.half().float()[off]), "off-mesh values differ"


@pytest.mark.parametrize("dims", [5, 3])
@pytest.mark.parametrize("res", [64, 37])
@pytest.mark.parametrize("channels_last", [True, False])
def test_condition_matches_reference(dims, res, channels_last):
    g = torch.Generator().manual_seed(dims * 1000 + res)
    cfg = ConditioningConfig(canonical_dims=dims, texture_resolution=res, texture_channels=16)
    raster, tex = _raster(cfg, 2, 48, 40, g), _textures(cfg, g)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.full((2, cfg.channels, 48, 40), float("nan"), dtype=torch.float16, device=DEVICE)
    out = out.contiguous(memory_format=fmt)
    got = build_condition_fused(raster, tex, cfg, out=out, channels_last=channels_last)
    torch.cuda.synchronize()
    assert got is out and got.is_contiguous(memory_format=fmt)
    _assert_close(got, _reference(raster, tex, cfg), raster.mask)
    fresh = build_condition_fused(raster, tex, cfg, channels_last=channels_last)
    assert fresh.is_contiguous(memory_format=fmt) and torch.equal(fresh, got)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_condition_packed_textures(dtype):
    g = torch.Generator().manual_seed(7)
    cfg = ConditioningConfig(canonical_dims=5, texture_resolution=48, texture_channels=16)
    raster, tex = _raster(cfg, 2, 32, 32, g), pack_textures(_textures(cfg, g), dtype)
    got = build_condition_fused(raster, tex, cfg)
    torch.cuda.synchronize()
    _assert_close(got, _reference(raster, tex, cfg), raster.mask)
    # Plain (planar) half textures take the same values through other strides.
    planar = PackedTextures(tex.planes.contiguous(), tex.ambient.contiguous())
    assert torch.equal(build_condition_fused(raster, planar, cfg), got)


def test_condition_full_size():
    """The shipped sizes: 512 x 512 image, 512 x 512 x 16 textures, 73 channels."""
    g = torch.Generator().manual_seed(3)
    cfg = ConditioningConfig()
    raster, tex = _raster(cfg, 1, 512, 512, g), _textures(cfg, g)
    got = build_condition_fused(raster, pack_textures(tex), cfg)
    torch.cuda.synchronize()
    assert got.shape == (1, 73, 512, 512)
    _assert_close(got, _reference(raster, pack_textures(tex), cfg), raster.mask)


def test_condition_on_a_side_stream():
    g = torch.Generator().manual_seed(11)
    cfg = ConditioningConfig(canonical_dims=5, texture_resolution=32, texture_channels=16)
    raster, tex = _raster(cfg, 2, 24, 24, g), _textures(cfg, g)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = build_condition_fused(raster, tex, cfg)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    _assert_close(got, _reference(raster, tex, cfg), raster.mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pixels_bit_exact(dtype):
    g = torch.Generator().manual_seed(5)
    image = torch.rand(2, 3, 67, 45, generator=g) * 2.4 - 1.2
    # Values on rounding ties and at the clamp edges.
    ties = ((torch.arange(256) + 0.5) / 255 - 0.5) * 2
    image.view(-1)[: ties.numel()] = ties
    image.view(-1)[-4:] = torch.tensor([-1.0, 1.0, 0.0, -0.0])
    image = image.to(DEVICE, dtype)
    got = to_pixels_fused(image)
    torch.cuda.synchronize()
    assert got.shape == (2, 67, 45, 3) and got.is_contiguous()
    assert torch.equal(got, to_pixels(image))
    assert torch.equal(got.cpu(), to_pixels(image.cpu()))


def test_graph_capture_replays_with_new_inputs():
    g = torch.Generator().manual_seed(13)
    cfg = ConditioningConfig(canonical_dims=5, texture_resolution=40, texture_channels=16)
    tex = pack_textures(_textures(cfg, g))
    static = _raster(cfg, 2, 32, 32, g)
    out = torch.empty(2, cfg.channels, 32, 32, dtype=torch.float16, device=DEVICE)
    out = out.contiguous(memory_format=torch.channels_last)
    image = torch.rand(1, 3, 16, 16, generator=g, device="cpu").to(DEVICE) * 2 - 1
    pixels = torch.empty(1, 16, 16, 3, dtype=torch.uint8, device=DEVICE)
    preload()
    # Warm up on a side stream, as torch.cuda.graph's documentation asks.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            build_condition_fused(static, tex, cfg, out=out)
            to_pixels_fused(image, out=pixels)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        build_condition_fused(static, tex, cfg, out=out)
        to_pixels_fused(image, out=pixels)
    for seed in (21, 22):
        fresh = _raster(cfg, 2, 32, 32, torch.Generator().manual_seed(seed))
        for name in ("mask", "depth", "canonical", "normals"):
            getattr(static, name).copy_(getattr(fresh, name))
        image.copy_(torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(seed)).to(DEVICE) * 2 - 1)
        out.fill_(float("nan"))
        pixels.zero_()
        graph.replay()
        torch.cuda.synchronize()
        _assert_close(out, _reference(fresh, tex, cfg), fresh.mask)
        assert torch.equal(pixels, to_pixels(image))


def test_engine_ops_launch_the_kernels(monkeypatch):
    """On CUDA tensors engine.fused calls the kernels (not the twins) with the config's layout numbers."""
    g = torch.Generator().manual_seed(17)
    cfg = ConditioningConfig(canonical_dims=5, texture_resolution=32, texture_channels=16)
    raster, tex = _raster(cfg, 1, 24, 24, g), pack_textures(_textures(cfg, g))
    image = (torch.rand(1, 3, 8, 8, generator=g) * 2 - 1).to(DEVICE)
    calls = []

    def spy(name):
        real = getattr(kernels, name)
        return lambda *args, **kwargs: calls.append(name) or real(*args, **kwargs)

    for name in ("fused_condition", "fused_pixels"):
        monkeypatch.setattr(kernels, name, spy(name))
    got = build_condition_fused(raster, tex, cfg)
    pixels = to_pixels_fused(image)
    assert calls == ["fused_condition", "fused_pixels"]
    direct = kernels.fused_condition(
        raster.mask, raster.depth, raster.canonical, raster.normals, tex.planes, tex.ambient,
        canonical_dims=5, texture_channels=16, texture_resolution=32, depth_max=cfg.depth_max,
        coord_min=cfg.canonical_min + cfg.ambient_min, coord_max=cfg.canonical_max + cfg.ambient_max,
    )  # fmt: skip
    torch.cuda.synchronize()
    assert torch.equal(got, direct) and torch.equal(pixels, kernels.fused_pixels(image))
