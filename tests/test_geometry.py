import json
import math

import numpy as np
import pytest
import torch

from engine.errors import FormatError, InputError
from engine.geometry import Camera, Mesh, vertex_normals


def _cam(**kw):
    args = dict(R=torch.eye(3), t=[0.0, 0.0, 1.0], fx=100.0, fy=120.0, cx=31.5, cy=23.5, width=64, height=48)
    args.update(kw)
    return Camera(**args)


def _cube():
    v = torch.tensor([[x, y, z] for x in (-1.0, 1.0) for y in (-1.0, 1.0) for z in (-1.0, 1.0)])
    # Counter-clockwise seen from outside (vertex index = 4x + 2y + z with 0/1 per axis).
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    f = torch.tensor([t for a, b, c, d in quads for t in ((a, b, c), (a, c, d))])
    return Mesh(v * 0.1, f, v * 0.4)


# -- Camera ----------------------------------------------------------------------------------------
def test_camera_accepts_numpy_and_lists_and_converts():
    cam = Camera(R=np.eye(3), t=[0, 0, 1], fx=100, fy=100, cx=10, cy=10, width=20.0, height=20)
    assert cam.R.dtype == torch.float32 and cam.t.dtype == torch.float32 and cam.R.device.type == "cpu"
    assert isinstance(cam.fx, float) and isinstance(cam.width, int) and cam.width == 20
    torch.testing.assert_close(cam.center, torch.tensor([0.0, 0.0, -1.0]))


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(R=2 * torch.eye(3)), "not a rotation"),
        (dict(R=torch.diag(torch.tensor([1.0, 1.0, -1.0]))), "det"),
        (dict(R=torch.eye(4)), "[3, 3]"),
        (dict(t=[0.0, float("nan"), 1.0]), "NaN"),
        (dict(t=[0.0, 1.0]), "Camera.t"),
        (dict(fx=0.0), "> 0"),
        (dict(fy=-3.0), "> 0"),
        (dict(cx=float("inf")), "finite"),
        (dict(width=0), "positive integer"),
        (dict(height=10.5), "positive integer"),
        # found by tests/test_fuzz_files.py: complex values were cast to real (a warning) or to 0 pixels
        (dict(R=np.eye(3, dtype=np.complex64)), "Camera.R must hold real numbers, got torch.complex64 values"),
        (dict(height=np.complex64(1j)), "Camera.height must be a positive integer"),
        (dict(fx=np.bool_(True)), "Camera.fx must be a finite number"),
        (dict(t=["a", "b", "c"]), "Camera.t must be a tensor, array or list of numbers"),
    ],
)
def test_camera_validation_names_the_problem(kw, words):
    with pytest.raises(InputError, match=None) as e:
        _cam(**kw)
    assert words in str(e.value)


def test_camera_numpy_scalars_are_numbers():
    cam = _cam(fx=np.float32(100.0), width=np.int64(64), cx=torch.tensor([31.5]))
    assert (type(cam.fx), type(cam.width), type(cam.cx)) == (float, int, float) and cam.width == 64


def test_camera_from_dict_names_unknown_keys_of_any_type():
    d = {**_cam().to_dict(), 7: "x", "zoom": 2}  # found by fuzzing: sorting int and str keys raised TypeError
    with pytest.raises(FormatError, match=r"unknown key\(s\) \['7', 'zoom'\]"):
        Camera.from_dict(d)


def test_look_at_default_sees_the_face():
    cam = Camera.look_at(width=64, height=48)  # at (0, 0, 1), looking at the origin, +y up
    torch.testing.assert_close(cam.center, torch.tensor([0.0, 0.0, 1.0]))
    uv = cam.project(torch.tensor([[0.0, 0.0, 0.0], [0.05, 0.0, 0.0], [0.0, 0.05, 0.0]]))
    torch.testing.assert_close(uv[0], torch.tensor([31.5, 23.5]))  # the image centre
    assert uv[1, 0] > 31.5 and abs(float(uv[1, 1]) - 23.5) < 1e-4  # world +x is to the right
    assert uv[2, 1] < 23.5  # world +y is up (row 0 is the top)
    assert math.isclose(cam.fx, 32 / math.tan(math.radians(10)), rel_tol=1e-6) and cam.fy == cam.fx
    # det(R) = +1 and the camera looks along -z
    assert abs(float(torch.linalg.det(cam.R.double())) - 1) < 1e-6
    torch.testing.assert_close(cam.R[2], torch.tensor([0.0, 0.0, -1.0]))


def test_look_at_rejects_degenerate_input():
    with pytest.raises(InputError, match="coincide"):
        Camera.look_at(eye=(0, 0, 0), target=(0, 0, 0))
    with pytest.raises(InputError, match="parallel"):
        Camera.look_at(eye=(0, 1, 0), target=(0, 0, 0))


