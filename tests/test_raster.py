import math

import numpy as np
import pytest
import torch

from engine.errors import BackendError, ConfigError, InputError
from engine.geometry import Camera, Mesh
from engine.heads import builtin_head_mesh
from engine.raster import BACKENDS, RasterBuffers, rasterize
from engine.raster.torch_raster import rasterize_torch

N, F = 0.1, 2.0  # znear, zfar
# The CPU backends: each is checked against the closed forms and brute-force ray casting below.
CPU_BACKENDS = pytest.mark.parametrize("backend", ["torch", "numba"])


def _depth(Z):
    return (F + N) / (F - N) * Z - 2 * F * N / (F - N)


def _canon(p):
    """An affine map world -> 5-D canonical coordinates (perspective-correct interpolation reproduces it exactly)."""
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    return np.stack([2 * x + 0.1, 3 * y - 0.2, 4 * z, x + y, 0.5 * z - x], -1)


def _rays(cam: Camera):
    """World-space origin [3] and unnormalised directions [H, W, 3] (camera-space z = 1) through pixel centres."""
    r, c = np.meshgrid(np.arange(cam.height), np.arange(cam.width), indexing="ij")
    d = np.stack([(c - cam.cx) / cam.fx, (r - cam.cy) / cam.fy, np.ones_like(c, dtype=np.float64)], -1)
    R = cam.R.double().numpy()
    return cam.center.double().numpy(), d @ R  # (R^T d) for each d


class TiltedQuad:
    """A 0.4 x 0.3 m quad through `centre`, tilted by `tilt_deg` about the x axis (top edge away from the camera)."""

    def __init__(self, centre=(0.0, 0.0, 0.0), tilt_deg=60.0, a=0.2, b=0.15):
        th = math.radians(tilt_deg)
        self.c0 = np.asarray(centre, dtype=np.float64)
        self.ex = np.array([1.0, 0.0, 0.0])
        self.ey = np.array([0.0, math.cos(th), -math.sin(th)])
        self.n = np.cross(self.ex, self.ey)  # (0, sin, cos): toward the camera and up
        self.a, self.b = a, b
        corners = [(-a, -b), (a, -b), (a, b), (-a, b)]  # counter-clockwise seen from the camera (+z)
        self.v = np.array([self.c0 + s * self.ex + t * self.ey for s, t in corners])

    def mesh(self, extra_faces=()):
        faces = [[0, 1, 2], [0, 2, 3], *extra_faces]
        v = torch.tensor(self.v, dtype=torch.float32)
        return Mesh(v, torch.tensor(faces), torch.tensor(_canon(self.v)).float())

    def analytic(self, cam: Camera, zfar: float = F):
        """Per pixel: inside (bool), ambiguous (bool, centre within 1e-4 m of the border), Z, canonical, normal."""
        o, d = _rays(cam)
        t = ((self.c0 - o) @ self.n) / (d @ self.n)
        p = o + t[..., None] * d
        al, be = (p - self.c0) @ self.ex, (p - self.c0) @ self.ey
        inside = (np.abs(al) <= self.a) & (np.abs(be) <= self.b) & (t >= N) & (t <= zfar)
        amb = (np.abs(np.abs(al) - self.a) < 1e-4) | (np.abs(np.abs(be) - self.b) < 1e-4) | (np.abs(t - zfar) < 1e-4)
        return inside, amb, t, _canon(p), self.n


CAM = Camera.look_at(width=64, height=48, fx=70.0)


