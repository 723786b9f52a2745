import numpy as np
import pytest
import torch

from engine.errors import ConfigError, InputError
from engine.geometry import Mesh
from engine.renderer import Renderer
from engine.sequence import orbit


@pytest.fixture(scope="module")
def frames(tiny_avatar):
    return orbit(tiny_avatar.config, frames=4)


@pytest.fixture(scope="module")
def renderer(tiny_avatar):
    return Renderer(tiny_avatar, sampler="ddim", steps=4)


def _code(i, dim=8):
    code = torch.zeros(dim)
    code[i] = 1.0
    return code


def _mad(a, b):
    return np.abs(a.astype(np.float32) - b.astype(np.float32)).mean()


def test_render_shape_and_alpha(renderer, frames):
    rgb = renderer.render(frames[0].camera, frames[0].expression)
    assert rgb.shape == (128, 128, 3) and rgb.dtype == np.uint8
    rgba = renderer.render(frames[0].camera, frames[0].expression, alpha=True)
    assert rgba.shape == (128, 128, 4)
    np.testing.assert_array_equal(rgba[..., :3], rgb)
    alpha = rgba[..., 3]
    assert set(np.unique(alpha)) == {0, 255}
    assert 0.05 < (alpha == 255).mean() < 0.9  # the head covers part of the image
    assert rgb.std() > 2  # not a flat image


def test_code_camera_and_mesh_each_change_the_frame(renderer, frames):
    cam = frames[0].camera
    base = renderer.render(cam, _code(0))
    assert _mad(base, renderer.render(cam, _code(3))) > 0.5
    assert _mad(base, renderer.render(frames[2].camera, _code(0))) > 0.5
    head = renderer.avatar.head_model.posed_mesh(_code(0))
    moved = Mesh(head.vertices + torch.tensor([0.02, 0.0, 0.0]), head.faces, head.canonical)
    assert _mad(base, renderer.render(cam, _code(0), mesh=moved)) > 0.5


def test_bit_identical_reruns(tiny_avatar, frames):
    a = Renderer(tiny_avatar, sampler="ddpm", steps=3).render(frames[1].camera, frames[1].expression)
    b = Renderer(tiny_avatar, sampler="ddpm", steps=3).render(frames[1].camera, frames[1].expression)
    np.testing.assert_array_equal(a, b)


def test_seed_changes_the_noise(tiny_avatar, frames):
    a = Renderer(tiny_avatar, sampler="ddpm", steps=2, seed=1).render(frames[0].camera, frames[0].expression)
    b = Renderer(tiny_avatar, sampler="ddpm", steps=2, seed=2).render(frames[0].camera, frames[0].expression)
    assert _mad(a, b) > 0.5


def test_batch_and_stream_match_single_frames(renderer, frames):
    singles = [renderer.render(f.camera, f.expression) for f in frames[:2]]
    batch = renderer.render_batch([f.camera for f in frames[:2]], torch.stack([f.expression for f in frames[:2]]))
    assert batch.shape == (2, 128, 128, 3)
    for single, batched in zip(singles, batch):
        # batched convolutions may round differently; one 8-bit level at most
        assert np.abs(single.astype(int) - batched.astype(int)).max() <= 1
    streamed = list(renderer.stream(frames[:2]))
    for single, s in zip(singles, streamed):
        np.testing.assert_array_equal(single, s)


def test_half_precision_autocast_runs(tiny_avatar, frames):
    full = Renderer(tiny_avatar, sampler="ddim", steps=2).render(frames[0].camera, frames[0].expression)
    half = Renderer(tiny_avatar, sampler="ddim", steps=2, dtype="bfloat16").render(frames[0].camera,
                                                                                  frames[0].expression)
    assert half.shape == full.shape and _mad(full, half) < 20


def test_bad_inputs(renderer, frames, tiny_avatar):
    cam = frames[0].camera
    with pytest.raises(InputError, match="8"):
        renderer.render(cam, torch.zeros(7))
    with pytest.raises(InputError, match="(?i)nan"):
        renderer.render(cam, torch.full((8,), float("nan")))
    with pytest.raises(InputError, match="scaled"):
        renderer.render(cam.scaled(64, 64), torch.zeros(8))
    with pytest.raises(InputError, match="camera"):
        renderer.render("not a camera", torch.zeros(8))
    with pytest.raises(InputError, match="one per frame"):
        renderer.render_batch([cam, cam], torch.zeros(3, 8))
    with pytest.raises(ConfigError, match="ddpm"):
        Renderer(tiny_avatar, sampler="euler")
    with pytest.raises(ConfigError, match="reference"):
        Renderer(tiny_avatar, backend="nope")
    for steps in (0, 51):
        with pytest.raises(ConfigError, match="50"):
            Renderer(tiny_avatar, steps=steps)
    with pytest.raises(ConfigError, match="float32"):
        Renderer(tiny_avatar, dtype="int8")


def test_no_head_model_needs_a_mesh(tiny_avatar, frames):
    r = Renderer(tiny_avatar, sampler="ddim", steps=1)
    head, r.avatar.head_model = r.avatar.head_model, None
    try:
        with pytest.raises(InputError, match="mesh="):
            r.render(frames[0].camera, torch.zeros(8))
        assert r.render(frames[0].camera, torch.zeros(8), mesh=head.posed_mesh(torch.zeros(8))).shape == (128, 128, 3)
    finally:
        r.avatar.head_model = head
