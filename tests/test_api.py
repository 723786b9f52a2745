"""The embedding API of `Renderer`: dtype from the avatar's weights, the caller's avatar left as it was (and no
full-precision copy of the networks on the device for the compiled backend), close() / with, output types,
devices, backend options."""

import copy
import gc
import weakref

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from engine.devices import resolve_device
from engine.errors import BackendError, ConfigError, InputError
from engine.model import Avatar
from engine.renderer import Renderer
from engine.sequence import orbit


@pytest.fixture(scope="module")
def frames(tiny_avatar):
    return orbit(tiny_avatar.config, frames=2)


@pytest.fixture(scope="module")
def renderer(tiny_avatar):
    return Renderer(tiny_avatar, sampler="ddim", steps=1)


def _bf16(avatar):
    return copy.deepcopy(avatar).to(torch.bfloat16)


def test_dtype_comes_from_the_avatars_weights(tiny_avatar, frames):
    """Avatar.from_pretrained(dir, dtype=torch.bfloat16) then Renderer(avatar) crashed with a dtype mismatch."""
    cam, code = frames[0].camera, frames[0].expression
    half = _bf16(tiny_avatar)
    r = Renderer(half, sampler="ddim", steps=1)
    assert r.dtype == torch.bfloat16
    full = Renderer(tiny_avatar, sampler="ddim", steps=1).render(cam, code)
    assert np.abs(r.render(cam, code).astype(int) - full.astype(int)).mean() < 20
    assert Renderer(tiny_avatar, sampler="ddim", steps=1).dtype == torch.float32  # float32 weights: the backend's
    # An explicit float32 renders the bf16 weights exactly as the same weights upcast by hand.
    upcast = Renderer(half.float(), sampler="ddim", steps=1).render(cam, code)
    np.testing.assert_array_equal(Renderer(_bf16(tiny_avatar), dtype="float32", sampler="ddim", steps=1)
                                  .render(cam, code), upcast)


def test_the_callers_avatar_is_left_as_it_was(tiny_avatar, frames):
    avatar = copy.deepcopy(tiny_avatar).train().requires_grad_(True)
    before = {k: (v.data_ptr(), v.dtype, v.device) for k, v in avatar.state_dict().items()}
    r = Renderer(avatar, sampler="ddim", steps=1)
    r.render(frames[0].camera, frames[0].expression)
    assert avatar.training and all(p.requires_grad for p in avatar.parameters())
    assert {k: (v.data_ptr(), v.dtype, v.device) for k, v in avatar.state_dict().items()} == before
    assert not r.avatar.training and not any(p.requires_grad for p in r.avatar.parameters())
    # Already on the device in the weight dtype: the renderer's tree holds the caller's tensors (no new memory).
    ours = {k: v.data_ptr() for k, v in r.avatar.state_dict().items()}
    assert ours == {k: ptr for k, (ptr, _, _) in before.items()}
    assert r.avatar is not avatar and r.avatar.head_model is avatar.head_model


class _ToDevice(TorchDispatchMode):
    """Counts the bytes of float32 tensors copied onto the meta device."""

    def __init__(self):
        super().__init__()
        self.float32 = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and out.device.type == "meta" and out.dtype == torch.float32:
            self.float32 += out.numel() * 4
        return out


def _bytes(tensors):
    return sum(t.numel() * 4 for t in tensors)


@pytest.mark.parametrize("backend", ["compiled", "reference"])
def test_no_full_precision_networks_on_the_device_for_the_compiled_backend(tiny_avatar, backend):
    """The mechanism behind the compiled backend's peak memory (sd21 at 512: 27.4 GiB against the reference's 6.1
    when the float32 networks went to the device beside the half copies). The meta device stands in for the GPU;
    every float32 copy onto it is counted. The compiled backend may put there in float32 only the avatar's small
    parts (textures, expression projection, prompt), the time embeddings it tabulates in float32, and the noise."""
    avatar = copy.deepcopy(tiny_avatar)
    networks = _bytes(p for m in (avatar.unet, avatar.controlnet, avatar.vae) for p in m.parameters())
    with _ToDevice() as moved:
        r = Renderer(avatar, device="meta", backend=backend, dtype="float16", sampler="ddim", steps=2)
    if backend == "reference":  # autocast on float32 weights: all of them are on the device
        assert moved.float32 >= networks
        return
    time = [p for net in (avatar.unet, avatar.controlnet) for name, p in net.named_parameters()
            if name.startswith("time_embedding.") or ".time_emb_proj." in name]
    small = [*avatar.textures.parameters(), *avatar.expression_proj.parameters(), avatar.prompt_embedding]
    expected = _bytes([*time, *small, r.noise.latent, r.noise.step_noise])
    assert expected <= moved.float32 <= expected + 2 * 2 * 4  # + each network's 2 timesteps cast to float
    assert moved.float32 < 0.25 * networks  # tiny's textures are large next to its networks; sd21's are not
    assert {(p.device.type, p.dtype) for p in r.backend.nets.parameters()} == {("meta", torch.float16)}
    # the renderer's own avatar keeps the caller's networks where they are; its small parts are on the device
    assert all(p.device.type == "cpu" for p in r.avatar.unet.parameters())
    assert r.avatar.expression_proj.weight.device.type == "meta" and r.avatar.textures.planes.device.type == "meta"
    assert all(p.device.type == "cpu" for p in avatar.parameters())


