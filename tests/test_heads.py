import numpy as np
import pytest
import torch

from engine.errors import ConfigError, FormatError, InputError
from engine.geometry import Camera
from engine.heads import (
    HeadModel,
    StaticHead,
    builtin_head_mesh,
    code_range,
    head_model_kinds,
    load_head_model,
    register_head_model,
)


@pytest.fixture(scope="module")
def head():
    return builtin_head_mesh()


def test_builtin_head_size_and_determinism(head):
    assert head.num_faces == 5120 and head.num_vertices == 2562 and head.canonical_dims == 5
    again = builtin_head_mesh()
    torch.testing.assert_close(again.vertices, head.vertices, rtol=0, atol=0)
    torch.testing.assert_close(again.canonical, head.canonical, rtol=0, atol=0)
    assert builtin_head_mesh(2).num_faces == 320
    with pytest.raises(InputError):
        builtin_head_mesh(9)


def test_builtin_head_is_closed_and_consistently_oriented(head):
    f = head.faces.numpy()
    directed = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    # closed, 2-manifold, consistently oriented: every directed edge once, and its reverse once
    assert len({tuple(e) for e in directed.tolist()}) == len(directed)
    assert {tuple(e) for e in directed.tolist()} == {tuple(e) for e in directed[:, ::-1].tolist()}
    assert head.num_vertices - len(directed) // 2 + head.num_faces == 2  # Euler characteristic of a sphere


def test_builtin_head_normals_point_outward(head):
    v, n = head.vertices, head.vertex_normals()
    torch.testing.assert_close(n.norm(dim=1), torch.ones(len(v)), atol=1e-5, rtol=0)
    outward = ((v - v.mean(0)) * n).sum(1) > 0
    assert outward.float().mean() > 0.97
    # the enclosed volume (divergence theorem) is positive for outward-facing triangles
    tri = v[head.faces].double()
    volume = torch.linalg.det(tri).sum() / 6
    assert 1e-3 < float(volume) < 5e-3  # a head is a few litres


def test_builtin_head_shape_and_placement(head):
    v = head.vertices
    lo, hi = v.min(0).values, v.max(0).values
    assert 0.17 < float(hi[1] - lo[1]) < 0.24  # about 0.2 m tall
    assert ((hi + lo) / 2).abs().max() < 0.03  # centred near the origin
    nose = v[v[:, 2].argmax()]
    assert abs(float(nose[0])) < 0.01 and float(nose[2]) > 0.1  # the face (nose) points to +z
    cam = Camera.look_at(width=256, height=256)  # 1 m away on +z
    Z = cam.world_to_camera(v)[:, 2]
    uv = cam.project(v)
    assert (Z > 0.1).all() and (Z < 2.0).all()
    assert (uv >= 0).all() and (uv <= 255).all()


def test_builtin_head_canonical_coordinates(head):
    c = head.canonical
    lo, hi = torch.tensor([-1.0, -1.0, -1.5]), torch.tensor([1.0, 1.0, 0.5])
    assert (c[:, :3] > lo).all() and (c[:, :3] < hi).all()  # inside model.md's normalisation box
    torch.testing.assert_close(c[:, :3], 4 * head.vertices)  # the NPHM scale
    amb = c[:, 3:]
    assert (amb.abs() < 0.2).all() and (amb.std(0) > 0.03).all()
    # smooth: neighbouring vertices have close ambient coordinates
    e = head.faces[:, [0, 1]]
    assert (amb[e[:, 0]] - amb[e[:, 1]]).abs().max() < 0.05


def test_static_head_ignores_the_expression(head):
    model = StaticHead(head)
    assert isinstance(model, HeadModel)
    a = model.posed_mesh(torch.zeros(8))
    b = model.posed_mesh(torch.ones(8))
    assert a is b and a.normals is not None
    assert model.to("cpu").posed_mesh(torch.zeros(8)).num_faces == head.num_faces
    with pytest.raises(ConfigError):
        StaticHead("not a mesh")


def test_load_head_model_specs(tmp_path, head):
    builtin = load_head_model("builtin:head")
    assert isinstance(builtin, StaticHead) and builtin.name == "builtin:head"
    assert builtin.posed_mesh(torch.zeros(3)).num_faces == head.num_faces
    assert load_head_model("none") is None
    small = builtin_head_mesh(1)
    small.save(tmp_path / "meshes" / "me.npz")
    loaded = load_head_model("mesh:meshes/me.npz", root=tmp_path)
    torch.testing.assert_close(loaded.posed_mesh(torch.zeros(1)).vertices, small.vertices)
    assert load_head_model(f"mesh:{tmp_path / 'meshes' / 'me.npz'}").name.startswith("mesh:")
    with pytest.raises(FormatError, match="does not exist"):
        load_head_model("mesh:missing.npz", root=tmp_path)
    for bad in ("flame", "builtin:tiger", "mesh:", "", "synthetic-x:1"):
        with pytest.raises(ConfigError):
            load_head_model(bad)
    with pytest.raises(ConfigError, match="builtin"):
        load_head_model("nphm_typo:abc")


def test_register_head_model():
    made = []

    def factory(arg, root):
        made.append((arg, root))
        return StaticHead(builtin_head_mesh(1), name=f"test:{arg}")

    register_head_model("unit-test-kind", factory)
    try:
        assert "unit-test-kind" in head_model_kinds()
        model = load_head_model("unit-test-kind:abc", root="/tmp")
        assert model.name == "test:abc" and made[0][0] == "abc" and str(made[0][1]) == "/tmp"
    finally:
        from engine.heads import _REGISTRY

        _REGISTRY.pop("unit-test-kind")
    with pytest.raises(ConfigError):
        register_head_model("bad:kind", factory)


def test_mesh_protocol_requires_posed_mesh():
    class NotAHead:
        name = "x"

    assert not isinstance(NotAHead(), HeadModel)


def test_code_range_is_what_the_head_model_declares():
    synthetic = load_head_model("synthetic")
    assert code_range(synthetic) == (0.0, 1.0)
    # it is what posed_mesh clamps to: 1.5 poses as 1, -0.5 as 0
    over, one = synthetic.posed_mesh(torch.full((8,), 1.5)), synthetic.posed_mesh(torch.ones(8))
    assert torch.equal(over.vertices, one.vertices)
    assert torch.equal(synthetic.posed_mesh(torch.full((8,), -0.5)).vertices, synthetic.posed_mesh(None).vertices)
    assert code_range(StaticHead(builtin_head_mesh(1))) is None and code_range(None) is None

    class Backwards:
        name, code_range = "backwards", (1.0, 0.0)

    with pytest.raises(ConfigError, match="low <= high"):
        code_range(Backwards())
