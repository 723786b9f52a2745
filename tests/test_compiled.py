"""The compiled backend, the stream pipeline and the GPU benchmark's CPU paths (no CUDA needed).

On the CPU the compiled backend runs its hoisted code eagerly (no CUDA graph): in float32 it must reproduce the
reference; graphs=True on a CPU device is a BackendError. The pipeline's scheduling runs with no-op streams.
"""

import argparse
import json

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from engine.backends.compiled import CompiledBackend
from engine.conditioning import build_condition
from engine.errors import BackendError, ConfigError
from engine.frame import to_pixels
from engine.geometry import Mesh
from engine.pipeline import MeshBuffers, RenderPipeline
from engine.raster import rasterize
from engine.renderer import Renderer
from engine.sequence import orbit


@pytest.fixture(scope="module")
def frames(tiny_avatar):
    return orbit(tiny_avatar.config, frames=4)


def _inputs(avatar, frame):
    raster = rasterize(avatar.head_model.posed_mesh(None), frame.camera)
    cond = build_condition(raster, avatar.textures, avatar.config.conditioning)
    return cond, avatar.expression_tokens(torch.as_tensor(frame.expression))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_graphs_need_cuda(tiny_avatar):
    r = Renderer(tiny_avatar, steps=2)
    with pytest.raises(BackendError, match="CUDA graphs need a CUDA device"):
        CompiledBackend(tiny_avatar, r.sampler, r.noise, "cpu", torch.float16, graphs=True)
    with pytest.raises(ConfigError):
        CompiledBackend(tiny_avatar, r.sampler, r.noise, "cpu", torch.int8)
    with pytest.raises(ConfigError, match="decoder"):
        CompiledBackend(tiny_avatar, r.sampler, r.noise, "cpu", torch.float32, decoder="big")


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_float32_matches_the_reference(tiny_avatar, frames, sampler):
    ref = Renderer(tiny_avatar, sampler=sampler, steps=3)
    fast = Renderer(tiny_avatar, sampler=sampler, steps=3, backend="compiled", dtype="float32")
    assert isinstance(fast.backend, CompiledBackend) and not fast.backend.graphs
    for f in frames[:2]:
        a = ref.render(f.camera, f.expression).astype(int)
        b = fast.render(f.camera, f.expression).astype(int)
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3


def test_first_step_errors_per_dtype(tiny_avatar, frames):
    """Hoisting is exact in float32; half types: float16 ~2e-3, bfloat16 ~1.3e-2 on the tiny preset."""
    r = Renderer(tiny_avatar, steps=4)
    cond, tokens = _inputs(tiny_avatar, frames[0])
    v_ref = tiny_avatar.predict(r.noise.latent, r.sampler.timesteps[0], cond, tokens)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 3e-2)):
        backend = CompiledBackend(tiny_avatar, r.sampler, r.noise, "cpu", dtype)
        assert _rel(backend.first_step(cond, tokens), v_ref) < tol, dtype


def test_sd21_structure_flows_through_on_meta():
    """The full sd21 networks (shapes only, no memory): 15 expression layers, 512 px frame, both decoders."""
    from engine.model import Avatar
    from engine.sampling import FixedNoise, NoiseSchedule, make_sampler

    with torch.device("meta"):
        avatar = Avatar.from_preset("sd21")
    cfg = avatar.config
    sampler = make_sampler("ddpm", NoiseSchedule(cfg.schedule), 2)
    noise = FixedNoise((4, 64, 64), 2, 0).to("meta")
    cond = torch.empty(1, cfg.condition_channels, 512, 512, device="meta")
    tokens = torch.empty(1, 4, 1024, device="meta")
    for decoder in ("vae", "tiny"):
        backend = CompiledBackend(avatar, sampler, noise, "meta", torch.float16, decoder=decoder)
        assert len(backend.nets.expression) == 15
        pixels = backend.frame(cond, tokens)
        assert pixels.shape == (1, 512, 512, 3) and pixels.dtype == torch.uint8
    assert backend.first_step(cond, tokens).shape == (1, 4, 64, 64)


def test_the_callers_avatar_is_untouched(tiny_avatar):
    r = Renderer(tiny_avatar, steps=2)
    CompiledBackend(tiny_avatar, r.sampler, r.noise, "cpu", torch.float16)
    assert tiny_avatar.unet.dtype == torch.float32 and tiny_avatar.controlnet.dtype == torch.float32
    block = tiny_avatar.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    assert isinstance(block.attn1.processor, AttnProcessor2_0)
    assert isinstance(tiny_avatar.unet.down_blocks[0].resnets[0].time_emb_proj, torch.nn.Linear)
    assert tiny_avatar.unet.time_embedding is not None