@CPU_BACKENDS
def test_tilted_quad_matches_ray_plane_intersection(backend):
    quad = TiltedQuad()
    rb = rasterize(quad.mesh(), CAM, backend=backend)
    assert rb.mask.shape == (1, 48, 64, 1) and rb.canonical.shape == (1, 48, 64, 5)
    assert all(t.dtype == torch.float32 for t in (rb.mask, rb.depth, rb.canonical, rb.normals))
    inside, amb, Z, canon, n = quad.analytic(CAM)
    mask = rb.mask[0, ..., 0].numpy() > 0.5
    assert inside.sum() > 300  # a real test: many pixels covered
    np.testing.assert_array_equal(mask[~amb], inside[~amb])
    on = inside & ~amb
    np.testing.assert_allclose(rb.depth[0, ..., 0].numpy()[on], _depth(Z)[on], atol=2e-6)
    np.testing.assert_allclose(rb.canonical[0].numpy()[on], canon[on], atol=5e-6)
    np.testing.assert_allclose(rb.normals[0].numpy()[on], np.broadcast_to(n, (on.sum(), 3)), atol=1e-6)
    # The check has teeth: on this tilted plane, screen-space-linear interpolation would be far off.
    r, c = np.nonzero(on)
    A = np.stack([r, c, np.ones_like(r)], 1).astype(np.float64)
    fit = A @ np.linalg.lstsq(A, canon[on][:, 2], rcond=None)[0]
    assert np.abs(fit - canon[on][:, 2]).max() > 1e-2
    # Background is zero everywhere.
    off = ~mask
    for t in (rb.depth, rb.canonical, rb.normals):
        assert (t[0].numpy()[off] == 0).all()


@CPU_BACKENDS
def test_quad_straddling_zfar_is_cut_per_fragment(backend):
    quad = TiltedQuad(centre=(0.0, 0.0, -0.9), tilt_deg=75.0, a=0.4, b=0.4)  # Z from about 1.5 to 2.3
    rb = rasterize(quad.mesh(), CAM, backend=backend)
    inside, amb, Z, _, _ = quad.analytic(CAM)
    whole = quad.analytic(CAM, zfar=np.inf)[0]
    assert inside.sum() > 150 and (whole & ~inside).sum() > 50  # both parts are substantial
    np.testing.assert_array_equal((rb.mask[0, ..., 0].numpy() > 0.5)[~amb], inside[~amb])


def _facing_quad(z, half, value, D=3):
    v = torch.tensor([[-half, -half, z], [half, -half, z], [half, half, z], [-half, half, z]])
    return v, torch.tensor([[0, 1, 2], [0, 2, 3]]), torch.full((4, D), float(value))


def _merge(*parts):
    vs, fs, cs, off = [], [], [], 0
    for v, f, c in parts:
        vs.append(v), fs.append(f + off), cs.append(c)
        off += v.shape[0]
    return Mesh(torch.cat(vs), torch.cat(fs), torch.cat(cs))


@CPU_BACKENDS
def test_nearer_triangle_occludes_farther_in_any_order(backend):
    near = _facing_quad(0.2, 0.05, 1.0)  # Z = 0.8
    far = _facing_quad(-0.2, 0.2, 2.0)  # Z = 1.2
    a = rasterize(_merge(near, far), CAM, backend=backend)
    b = rasterize(_merge(far, near), CAM, backend=backend)
    for k in ("mask", "depth", "canonical", "normals"):
        torch.testing.assert_close(getattr(a, k), getattr(b, k), rtol=0, atol=0)
    assert a.canonical[0, 24, 32, 0] == 1.0 and abs(float(a.depth[0, 24, 32, 0]) - _depth(0.8)) < 1e-5
    assert a.canonical[0, 24, 40, 0] == 2.0 and abs(float(a.depth[0, 24, 40, 0]) - _depth(1.2)) < 1e-5
    assert a.mask[0, ..., 0].sum() == rasterize(_merge(far), CAM, backend=backend).mask.sum()


@pytest.mark.parametrize("z", [1.5, 0.95, -1.5, -2.5])  # behind the camera, nearer than znear, beyond zfar (x2)
@CPU_BACKENDS
def test_empty_image_outside_the_depth_range(z, backend):
    rb = rasterize(_merge(_facing_quad(z, 0.01 if z == 0.95 else 0.5, 1.0)), CAM, backend=backend)
    for t in (rb.mask, rb.depth, rb.canonical, rb.normals):
        assert (t == 0).all()


