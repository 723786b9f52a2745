import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.config import ARKIT8
from engine.data.synthetic import (
    SYNTHETIC_VERSION,
    SyntheticHead,
    check_synthetic_version,
    default_camera,
    default_rig_cameras,
    synthetic_head,
)
from engine.data.synthetic_look import IRIS_ANGLE, part_of
from engine.data.synthetic_mesh import CANONICAL_SCALE, EYE_CENTRES, EYEBALL, Y_MOUTH, head_geometry
from engine.errors import ConfigError, InputError
from engine.geometry import Camera
from engine.heads import HeadModel, head_model_kinds, load_head_model
from engine.orbit import orbit_camera
from engine.raster import rasterize

CASES = [("neutral", None)] + [(name, torch.eye(8)[i]) for i, name in enumerate(ARKIT8)]


@pytest.fixture(scope="module")
def head():
    return SyntheticHead()


def _code(**values) -> torch.Tensor:
    return torch.tensor([values.get(n, 0.0) for n in ARKIT8])


def test_mesh_size_placement_and_canonical(head):
    mesh = head.neutral_mesh()
    assert 5000 <= mesh.num_faces <= 20000 and mesh.canonical_dims == 5
    v, c = mesh.vertices, mesh.canonical
    torch.testing.assert_close(c[:, :3], CANONICAL_SCALE * v, rtol=0, atol=1e-6)
    ambient = c[:, 3:]
    assert float(ambient.abs().max()) < 0.2 and bool((ambient.std(0) > 0.01).all())
    lo, hi = v.min(0).values, v.max(0).values
    assert 0.22 <= float(hi[1] - lo[1]) <= 0.25
    assert float(((hi + lo) / 2).abs().max()) < 0.02
    tip = v[v[:, 2].argmax()]  # the nose tip: on the midline, facing +z
    assert abs(float(tip[0])) < 1e-3 and float(tip[2]) > 0.1
    # inside model.md's canonical normalisation box
    assert bool((c[:, :3].min(0).values > torch.tensor([-1.0, -1.0, -1.5])).all())
    assert bool((c[:, :3].max(0).values < torch.tensor([1.0, 1.0, 0.5])).all())


def test_every_component_is_closed_and_outward():
    g = head_geometry()
    assert len(g.components) == 9  # shell, 2 x (eyeball, 2 lids), 2 teeth
    for first, end in g.components:
        f = g.faces[(g.faces >= first).all(1) & (g.faces < end).all(1)]
        edges = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
        directed = {tuple(e) for e in edges.tolist()}
        assert len(directed) == len(edges)  # each directed edge once: 2-manifold, consistently oriented
        assert directed == {(b, a) for a, b in directed}  # every edge has its twin: watertight
        v = g.vertices
        volume = np.einsum("ij,ij->i", v[f[:, 0]], np.cross(v[f[:, 1]], v[f[:, 2]])).sum() / 6
        assert volume > 0
    assert sum(len(g.faces[(g.faces >= a).all(1) & (g.faces < b).all(1)]) for a, b in g.components) == len(g.faces)


def test_deterministic():
    again = head_geometry.__wrapped__()
    g = head_geometry()
    np.testing.assert_array_equal(again.vertices, g.vertices)
    np.testing.assert_array_equal(again.faces, g.faces)
    np.testing.assert_array_equal(again.canonical, g.canonical)


