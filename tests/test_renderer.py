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


# -- cameras that see nothing ------------------------------------------------------------------------
def test_a_camera_that_sees_nothing_is_an_error(renderer, tiny_avatar):
    from engine.geometry import Camera
    from engine.orbit import orbit_camera

    head = tiny_avatar.head_model.posed_mesh(None)
    nearest = 3.0 - float(head.vertices[:, 2].max())  # a camera on the +z axis at 3 m: its nose tip
    with pytest.raises(InputError, match=rf"beyond the far plane \(its nearest point is {nearest:.2f} m.*zfar = 2 m"):
        renderer.render(orbit_camera(size=128, distance=3.0), torch.zeros(8))
    with pytest.raises(InputError, match="behind the camera"):
        renderer.render(Camera.look_at((0, 0, 1), (0, 0, 2), width=128, height=128, fov_deg=16), torch.zeros(8))
    # looking 26.6 degrees toward +x from (0, 0, 1): the head (half-width ~5 degrees) lies left of the 16-degree view
    with pytest.raises(InputError, match="camera 1 sees nothing of the head: all of it lies left of the image"):
        renderer.render_batch([orbit_camera(size=128),
                               Camera.look_at((0, 0, 1), (0.5, 0, 0), width=128, height=128, fov_deg=16)],
                              torch.zeros(2, 8))
    frames = orbit(tiny_avatar.config, frames=3)
    frames[2].camera = orbit_camera(size=128, distance=3.0)
    with pytest.raises(InputError, match="^frame 2: the camera sees nothing of the head: all of it lies beyond"):
        renderer.check_frames(frames)
    renderer.check_frames(frames[:2])
    # partly in view (the head's centre on the image's edge), from behind, and just inside the far plane: rendered
    for camera in (Camera.look_at((0, 0, 1), (0.1406, 0, 0), width=128, height=128, fov_deg=16),
                   orbit_camera(180.0, 0.0, size=128), orbit_camera(size=128, distance=1.9)):
        renderer._frame_inputs(camera, torch.zeros(8), None)


# -- the recorded range: warnings and the code policy --------------------------------------------------
@pytest.fixture(scope="module")
def demo():
    from engine.avatars import load_avatar

    return load_avatar("demo")


def _range_warnings(record):
    from engine.errors import RangeWarning

    return [str(w.message) for w in record if issubclass(w.category, RangeWarning)]


def test_camera_outside_the_recorded_view_range_warns_once_per_cause(demo):
    import warnings

    from engine.orbit import orbit_camera

    r = Renderer(demo, sampler="ddim", steps=1)
    code = torch.zeros(8)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        r.render(orbit_camera(45.0, 0.0, size=128), code)  # 4.1 deg beyond +-40.9: inside the 5 deg margin
        assert _range_warnings(record) == []
        r.render(orbit_camera(60.0, 0.0, size=128), code)
        r.render(orbit_camera(-90.0, 0.0, size=128), code)  # the same cause again: no second warning
        (message,) = _range_warnings(record)
        assert "azimuth 60.00 deg" in message and "(-40.91..40.91 deg; this warning starts 5 deg beyond it)" in message
        r.render(orbit_camera(0.0, 30.0, size=128, distance=1.2), code)  # two new causes
        assert [m.split(" lies")[0] for m in _range_warnings(record)[1:]] == [
            "the camera at elevation 30.00 deg", "the camera at distance 1.20 m"]
    with warnings.catch_warnings(record=True) as record:  # an avatar that records no range never warns
        warnings.simplefilter("always")
        Renderer(demo_without_record(demo), sampler="ddim", steps=1).render(orbit_camera(90.0, 0.0, size=128), code)
    assert _range_warnings(record) == []


def demo_without_record(demo, **trained_on):
    """The demo avatar with no recorded range (or with some of its recorded fields replaced)."""
    import copy
    import dataclasses

    avatar = copy.copy(demo)
    record = dataclasses.replace(demo.config.trained_on, **trained_on) if trained_on else None
    avatar.config = demo.config.replace(trained_on=record)
    return avatar


def test_codes_beyond_the_head_models_range_are_clamped_for_the_mesh_and_the_tokens_alike(demo):
    """Policy: the one limit on a code is its head model's `code_range` (the synthetic head's rig is defined on
    [0, 1] and clamps to it); the renderer clamps the code to it once, before the head model and the expression
    tokens, so both see the same code and the frame equals the in-range code's (before, the synthetic head clamped
    1.5 to 1 for the mesh while the tokens got 1.5)."""
    import warnings

    from engine.orbit import orbit_camera

    cam = orbit_camera(size=128)
    r = Renderer(demo, sampler="ddim", steps=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        over = r.render(cam, {"jawOpen": 1.5, "cheekPuff": -0.25})
        r.render(cam, {"jawOpen": 2.0})
    (message,) = _range_warnings(record)
    assert ("outside the range avatar 'demo' was trained on: jawOpen = 1.5 (range 0..1), cheekPuff = -0.25 (range "
            "0..1); values beyond its head model's range [0, 1] are clamped to it for both the mesh and the "
            "expression tokens") in message
    np.testing.assert_array_equal(over, r.render(cam, {"jawOpen": 1.0}))
    assert _mad(over, r.render(cam, {"jawOpen": 0.9})) > 0  # the code still matters inside the range
    bare = Renderer(demo_without_record(demo), sampler="ddim", steps=1)  # no record: the same clamp, named
    with pytest.warns(UserWarning, match="range of avatar 'demo''s head model 'synthetic': jawOpen = 1.5 .range 0..1"):
        np.testing.assert_array_equal(bare.render(cam, {"jawOpen": 1.5}), bare.render(cam, {"jawOpen": 1.0}))


def test_codes_beyond_the_recorded_range_inside_the_head_models_warn_and_render_as_given(demo):
    from engine.orbit import orbit_camera

    cam = orbit_camera(size=128)
    narrow = demo_without_record(demo, code_max=(0.5,) + demo.config.trained_on.code_max[1:])
    with pytest.warns(UserWarning, match=r"jawOpen = 0.8 \(range 0..0.5\).*inside it the frame extrapolates"):
        frame = Renderer(narrow, sampler="ddim", steps=1).render(cam, {"jawOpen": 0.8})
    np.testing.assert_array_equal(frame, Renderer(demo, sampler="ddim", steps=1).render(cam, {"jawOpen": 0.8}))


def test_a_static_head_without_a_range_takes_any_code(renderer, frames):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tiny: no recorded range, a static head: nothing to warn about
        assert _mad(renderer.render(frames[0].camera, _code(0) * 1.5), renderer.render(frames[0].camera, _code(0))) > 0