@CPU_BACKENDS
def test_triangle_crossing_the_camera_plane_is_dropped(backend):
    v = torch.tensor([[-0.1, -0.1, 0.5], [0.1, -0.1, 0.5], [0.0, 0.1, 1.5]])  # last vertex behind the camera
    rb = rasterize(Mesh(v, [[0, 1, 2]], v), CAM, backend=backend)
    assert rb.mask.sum() == 0


@CPU_BACKENDS
def test_degenerate_triangles_are_harmless(backend):
    quad = TiltedQuad()
    base = rasterize(quad.mesh(), CAM, backend=backend)
    v = np.concatenate([quad.v, [[0.0, 0.0, 0.0], [0.1, 0.1, 0.05], [0.2, 0.2, 0.1]]])
    faces = [[0, 1, 2], [0, 2, 3], [0, 0, 1], [4, 5, 6], [2, 2, 2]]  # repeated vertex, collinear, a point
    mesh = Mesh(torch.tensor(v).float(), torch.tensor(faces), torch.tensor(_canon(v)).float())
    rb = rasterize(mesh, CAM, backend=backend)
    for k in ("mask", "depth", "canonical"):
        torch.testing.assert_close(getattr(rb, k), getattr(base, k), rtol=0, atol=0)
    assert torch.isfinite(rb.normals).all()


@CPU_BACKENDS
def test_shared_edges_leave_no_holes(backend):
    # A jittered 12 x 12 grid of quads (288 triangles) in a plane: every pixel inside the outline is covered.
    g = torch.Generator().manual_seed(0)
    n = 13
    s = torch.linspace(-0.2, 0.2, n)
    y, x = torch.meshgrid(s, s, indexing="ij")
    jitter = (torch.rand(n, n, 2, generator=g) - 0.5) * 0.02
    jitter[[0, -1], :] = 0
    jitter[:, [0, -1]] = 0
    v = torch.stack([x + jitter[..., 0], y + jitter[..., 1], 0.1 * x], -1).reshape(-1, 3)
    idx = torch.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, 1:], idx[1:, :-1]
    faces = torch.cat([torch.stack([a, b, c], -1).reshape(-1, 3), torch.stack([a, c, d], -1).reshape(-1, 3)])
    cam = Camera.look_at(width=160, height=120, fx=200.0)
    rb = rasterize(Mesh(v, faces, v), cam, backend=backend)
    uv = cam.project(v.reshape(n, n, 3)[[0, -1]][:, [0, -1]].reshape(4, 3))
    u0, u1 = sorted([float(uv[:, 0].min()), float(uv[:, 0].max())])
    v0, v1 = sorted([float(uv[:, 1].min()), float(uv[:, 1].max())])
    # The outline is a trapezoid (the plane is tilted about y); test the box strictly inside it.
    inner = rb.mask[0, math.ceil(v0) + 2 : math.floor(v1) - 1, math.ceil(u0) + 2 : math.floor(u1) - 1, 0]
    assert inner.numel() > 5000 and (inner == 1).all()


@CPU_BACKENDS
def test_covering_triangle_and_chunking(backend):
    big = torch.tensor([[-50.0, -50.0, 0.0], [50.0, -50.0, 0.0], [0.0, 50.0, 0.0]])
    mesh = Mesh(big, [[0, 1, 2]], big)
    rb = rasterize(mesh, CAM, backend=backend)
    assert (rb.mask == 1).all()
    torch.testing.assert_close(rb.depth, torch.full_like(rb.depth, _depth(1.0)))
    small = rasterize_torch(mesh, CAM, max_candidates=100)
    for k in ("mask", "depth", "canonical", "normals"):
        torch.testing.assert_close(getattr(small, k), getattr(rb, k), rtol=0, atol=0)


def test_chunking_does_not_change_the_head():
    head = builtin_head_mesh(3)
    cam = Camera.look_at(eye=(0.5, 0.2, 0.8), width=96, height=96)
    a = rasterize_torch(head, cam)
    b = rasterize_torch(head, cam, max_candidates=257)
    for k in ("mask", "depth", "canonical", "normals"):
        torch.testing.assert_close(getattr(a, k), getattr(b, k), rtol=0, atol=0)