def test_forward_deformation_keeps_canonical(head):
    neutral = head.neutral_mesh()
    posed = head.posed_mesh(torch.rand(8, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(posed.canonical, neutral.canonical) and torch.equal(posed.faces, neutral.faces)
    assert float((posed.vertices - neutral.vertices).norm(dim=1).max()) > 0.005
    torch.testing.assert_close(posed.normals.norm(dim=1), torch.ones(posed.num_vertices), atol=1e-4, rtol=0)


# (dimension, moves only vertices whose rest position satisfies ...)
REGIONS = {
    "jawOpen": lambda p: p[:, 1] < Y_MOUTH + 0.02,
    "mouthSmileLeft": lambda p: p[:, 0] > 0,
    "mouthSmileRight": lambda p: p[:, 0] < 0,
    "browInnerUp": lambda p: p[:, 1] > 0.025,
    "eyeBlinkLeft": lambda p: p[:, 0] > 0.01,
    "eyeBlinkRight": lambda p: p[:, 0] < -0.01,
    "mouthPucker": lambda p: (p[:, 1] - Y_MOUTH).abs() < 0.03,
    "cheekPuff": lambda p: p[:, 1] < 0.0,
}


@pytest.mark.parametrize("k,name", list(enumerate(ARKIT8)))
def test_rig_dimension_is_local_and_smooth(head, k, name):
    rest = head.neutral_mesh().vertices
    d = head.posed_mesh(torch.eye(8)[k]).vertices - rest
    moved = d.norm(dim=1) > 0
    assert float(d.norm(dim=1).max()) > 0.004  # visibly moves something
    assert bool(REGIONS[name](rest[moved]).all())  # ... and nothing outside its region
    # smooth: the displacement changes by at most a few times an edge's length along any edge
    f = head.neutral_mesh().faces
    e = torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    ratio = (d[e[:, 0]] - d[e[:, 1]]).norm(dim=1) / (rest[e[:, 0]] - rest[e[:, 1]]).norm(dim=1)
    assert float(ratio.max()) < 4.0
    # half strength moves about half as far (no jumps in the code either)
    half = (head.posed_mesh(0.5 * torch.eye(8)[k]).vertices - rest).norm(dim=1).max()
    assert 0.3 < float(half / d.norm(dim=1).max()) < 0.7


def _eye_camera(eye: int, size: int = 64) -> Camera:
    x, y, _ = EYE_CENTRES[eye]
    return Camera.look_at((x, y, 0.6), (x, y, 0.0), width=size, height=size, fov_deg=4.0)


def _iris_pixels(head, code, eye: int) -> int:
    """Pixels of the close-up where iris or pupil is the visible surface (exact, from the raster)."""
    buf = rasterize(head.posed_mesh(code), _eye_camera(eye))
    canon = buf.canonical[0][buf.mask[0, ..., 0] > 0.5]
    eyeball = canon[part_of(canon) == EYEBALL]
    local = eyeball[:, :3] / CANONICAL_SCALE - torch.tensor(EYE_CENTRES[eye], dtype=torch.float32)
    angle = torch.acos((local[:, 2] / local.norm(dim=1)).clamp(-1, 1))
    return int((angle < IRIS_ANGLE).sum())


def _white_pixels(head, code, eye: int) -> int:
    """Sclera-coloured (bright, unsaturated) pixels in the close-up picture."""
    rgb, _ = head.render(_eye_camera(eye), code)
    return int(((rgb.min(-1).values > 0.72) & (rgb.max(-1).values - rgb.min(-1).values < 0.15)).sum())


@pytest.mark.parametrize("eye,name,other", [(0, "eyeBlinkLeft", "eyeBlinkRight"), (1, "eyeBlinkRight", "eyeBlinkLeft")])
def test_blink_closes_the_lid_over_the_eye(head, eye, name, other):
    assert _iris_pixels(head, None, eye) > 200 and _white_pixels(head, None, eye) > 40
    assert _iris_pixels(head, _code(**{name: 1.0}), eye) == 0
    assert _white_pixels(head, _code(**{name: 1.0}), eye) == 0
    assert 0 < _iris_pixels(head, _code(**{name: 0.5}), eye) < _iris_pixels(head, None, eye)
    assert _iris_pixels(head, _code(**{other: 1.0}), eye) == _iris_pixels(head, None, eye)


def test_jaw_open_shows_the_dark_mouth_and_teeth(head):
    cam = default_camera(128)
    u, v = cam.project(torch.tensor([[0.0, Y_MOUTH, 0.09]]))[0].round().long().tolist()
    box = (slice(v - 2, v + 16), slice(u - 10, u + 11))  # the lips and below: where the open mouth shows

    def dark(code) -> int:
        rgb, _ = head.render(cam, code)
        return int((rgb[box].mean(-1) < 0.12).sum())

    closed, half, open_ = dark(None), dark(_code(jawOpen=0.5)), dark(_code(jawOpen=1.0))
    assert closed < 15 and half > closed + 30 and open_ > half + 40
    buf = rasterize(head.posed_mesh(_code(jawOpen=1.0)), cam)
    parts = part_of(buf.canonical[0][buf.mask[0, ..., 0] > 0.5])
    assert int((parts == 3).sum()) > 15 and int((parts == 4).sum()) > 40  # teeth and cavity in view
    closed = rasterize(head.neutral_mesh(), cam)
    parts = part_of(closed.canonical[0][closed.mask[0, ..., 0] > 0.5])
    assert int(((parts == 3) | (parts == 4)).sum()) == 0


def test_render_alpha_background_and_dtype(head):
    rgb, alpha = head.render(default_camera(96), _code(mouthSmileLeft=0.7))
    assert rgb.shape == (96, 96, 3) and alpha.shape == (96, 96)
    assert rgb.dtype == alpha.dtype == torch.float32
    assert float(rgb.min()) >= 0 and float(rgb.max()) <= 1 and float(alpha.min()) >= 0 and float(alpha.max()) <= 1
    assert bool((rgb[alpha == 0] == 1).all())  # white background
    assert 0.3 < float(alpha.mean()) < 0.8  # the head fills much of the frame
    assert int(((alpha > 0) & (alpha < 1)).sum()) > 50  # anti-aliased outline
    rect = head.render(orbit_camera(10, 5, size=40).scaled(48, 32), None)[0]
    assert rect.shape == (32, 48, 3)
    with pytest.raises(InputError):
        head.render(default_camera(32), None, supersample=0)


def test_render_is_resolution_independent(head):
    code = _code(jawOpen=0.4, eyeBlinkRight=0.6, cheekPuff=0.3)
    small, a_small = head.render(default_camera(128), code)
    big, a_big = head.render(default_camera(256), code)
    down = F.avg_pool2d(big.permute(2, 0, 1)[None], 2)[0].permute(1, 2, 0)
    assert float((down - small).abs().mean()) < 0.01
    assert float((F.avg_pool2d(a_big[None, None], 2)[0, 0] - a_small).abs().mean()) < 0.005


def test_expression_validation(head):
    with pytest.raises(InputError, match="8 values"):
        head.posed_mesh(torch.zeros(5))
    with pytest.raises(InputError, match="NaN"):
        head.posed_mesh(torch.full((8,), float("nan")))
    over = head.posed_mesh(torch.full((8,), 3.0)).vertices
    torch.testing.assert_close(over, head.posed_mesh(np.ones(8)).vertices)  # clamped to [0, 1]; numpy accepted
    torch.testing.assert_close(head.posed_mesh([0.0] * 8).vertices, head.neutral_mesh().vertices)


def test_registry_and_version():
    assert "synthetic" in head_model_kinds()
    h = load_head_model("synthetic")
    assert isinstance(h, SyntheticHead) and isinstance(h, HeadModel)
    assert h.name == "synthetic" and h.version == SYNTHETIC_VERSION and h.expression_names == ARKIT8
    assert h.expression_dim == 8
    assert isinstance(load_head_model(f"synthetic:{SYNTHETIC_VERSION}"), SyntheticHead)
    with pytest.raises(ConfigError, match="version"):
        load_head_model(f"synthetic:{SYNTHETIC_VERSION + 1}")
    with pytest.raises(ConfigError, match="version"):
        synthetic_head("one")
    check_synthetic_version(SYNTHETIC_VERSION, "the dataset")
    for bad in (SYNTHETIC_VERSION + 1, None, "x", 1.5):
        with pytest.raises(ConfigError, match="the dataset"):
            check_synthetic_version(bad, "the dataset")


def test_default_cameras_frame_the_head(head):
    cams = default_rig_cameras(12, size=64)
    assert len(cams) == 12 and all(c.width == c.height == 64 for c in cams)
    torch.testing.assert_close(cams[0].center, default_camera(64).center)
    v = head.neutral_mesh().vertices
    for cam in cams:
        c = cam.center
        yaw, pitch = math.degrees(math.atan2(c[0], c[2])), math.degrees(math.asin(c[1] / c.norm()))
        assert abs(yaw) <= 45.001 and abs(pitch) <= 20.001 and abs(float(c.norm()) - 1) < 1e-5
        torch.testing.assert_close(cam.project(torch.zeros(1, 3))[0], torch.tensor([31.5, 31.5]))
        uv = cam.project(v)
        assert float(uv.min()) > 0 and float(uv.max()) < 63  # whole head in view ...
        assert float(uv[:, 1].max() - uv[:, 1].min()) > 0.7 * 64  # ... filling most of the frame
    yaws = [math.degrees(math.atan2(c.center[0], c.center[2])) for c in cams]
    assert max(yaws) > 25 and min(yaws) < -25  # spread over the cap
    assert [c.center.tolist() for c in default_rig_cameras(12, size=64)] == [c.center.tolist() for c in cams]


# -- MediaPipe: the rendered head reads as a face --------------------------------------------------------
@pytest.fixture(scope="module")
def face_mesh():
    mp = pytest.importorskip("mediapipe")
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=True) as fm:
        yield fm


def _landmarks(face_mesh, head, code, size=256, yaw=0.0):
    rgb, _ = head.render(orbit_camera(yaw, 0.0, size=size), code)
    image = np.ascontiguousarray((rgb.numpy() * 255).round().astype(np.uint8))
    found = face_mesh.process(image).multi_face_landmarks
    return None if not found else np.array([[p.x, p.y] for p in found[0].landmark]) * size


def test_mediapipe_finds_the_face_for_every_rig_dimension(face_mesh, head):
    pts = {name: _landmarks(face_mesh, head, code) for name, code in CASES}
    assert [n for n, p in pts.items() if p is None] == []
    d = lambda p, a, b: float(np.linalg.norm(p[a] - p[b]))  # noqa: E731
    eye_l = lambda p: d(p, 386, 374) / d(p, 362, 263)  # noqa: E731  (subject's left eye)
    eye_r = lambda p: d(p, 159, 145) / d(p, 33, 133)  # noqa: E731
    n = pts["neutral"]
    # and reads the expressions as a face tracker would
    assert eye_l(pts["eyeBlinkLeft"]) < 0.5 * eye_l(n) and eye_r(pts["eyeBlinkLeft"]) > 0.8 * eye_r(n)
    assert eye_r(pts["eyeBlinkRight"]) < 0.5 * eye_r(n) and eye_l(pts["eyeBlinkRight"]) > 0.8 * eye_l(n)
    assert d(pts["jawOpen"], 13, 14) > d(n, 13, 14) + 10
    assert pts["mouthSmileLeft"][291, 1] < n[291, 1] - 3 and pts["mouthSmileRight"][61, 1] < n[61, 1] - 3
    assert d(pts["mouthPucker"], 61, 291) < 0.9 * d(n, 61, 291)


@pytest.mark.parametrize("yaw", [-25.0, 25.0])
def test_mediapipe_finds_the_face_at_128_from_the_side(face_mesh, head, yaw):
    for name, code in (CASES[0], CASES[1], CASES[5]):  # neutral, jawOpen, eyeBlinkLeft
        assert _landmarks(face_mesh, head, code, size=128, yaw=yaw) is not None, name