def test_decode_and_pixels_of_the_frame(tiny_avatar, frames):
    r = Renderer(tiny_avatar, sampler="ddim", steps=2)
    backend = CompiledBackend(tiny_avatar, r.sampler, r.noise, "cpu", torch.float32, decoder="tiny")
    cond, tokens = _inputs(tiny_avatar, frames[1])
    latent = backend.denoise(cond, tokens)
    image = backend.decode(latent)
    pixels = to_pixels(image)
    assert latent.dtype == torch.float32 and image.shape == (1, 3, 128, 128)
    assert pixels.shape == (1, 128, 128, 3) and pixels.dtype == torch.uint8 and pixels.is_contiguous()
    steps = []
    frame = backend.frame(cond, tokens, on_step=steps.append)
    assert torch.equal(frame, pixels) and frame.is_contiguous()
    assert steps == [0, 1]  # the per-step hook of the shared loop
    assert backend.stats()["captures"] == 0 and backend.stage_times() is None
    steps.clear()
    backend.denoise(cond, tokens, on_step=steps.append)
    assert steps == [0, 1]


def test_fused_condition_path_takes_rasteriser_views(tiny_avatar, frames):
    """The rasterisers return depth/canonical as views (not contiguous); the fused op needs contiguous inputs."""
    from engine.conditioning import pack_textures

    r = Renderer(tiny_avatar, steps=1)
    backend = CompiledBackend(tiny_avatar, r.sampler, r.noise, "cpu", torch.float32)
    backend._packed = pack_textures(tiny_avatar.textures, torch.float16)  # as on CUDA (the op's twin runs here)
    raster = rasterize(tiny_avatar.head_model.posed_mesh(None), frames[0].camera)
    assert not raster.canonical.is_contiguous()
    ref = build_condition(raster, tiny_avatar.textures, tiny_avatar.config.conditioning)
    cond = backend.condition(raster)
    assert cond.dtype == torch.float16 and cond.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cond.float(), ref, atol=2e-2, rtol=1e-2)  # packed float16 textures
    out = torch.empty_like(cond)
    assert backend.condition(raster, out=out) is out and torch.equal(out, cond)
    assert backend._packed is not None  # no fallback happened


class _FakeBackend:
    """Records the order of calls; frame k returns pixels of value k."""

    def __init__(self, log):
        self.log, self.calls, self.outs = log, 0, []

    def condition(self, raster, out=None):
        self.outs.append(out is not None)
        cond = torch.zeros(1, 2, raster.height, raster.width)
        return out.copy_(cond) if out is not None else cond

    def stage_times(self):
        return None

    def frame(self, condition, tokens):
        self.log.append(("frame", self.calls))
        self.calls += 1
        return torch.full((1, condition.shape[2], condition.shape[3], 3), self.calls - 1, dtype=torch.uint8)


@pytest.mark.parametrize("depth", [1, 2])
def test_pipeline_order_and_lookahead(tiny_avatar, frames, depth):
    log = []
    r = Renderer(tiny_avatar, steps=1)
    r.backend = _FakeBackend(log)
    pipe = RenderPipeline(r, depth=depth, alpha=True)
    for image in pipe.run(frames):
        log.append(("yield", int(image[0, 0, 0])))
        assert image.shape == (128, 128, 4) and set(np.unique(image[..., 3])) <= {0, 255}
    expect = {1: [("frame", 0), ("yield", 0), ("frame", 1), ("yield", 1), ("frame", 2), ("yield", 2),
                  ("frame", 3), ("yield", 3)],
              2: [("frame", 0), ("frame", 1), ("yield", 0), ("frame", 2), ("yield", 1), ("frame", 3),
                  ("yield", 2), ("yield", 3)]}[depth]
    assert log == expect
    assert r.backend.outs == [False] * depth + [True] * (4 - depth)  # each slot written in place once allocated
    assert [rec.index for rec in pipe.records] == [0, 1, 2, 3]
    assert all(rec.latency_ms > 0 and rec.faces == 5120 for rec in pipe.records)
    assert pipe.stats()["mesh_allocations"] == depth