def _brute_force(mesh: Mesh, cam: Camera, normals: np.ndarray):
    """Independent reference: cast each pixel's ray against every triangle (Moller-Trumbore, float64)."""
    o, d = _rays(cam)
    d = d.reshape(-1, 3)
    V = mesh.vertices.double().numpy()
    tri = V[mesh.faces.numpy()]  # [F, 3, 3]
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    p = np.cross(d[:, None], e2[None])  # [P, F, 3]
    det = (e1[None] * p).sum(-1)
    s = o - tri[:, 0]
    inv = 1 / np.where(np.abs(det) < 1e-15, np.nan, det)
    u = (s[None] * p).sum(-1) * inv
    q = np.cross(s, e1)  # [F, 3]
    v = (d[:, None] * q[None]).sum(-1) * inv
    t = (e2 * q).sum(-1)[None] * inv  # camera depth Z, since d has camera z = 1
    bary = np.stack([1 - u - v, u, v], -1)  # [P, F, 3]
    bmin = bary.min(-1)
    inrange = (t >= N) & (t <= F)
    hit = (bmin > 1e-4) & inrange
    ambiguous = ((np.abs(bmin) <= 1e-4) & (t > 0)) | (np.abs(t - N) < 1e-6) | (np.abs(t - F) < 1e-6)
    tz = np.where(hit, t, np.inf)
    order = np.argsort(tz, axis=1)
    first = order[:, 0]
    P = np.arange(d.shape[0])
    z1, z2 = tz[P, first], tz[P, order[:, 1]]
    with np.errstate(invalid="ignore"):  # inf - inf where nothing is hit
        robust = ~ambiguous.any(1) & ~(np.isfinite(z1) & (z2 - z1 < 1e-5))
    w = bary[P, first]  # [P, 3]: 3-D barycentrics = perspective-correct weights
    fv = mesh.faces.numpy()[first]
    canon = (w[..., None] * mesh.canonical.double().numpy()[fv]).sum(1)
    nrm = (w[..., None] * normals[fv]).sum(1)
    nrm /= np.linalg.norm(nrm, axis=-1, keepdims=True)
    H, W = cam.height, cam.width
    return (np.isfinite(z1).reshape(H, W), robust.reshape(H, W), _depth(z1).reshape(H, W),
            canon.reshape(H, W, -1), nrm.reshape(H, W, 3))