def test_camera_dict_round_trip_is_json_safe():
    cam = Camera.look_at(eye=(0.3, 0.1, 0.9), fx=500.0, width=128, height=96)
    d = json.loads(json.dumps(cam.to_dict()))
    back = Camera.from_dict(d)
    torch.testing.assert_close(back.R, cam.R)
    torch.testing.assert_close(back.t, cam.t)
    assert (back.fx, back.fy, back.cx, back.cy, back.width, back.height) == (
        cam.fx, cam.fy, cam.cx, cam.cy, cam.width, cam.height)
    with pytest.raises(FormatError, match="missing"):
        Camera.from_dict({k: v for k, v in d.items() if k != "fx"})
    with pytest.raises(FormatError, match="unknown"):
        Camera.from_dict({**d, "fov": 3})


def test_world_to_clip_follows_the_projection_convention():
    cam = Camera.look_at(eye=(0.2, -0.1, 0.9), target=(0.01, 0.02, 0.0), fx=300.0, fy=280.0, cx=40.0, cy=20.0,
                         width=64, height=48)
    n, f = 0.1, 2.0
    pts = torch.randn(50, 3, dtype=torch.float64) * 0.1
    clip = cam.world_to_clip(pts, n, f)
    assert clip.dtype == torch.float64 and clip.shape == (50, 4)
    X = cam.world_to_camera(pts)
    uv = cam.project(pts)
    torch.testing.assert_close(clip[:, 3], X[:, 2])  # w = Z
    torch.testing.assert_close(clip[:, 0] / clip[:, 3], 2 * (uv[:, 0] + 0.5) / 64 - 1)
    torch.testing.assert_close(clip[:, 1] / clip[:, 3], 2 * (uv[:, 1] + 0.5) / 48 - 1)
    torch.testing.assert_close(clip[:, 2], (f + n) / (f - n) * X[:, 2] - 2 * f * n / (f - n))
    # float32 in, float32 out
    assert cam.world_to_clip(pts.float()).dtype == torch.float32


def test_depth_channel_range_ends():
    cam = Camera.look_at(width=8, height=8)
    pts = torch.tensor([[0.0, 0.0, 0.9], [0.0, 0.0, -1.0]], dtype=torch.float64)  # Z = 0.1 and Z = 2
    clip = cam.world_to_clip(pts, 0.1, 2.0)
    torch.testing.assert_close(clip[:, 2], torch.tensor([-0.1, 2.0], dtype=torch.float64))
    P = cam.projection(0.1, 2.0)
    assert P.shape == (4, 4) and P[3, 2] == -1 and P[1, 1] < 0  # OpenGL, y flipped
    with pytest.raises(InputError, match="znear"):
        cam.projection(2.0, 0.1)


def test_row_r_centre_is_opencv_v_equals_r():
    cam = _cam()
    for r in (0, 7, 47):
        ndc_centre = 2 * (r + 0.5) / cam.height - 1  # nvdiffrast: row r covers [2r/H - 1, 2(r+1)/H - 1]
        # the world point on the ray through OpenCV pixel (cx, v=r) at depth Z = 1.5
        Xc = torch.tensor([0.0, (r - cam.cy) / cam.fy * 1.5, 1.5], dtype=torch.float64)
        pw = (cam.R.double().T @ (Xc - cam.t.double()))[None]
        clip = cam.world_to_clip(pw)
        assert abs(float(clip[0, 1] / clip[0, 3]) - ndc_centre) < 1e-9


def test_scaled_keeps_pixel_edges_aligned():
    cam = _cam()
    big = cam.scaled(128, 96)
    pts = torch.randn(10, 3) * 0.05
    torch.testing.assert_close(big.project(pts), (cam.project(pts) + 0.5) * 2 - 0.5, rtol=1e-5, atol=1e-4)
    assert (big.width, big.height) == (128, 96)


# -- Mesh ------------------------------------------------------------------------------------------
def test_mesh_converts_and_reports():
    m = Mesh(np.zeros((3, 3)) + np.eye(3), [[0, 1, 2]], np.zeros((3, 5)))
    assert m.vertices.dtype == torch.float32 and m.faces.dtype == torch.int64 and m.canonical_dims == 5
    assert (m.num_vertices, m.num_faces) == (3, 1)
    assert "V=3" in repr(m)


def test_mesh_faces_past_the_vertex_count():
    v = torch.randn(800, 3)
    f = torch.tensor([[0, 1, 2], [3, 812, 5]])
    with pytest.raises(InputError, match="faces index vertex 812 but the mesh has 800 vertices"):
        Mesh(v, f, v)
    with pytest.raises(InputError, match="negative"):
        Mesh(v, torch.tensor([[0, -1, 2]]), v)


