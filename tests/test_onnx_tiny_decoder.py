"""The tiny decoder in the export (`tiny_decoder.onnx`) and the onnxruntime backend's decoder="tiny"."""

import copy

import numpy as np
import pytest
import torch

from engine.errors import CheckpointError, ConfigError
from engine.recipe import TinyDecoderConfig
from engine.renderer import Renderer
from engine.sequence import orbit
from engine.tiny_decoder import build_tiny_decoder
from export.onnx import export_onnx


@pytest.fixture(scope="module")
def with_tiny(tiny_avatar):
    """The tiny preset with a small tiny decoder of seeded weights (an untrained one computes like a trained one)."""
    avatar = copy.deepcopy(tiny_avatar)
    vae = avatar.config.vae
    shape = TinyDecoderConfig(vae.latent_channels, 16, (1,) * (vae.downsample.bit_length() - 1) + (1,))
    avatar.config = avatar.config.replace(tiny_decoder=shape)
    torch.manual_seed(0)
    avatar.tiny_decoder = build_tiny_decoder(shape).eval().requires_grad_(False)
    return avatar


@pytest.fixture(scope="module")
def engines(with_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny-with-tiny-decoder"
    export_onnx(with_tiny, out, graphs=("conditioning", "denoiser", "tiny_decoder"))
    return out


def test_frames_with_the_tiny_decoder_match_the_reference(with_tiny, engines):
    ref = Renderer(with_tiny, sampler="ddim", steps=2, decoder="tiny")
    fast = Renderer(with_tiny, sampler="ddim", steps=2, decoder="tiny", backend="onnxruntime",
                    backend_options={"engines": engines})
    f = orbit(with_tiny.config, frames=3)[1]
    a, b = (r.render(f.camera, f.expression).astype(np.float64) for r in (ref, fast))
    assert np.abs(a - b).max() <= 1  # 8-bit levels: float32 graphs against float32 torch
    vae = Renderer(with_tiny, sampler="ddim", steps=2, decoder="vae").render(f.camera, f.expression)
    assert np.abs(vae.astype(np.float64) - b).mean() > 5  # it is the tiny decoder's image, not the VAE's


def test_a_missing_decoder_graph_is_named(with_tiny, tiny_avatar, engines):
    with pytest.raises(CheckpointError, match=r"no \['decoder'\] graph"):
        Renderer(with_tiny, sampler="ddim", steps=1, decoder="vae", backend="onnxruntime",
                 backend_options={"engines": engines})
    with pytest.raises(ConfigError, match="has no tiny decoder to export"):
        export_onnx(tiny_avatar, engines.parent / "none", graphs=("tiny_decoder",))
    assert not (engines.parent / "none").exists()