def test_close_and_with_free_the_backend(tiny_avatar, frames):
    cam, code = frames[0].camera, frames[0].expression
    with Renderer(tiny_avatar, sampler="ddim", steps=1, backend="compiled", backend_options={"graphs": False}) as r:
        backend, private = r.backend, weakref.ref(r.backend.nets)
        assert r.render(cam, code).shape == (128, 128, 3)
    assert backend.nets is None and backend.avatar is None
    gc.collect()
    assert private() is None
    with pytest.raises(BackendError, match="closed"):
        r.render(cam, code)
    with pytest.raises(BackendError, match="closed"):
        next(r.stream(frames))
    r.close()  # twice is fine


def test_output_types(renderer, frames):
    cam, code = frames[0].camera, frames[0].expression
    rgb = renderer.render(cam, code)
    assert rgb.dtype == np.uint8 and rgb.shape == (128, 128, 3)
    pil = renderer.render(cam, code, output_type="pil")
    assert isinstance(pil, Image.Image) and pil.mode == "RGB" and pil.size == (128, 128)
    np.testing.assert_array_equal(np.asarray(pil), rgb)
    pt = renderer.render(cam, code, output_type="pt")
    assert pt.dtype == torch.float32 and pt.shape == (3, 128, 128) and pt.device.type == "cpu"
    np.testing.assert_array_equal((pt * 255).round().to(torch.uint8).permute(1, 2, 0).numpy(), rgb)
    assert renderer.render(cam, code, alpha=True, output_type="pil").mode == "RGBA"
    assert renderer.render(cam, code, alpha=True, output_type="pt").shape == (4, 128, 128)
    cams, codes = [f.camera for f in frames], torch.stack([f.expression for f in frames])
    assert renderer.render_batch(cams, codes, output_type="pt").shape == (2, 3, 128, 128)
    images = renderer.render_batch(cams, codes, output_type="pil")
    assert isinstance(images, list) and len(images) == 2
    streamed = list(renderer.stream(frames, output_type="pt"))
    assert len(streamed) == 2 and streamed[0].shape == (3, 128, 128)
    with pytest.raises(ConfigError, match="'np', 'pil', 'pt'"):
        renderer.render(cam, code, output_type="latent")


def test_devices(monkeypatch, tiny_avatar):
    assert Renderer(tiny_avatar, device="auto", steps=1).device == torch.device("cpu" if not torch.cuda.is_available()
                                                                                else "cuda")
    refusal = r"unknown device 'gpu0' \(use auto \(CUDA when present, else cpu\), cpu, cuda or cuda:N\)"
    with pytest.raises(ConfigError, match=refusal):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(BackendError, match="'cuda' is not available: .*\\(use cpu, or auto\\)"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(BackendError, match="this machine has 1 CUDA device"):
        resolve_device("cuda:3")


def test_backend_options(tiny_avatar):
    r = Renderer(tiny_avatar, steps=1, backend="compiled", backend_options={"graphs": False, "decoder": "tiny"})
    assert r.backend.nets.decoder_name == "tiny"
    with pytest.raises(ConfigError, match="decoder"):
        Renderer(tiny_avatar, steps=1, backend_options={"decoder": "tiny"})  # the reference takes none
    with pytest.raises(ConfigError, match="Avatar"):
        Renderer("tiny")
    with torch.device("meta"):
        structure = Avatar.from_preset("tiny")
    with pytest.raises(ConfigError, match="meta device and has no weights"):
        Renderer(structure)


def test_codes_by_name_none_and_batches(renderer, frames):
    cam = frames[0].camera
    jaw = torch.zeros(8)
    jaw[0] = 1.0
    np.testing.assert_array_equal(renderer.render(cam, {"jawOpen": 1.0}), renderer.render(cam, jaw))
    with pytest.raises(InputError, match=r"unknown expression name\(s\) \['jaw'\].*jawOpen"):
        renderer.render(cam, {"jaw": 1.0})
    with pytest.raises(InputError, match="None; pass 8 numbers"):
        renderer.render(cam, None)
    with pytest.raises(InputError, match="render_batch"):
        renderer.render(cam, torch.zeros(2, 8))
    with pytest.raises(InputError, match="list of cameras"):
        renderer.render_batch(cam, torch.zeros(1, 8))


def test_avatar_load_in_bfloat16_then_render(tmp_path, tiny_avatar, frames):
    """The issue's exact steps: save, load in bfloat16, Renderer(avatar)."""
    tiny_avatar.save_pretrained(tmp_path / "a")
    avatar = Avatar.from_pretrained(tmp_path / "a", dtype=torch.bfloat16)
    r = Renderer(avatar, sampler="ddim", steps=1)
    assert r.dtype == torch.bfloat16 and r.render(frames[1].camera, frames[1].expression).shape == (128, 128, 3)
    assert next(avatar.parameters()).dtype == torch.bfloat16