@pytest.mark.parametrize("where", ["vertices", "canonical"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_mesh_rejects_nan_and_inf(where, bad):
    v, c = torch.randn(4, 3), torch.randn(4, 5)
    {"vertices": v, "canonical": c}[where][2, 1] = bad
    with pytest.raises(InputError, match=f"Mesh.{where} holds") as e:
        Mesh(v, [[0, 1, 2]], c)
    assert ("1 NaN" if math.isnan(bad) else "1 Inf") in str(e.value) and "(2, 1)" in str(e.value)


def test_mesh_rejects_empty_and_bad_shapes():
    with pytest.raises(InputError, match="at least 3 vertices"):
        Mesh(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.int64), torch.zeros(0, 3))
    with pytest.raises(InputError, match="no faces"):
        Mesh(torch.randn(3, 3), torch.zeros(0, 3, dtype=torch.int64), torch.randn(3, 3))
    with pytest.raises(InputError, match=r"\[V, 3\] or \[V, 5\]"):
        Mesh(torch.randn(3, 3), [[0, 1, 2]], torch.randn(3, 4))
    with pytest.raises(InputError, match="one per vertex"):
        Mesh(torch.randn(3, 3), [[0, 1, 2]], torch.randn(4, 3))
    with pytest.raises(InputError, match=r"\[F, 3\]"):
        Mesh(torch.randn(4, 3), [[0, 1, 2, 3]], torch.randn(4, 3))
    with pytest.raises(InputError, match="integer"):
        Mesh(torch.randn(3, 3), [[0.0, 1.5, 2.0]], torch.randn(3, 3))
    with pytest.raises(InputError, match="normals"):
        Mesh(torch.randn(3, 3), [[0, 1, 2]], torch.randn(3, 3), normals=torch.randn(2, 3))


def test_vertex_normals_point_outward_and_are_unit():
    cube = _cube()
    n = cube.vertex_normals()
    torch.testing.assert_close(n.norm(dim=1), torch.ones(8))
    # each corner's normal leans into the corner's octant (not exactly diagonal: the corners touch 1 or 2
    # triangles of each face, and the weights are areas)
    assert (torch.sign(n) == torch.sign(cube.vertices)).all()
    assert ((n * cube.vertices / cube.vertices.norm(dim=1, keepdim=True)).sum(1) > 0.9).all()
    # area weighting: a big and a small face around one vertex
    v = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0.1]])
    f = torch.tensor([[0, 1, 2], [0, 3, 1]])  # normals +z (area 0.5) and +y... (area 0.05)
    nv = vertex_normals(v, f)[0]
    assert nv[2] > 0.95 and nv[1] > 0  # dominated by the larger face


def test_given_normals_are_used():
    cube = _cube()
    given = -cube.vertex_normals()
    m = Mesh(cube.vertices, cube.faces, cube.canonical, normals=given)
    torch.testing.assert_close(m.vertex_normals(), given)


def test_save_load_round_trip(tmp_path):
    cube = _cube()
    for mesh in (cube, Mesh(cube.vertices, cube.faces, torch.randn(8, 5), normals=cube.vertex_normals())):
        p = mesh.save(tmp_path / "sub" / "m.npz")
        back = Mesh.load(p)
        torch.testing.assert_close(back.vertices, mesh.vertices)
        torch.testing.assert_close(back.faces, mesh.faces)
        torch.testing.assert_close(back.canonical, mesh.canonical)
        assert (back.normals is None) == (mesh.normals is None)
    assert sorted(x.name for x in (tmp_path / "sub").iterdir()) == ["m.npz"]  # no temp file left behind
    with pytest.raises(InputError, match=".npz"):
        cube.save(tmp_path / "m.obj")


def test_load_errors_are_format_errors(tmp_path):
    with pytest.raises(FormatError, match="does not exist"):
        Mesh.load(tmp_path / "nope.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"this is not a zip file")
    with pytest.raises(FormatError, match="not a readable"):
        Mesh.load(bad)
    partial = tmp_path / "partial.npz"
    np.savez(partial, vertices=np.zeros((3, 3), np.float32), faces=np.array([[0, 1, 2]]))
    with pytest.raises(FormatError, match="canonical"):
        Mesh.load(partial)
    invalid = tmp_path / "invalid.npz"
    np.savez(invalid, vertices=np.zeros((3, 3), np.float32), faces=np.array([[0, 1, 9]]),
             canonical=np.zeros((3, 3), np.float32))
    with pytest.raises(FormatError, match="faces index vertex 9"):
        Mesh.load(invalid)
    newer = tmp_path / "newer.npz"
    np.savez(newer, version=99, vertices=np.zeros((3, 3), np.float32), faces=np.array([[0, 1, 2]]),
             canonical=np.zeros((3, 3), np.float32))
    with pytest.raises(FormatError, match="newer"):
        Mesh.load(newer)


def test_with_vertices_and_to():
    cube = _cube()
    moved = cube.with_vertices(cube.vertices + 1)
    assert moved.faces is cube.faces and moved.canonical is cube.canonical
    torch.testing.assert_close(moved.vertices, cube.vertices + 1)
    with pytest.raises(InputError, match="with_vertices"):
        cube.with_vertices(torch.zeros(3, 3))
    same = cube.to("cpu")
    torch.testing.assert_close(same.vertices, cube.vertices)
