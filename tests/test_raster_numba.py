"""The numba CPU rasteriser against the torch reference on the demo's head (tests/test_raster.py also runs its
closed-form and brute-force ray-casting checks on both backends).

Contract: the reference's buffers up to edge pixels and float32 rounding. An edge pixel is one whose centre lies
within EDGE_PX pixels of an edge of one of the mesh's projected triangles (there a rounding difference may hand the
pixel to the neighbouring triangle, or to none); everywhere else the mask is equal and the values agree within the
ATOL of each buffer (float32 rounding of the same interpolation).
"""

import numpy as np
import pytest
import torch

from engine.errors import BackendError
from engine.geometry import Camera
from engine.heads import builtin_head_mesh, load_head_model
from engine.raster import default_backend, rasterize, resolve_backend

EDGE_PX = 1e-6
ATOL = {"depth": 1e-6, "canonical": 1e-5, "normals": 1e-5}
ZNEAR, ZFAR = 0.1, 2.0


def _edge_pixels(mesh, cam: Camera, pixels: np.ndarray) -> np.ndarray:
    """For pixel indices [P] (row-major), whether each centre lies within EDGE_PX of a projected triangle edge."""
    clip = cam.world_to_clip(mesh.vertices.double(), ZNEAR, ZFAR).numpy()
    sx = (clip[:, 0] / clip[:, 3] + 1) * cam.width / 2 - 0.5
    sy = (clip[:, 1] / clip[:, 3] + 1) * cam.height / 2 - 0.5
    f = mesh.faces.numpy()
    ax, ay = sx[f].reshape(-1), sy[f].reshape(-1)
    bx, by = sx[f[:, [1, 2, 0]]].reshape(-1), sy[f[:, [1, 2, 0]]].reshape(-1)
    px, py = (pixels % cam.width)[:, None].astype(float), (pixels // cam.width)[:, None].astype(float)
    # distance from the centre to each edge segment
    dx, dy = bx - ax, by - ay
    t = np.clip(((px - ax) * dx + (py - ay) * dy) / np.maximum(dx * dx + dy * dy, 1e-300), 0, 1)
    dist = np.hypot(px - (ax + t * dx), py - (ay + t * dy))
    return dist.min(1) < EDGE_PX


def _assert_matches_reference(mesh, cam: Camera) -> int:
    ref = rasterize(mesh, cam, backend="torch", znear=ZNEAR, zfar=ZFAR)
    fast = rasterize(mesh, cam, backend="numba", znear=ZNEAR, zfar=ZFAR)
    for name in ("mask", "depth", "canonical", "normals"):
        a, b = getattr(ref, name), getattr(fast, name)
        assert a.shape == b.shape and a.dtype == b.dtype == torch.float32, name
    m_ref, m_fast = ref.mask[0, ..., 0] > 0.5, fast.mask[0, ..., 0] > 0.5
    off = torch.zeros_like(m_ref)
    both = m_ref & m_fast
    for name, atol in ATOL.items():
        diff = (getattr(ref, name) - getattr(fast, name)).abs()[0].amax(-1)
        off |= both & (diff > atol)
    off |= m_ref != m_fast
    bad = off.reshape(-1).nonzero().squeeze(1).numpy()
    assert _edge_pixels(mesh, cam, bad).all(), f"{len(bad)} pixels differ, not all on triangle edges"
    assert len(bad) <= 0.001 * cam.width * cam.height
    return int(m_ref.sum())


@pytest.fixture(scope="module")
def demo_head():
    return load_head_model("synthetic")


@pytest.mark.parametrize("eye,code", [((0.0, 0.0, 1.0), 0.0), ((0.36, 0.1, 0.93), 0.5), ((-0.6, -0.25, 0.76), 1.0)])
def test_demo_head_matches_reference(demo_head, eye, code):
    codes = torch.full((8,), code) if code != 0.5 else torch.rand(8, generator=torch.Generator().manual_seed(3))
    mesh = demo_head.posed_mesh(codes)
    assert mesh.num_faces > 15_000  # the demo's 17k-triangle head, at its 128 px
    eye = np.asarray(eye) / np.linalg.norm(eye)
    covered = _assert_matches_reference(mesh, Camera.look_at(eye=tuple(eye), width=128, height=128, fx=455.4))
    assert covered > 3000


def test_close_up_with_large_triangles_matches_reference():
    # The coarse built-in head, close and at 160 x 120: triangles tens of pixels across, the whole image covered
    mesh = builtin_head_mesh(2)
    _assert_matches_reference(mesh, Camera.look_at(eye=(0.1, 0.05, 0.25), width=160, height=120, fx=150.0))


def test_workspace_reuse_across_meshes_and_sizes(demo_head):
    # Frames of other meshes and sizes in between leave no trace: each frame's buffers equal a first call's.
    a = demo_head.posed_mesh(torch.zeros(8))
    cam = Camera.look_at(width=128, height=128, fx=455.4)
    first = rasterize(a, cam, backend="numba")
    rasterize(builtin_head_mesh(1), Camera.look_at(width=64, height=48), backend="numba")
    rasterize(demo_head.posed_mesh(torch.ones(8)), cam, backend="numba")
    again = rasterize(a, cam, backend="numba")
    for name in ("mask", "depth", "canonical", "normals"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name


def test_auto_picks_numba_on_the_cpu():
    assert default_backend("cpu") == "numba" and resolve_backend("auto", "cpu") == "numba"
    assert default_backend("cuda") == "torch"
    assert resolve_backend("torch", "cpu") == "torch"


def test_numba_refuses_a_mesh_off_the_cpu():
    mesh = builtin_head_mesh(1).to("meta")
    with pytest.raises(BackendError, match="CPU"):
        rasterize(mesh, Camera.look_at(width=16, height=16), backend="numba")