def test_pipeline_frames_equal_render(tiny_avatar, frames):
    r = Renderer(tiny_avatar, sampler="ddim", steps=2, backend="compiled", dtype="float32")
    out = list(RenderPipeline(r, depth=2, alpha=True).run(frames[:3]))
    for f, image in zip(frames, out):
        np.testing.assert_array_equal(image, r.render(f.camera, f.expression, alpha=True))
    assert [f.shape for f in r.stream(frames[:1])] == [(128, 128, 3)]  # CPU: the plain loop


def test_mesh_buffers_grow_by_powers_of_two():
    from benchmarks.bench import synthetic_mesh

    buffers = MeshBuffers(torch.device("cpu"), torch.int32)
    sizes = []
    for faces, variant in ((2_000, 0), (1_500, 1), (2_100, 2), (9_000, 3)):
        mesh = synthetic_mesh(faces, variant)
        sizes.append(mesh.num_faces)
        up = buffers.upload(mesh)
        assert up.faces.dtype == torch.int32 and torch.equal(up.faces.long(), mesh.faces)
        assert torch.equal(up.vertices, mesh.vertices) and torch.equal(up.normals, mesh.normals)
        assert buffers.capacity[1] >= mesh.num_faces and buffers.capacity[1] & (buffers.capacity[1] - 1) == 0
    assert len(set(sizes)) == 4  # a new topology every frame
    assert buffers.allocations == 3  # 2048 faces, then 4096, then 16384


def test_synthetic_100k_mesh():
    from benchmarks.bench import synthetic_mesh

    meshes = [synthetic_mesh(100_000, v) for v in range(4)]
    assert all(abs(m.num_faces - 100_000) < 5_000 for m in meshes)
    assert len({m.num_faces for m in meshes}) == 4
    m = meshes[0]
    assert isinstance(m, Mesh) and m.canonical_dims == 5
    torch.testing.assert_close(m.normals.norm(dim=1), torch.ones(m.num_vertices))
    assert float(m.vertices.abs().max()) < 0.11  # head-sized, metres


def test_bench_json_and_markdown(tmp_path):
    from benchmarks.bench import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--avatar", "tiny", "--device", "cpu", "--steps", "1", "--repeat", "1",
                              "--backends", "reference,compiled", "--compiled-dtype", "float32",
                              "--out", str(tmp_path / "bench")])
    report = run(args)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["format"] == "diffusion-avatars-bench" and data == json.loads(json.dumps(report))
    ref, fast = data["cases"]
    assert ref["backend"] == "reference" and fast["backend"] == "compiled"
    for case in (ref, fast):
        assert "error" not in case and case["fps"] > 0 and case["first_frame_ms"] > 0
        assert case["depth1"] == {"fps": case["fps"], "latency": case["latency"]} and "depth2" not in case  # CPU
    assert {"upload", "rasterise", "condition", "step", "decode", "copy back"} <= set(ref["stages"])
    assert fast["fidelity"]["first_step_rel_err"] < 1e-4 and fast["fidelity"]["psnr_db"] > 40
    md = (tmp_path / "bench.md").read_text()
    assert "| backend | dtype |" in md and "Against the baseline" in md and "| compiled | float32 |" in md
    assert "| fps, depth 1 | latency ms, depth 1 (p90) | fps, depth 2 |" in md


def test_the_timing_tiny_decoder_renders_the_image_size_of_a_vae_that_downsamples_by_4():
    """An avatar without a trained tiny decoder gets a random TAESD-shaped one with one upsampling per halving of
    its own VAE (not TAESD's fixed 8x), so a frame has the avatar's image size."""
    import dataclasses

    from engine.config import from_preset
    from engine.model import Avatar

    config = from_preset("tiny")
    config = config.replace(vae=dataclasses.replace(config.vae, block_out_channels=config.vae.block_out_channels[:3]),
                            conditioning_embedding_channels=config.conditioning_embedding_channels[:3])
    avatar = Avatar(config, seed=0)
    assert config.vae.downsample == 4 and avatar.tiny_decoder is None
    r = Renderer(avatar, sampler="ddim", steps=1)
    backend = CompiledBackend(avatar, r.sampler, r.noise, "cpu", torch.float32, decoder="tiny")
    side = config.image_size // 4
    image = backend.decode(torch.randn(1, config.vae.latent_channels, side, side))
    assert image.shape == (1, 3, config.image_size, config.image_size)