@CPU_BACKENDS
def test_random_triangle_soup_matches_brute_force_ray_casting(backend):
    g = np.random.default_rng(0)
    T = 40
    centres = np.stack([g.uniform(-0.2, 0.2, T), g.uniform(-0.15, 0.15, T), g.uniform(-0.5, 0.6, T)], 1)
    v = (centres[:, None] + g.normal(0, 0.07, (T, 3, 3))).reshape(-1, 3)
    normals = g.normal(size=(3 * T, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    canonical = torch.tensor(g.normal(size=(3 * T, 5))).float()
    mesh = Mesh(torch.tensor(v).float(), torch.arange(3 * T).reshape(T, 3), canonical,
                normals=torch.tensor(normals).float())
    cam = Camera.look_at(width=80, height=60, fx=90.0)
    rb = rasterize(mesh, cam, backend=backend)
    hit, robust, depth, canon, nrm = _brute_force(Mesh(mesh.vertices.double(), mesh.faces, mesh.canonical), cam,
                                                   mesh.normals.double().numpy())
    assert robust.mean() > 0.8 and (hit & robust).sum() > 1000 and (~hit & robust).sum() > 300
    mask = rb.mask[0, ..., 0].numpy() > 0.5
    np.testing.assert_array_equal(mask[robust], hit[robust])
    on = hit & robust
    np.testing.assert_allclose(rb.depth[0, ..., 0].numpy()[on], depth[on], atol=2e-5)
    np.testing.assert_allclose(rb.canonical[0].numpy()[on], canon[on], atol=5e-5)
    np.testing.assert_allclose(rb.normals[0].numpy()[on], nrm[on], atol=5e-5)


@CPU_BACKENDS
def test_builtin_head_buffers_are_sane(backend):
    head = builtin_head_mesh()
    cam = Camera.look_at(width=128, height=128)
    rb = rasterize(head, cam, backend=backend)
    m = rb.mask[0, ..., 0] > 0.5
    assert 0.1 < m.float().mean() < 0.6
    torch.testing.assert_close(rb.normals[0][m].norm(dim=-1), torch.ones(int(m.sum())), atol=1e-5, rtol=0)
    assert (rb.normals[0][m][:, 2] > -0.2).float().mean() > 0.99  # visible surfaces face the camera
    d = rb.depth[0, ..., 0][m]
    assert (d > _depth(0.85)).all() and (d < _depth(1.15)).all()
    amb = rb.ambient[0][m]
    assert amb.abs().max() < 0.2 and amb.std() > 0.01
    # left-right mirror symmetry of the head and of the centred camera (edges may round differently)
    assert (m != m.flip(1)).float().mean() < 0.01


@CPU_BACKENDS
def test_identical_inputs_give_bit_identical_buffers(backend):
    head = builtin_head_mesh(3)
    cam = Camera.look_at(eye=(0.4, 0.1, 0.9), width=96, height=80)
    a, b = rasterize(head, cam, backend=backend), rasterize(head, cam, backend=backend)
    for k in ("mask", "depth", "canonical", "normals"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k


def test_raster_buffers_cat_and_to():
    head = builtin_head_mesh(2)
    a = rasterize(head, Camera.look_at(width=32, height=24))
    b = rasterize(head, Camera.look_at(eye=(0.3, 0.0, 0.9), width=32, height=24))
    ab = RasterBuffers.cat([a, b])
    assert ab.batch == 2 and (ab.height, ab.width, ab.canonical_dims) == (24, 32, 5)
    torch.testing.assert_close(ab.depth[1:], b.depth)
    assert ab.to("cpu").mask.shape == (2, 24, 32, 1)
    assert ab.xyz.shape == (2, 24, 32, 3) and ab.ambient.shape == (2, 24, 32, 2)
    with pytest.raises(InputError, match="one size"):
        RasterBuffers.cat([a, rasterize(head, Camera.look_at(width=16, height=16))])
    with pytest.raises(InputError):
        RasterBuffers.cat([])
    three = Mesh(head.vertices, head.faces, head.canonical[:, :3])
    c = rasterize(three, Camera.look_at(width=32, height=24))
    assert c.canonical.shape == (1, 24, 32, 3) and c.ambient is None


def test_backend_registry_and_errors():
    assert set(BACKENDS) == {"torch", "numba", "nvdiffrast"}
    head = builtin_head_mesh(1)
    cam = Camera.look_at(width=16, height=16)
    with pytest.raises(ConfigError, match=r"\['auto', 'torch', 'numba', 'nvdiffrast'\]"):
        rasterize(head, cam, backend="opengl")
    with pytest.raises(BackendError, match="nvdiffrast"):
        rasterize(head, cam, backend="nvdiffrast")  # CPU mesh (and, here, no nvdiffrast)
    with pytest.raises(InputError, match="znear"):
        rasterize(head, cam, znear=0.0)
    with pytest.raises(InputError, match="Mesh, Camera"):
        rasterize(cam, head)


def test_mesh_uploader_copies_a_topology_once_and_vertices_every_frame():
    from engine.data.synthetic import SyntheticHead
    from engine.raster import MeshUploader

    head = SyntheticHead()
    upload = MeshUploader("meta")  # a device other than the meshes': tensors move without computing anything
    first, second = (upload(head.posed_mesh(torch.full((8,), v))) for v in (0.2, 0.7))
    assert first.device.type == "meta" and second.vertices.device.type == "meta"
    assert first.faces is second.faces and first.canonical is second.canonical  # uploaded once
    assert first.vertices is not second.vertices
    other = upload(Mesh(head.neutral_mesh().vertices, head.neutral_mesh().faces.clone(),
                        head.neutral_mesh().canonical))
    assert other.faces is not first.faces  # a new topology is uploaded
    on_cpu = head.neutral_mesh()
    assert MeshUploader("cpu")(on_cpu) is on_cpu
