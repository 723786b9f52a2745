"""Fuzzing (hypothesis) of the readers of what a user hands the engine: sequence files, avatar folders and cameras.

Every generated input either works or raises the project's error type (`engine.errors.AvatarError`), never a raw
TypeError, KeyError, ValueError or AssertionError. Inputs are mutations of a valid document (a value replaced by
any JSON value, a key removed or added, up to three times), so most of them get past the first checks. Runs are
deterministic (`derandomize`, no example database) and bounded in examples.
"""

import copy
import json
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from engine.config import from_preset
from engine.errors import AvatarError
from engine.geometry import Camera
from engine.model import Avatar, read_config
from engine.sequence import orbit, read_sequence, write_sequence


def fuzz(examples: int):
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


TINY = from_preset("tiny")
SCALARS = (st.none() | st.booleans() | st.integers(-3, 600) | st.integers(-2**70, 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                         max_size=4), max_leaves=10)
DELETE = object()
PATHS = re.compile(r"/\S+")


def _similar(value):
    """Values of the same JSON type as `value` (so that a mutation gets past the type checks)."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.integers(-3, 600) | st.integers(-2**70, 2**70)
    if isinstance(value, float):
        return st.floats(allow_nan=True, allow_infinity=True) | st.floats(-2, 2)
    if isinstance(value, str):
        return st.text(max_size=8) | st.sampled_from(["builtin:head", "mesh:x.npz", "synthetic", "DownBlock2D",
                                                      "CrossAttnUpBlock2D", "linear", "leading", "epsilon"])
    return JSON


def _mutate(draw, node):
    """`node` with one value somewhere below it replaced (by any JSON value or one of the same type), removed
    (DELETE, to the parent) or added."""
    children = list(node) if isinstance(node, dict) else list(range(len(node))) if isinstance(node, list) else []
    if children and draw(st.integers(0, 3)):
        key = draw(st.sampled_from(children))
        child = _mutate(draw, node[key])
        if child is DELETE:
            del node[key]
        else:
            node[key] = child
        return node
    action = draw(st.sampled_from(["similar", "replace", "delete", "add"] if isinstance(node, (dict, list))
                                  else ["similar", "similar", "replace", "delete"]))
    if action == "delete":
        return DELETE
    if action == "add" and isinstance(node, dict):
        node[draw(st.text(max_size=12))] = draw(JSON)
    elif action == "add":
        node.insert(draw(st.integers(0, len(node))), draw(JSON))
    else:
        node = draw(_similar(node) if action == "similar" else JSON)
    return node


@st.composite
def mutations(draw, base):
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        doc = _mutate(draw, doc)
        doc = draw(JSON) if doc is DELETE else doc
    return doc


# -- sequence files ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sequence_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-sequence")
    frames = orbit(TINY, frames=2)
    frames[1].mesh = Avatar.from_preset("tiny").head_model.posed_mesh(frames[1].expression)
    write_sequence(folder / "base.json", frames, expression_names=TINY.expression_names)
    return folder


def _read(path):
    try:
        frames = read_sequence(path, TINY)
    except AvatarError:
        return
    for frame in frames:
        assert frame.expression.shape == (TINY.expression_dim,) and torch.isfinite(frame.expression).all()
        assert (frame.camera.width, frame.camera.height) == (TINY.image_size, TINY.image_size)


@fuzz(300)
@given(data=st.data())
def test_the_sequence_reader(sequence_folder, data):
    base = json.loads((sequence_folder / "base.json").read_text())  # never rewritten
    path = sequence_folder / "fuzzed.json"
    path.write_text(json.dumps(data.draw(mutations(base))))
    _read(path)


@fuzz(30)
@given(raw=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_the_sequence_reader_on_any_bytes(sequence_folder, raw):
    path = sequence_folder / "bytes.json"
    path.write_bytes(raw)
    with pytest.raises(AvatarError):
        read_sequence(path, TINY)


# -- avatar folders ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def avatar_folder(tmp_path_factory):
    """The tiny preset, saved once per module: its weights stay, each example rewrites config.json."""
    folder = tmp_path_factory.mktemp("fuzz-avatar")
    Avatar.from_preset("tiny").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def saved_config(avatar_folder):
    return json.loads((avatar_folder / "config.json").read_text())


FORMAT_KEYS = ("format", "format_version")


@fuzz(400)
@given(data=st.data())
def test_the_avatar_config_reader(avatar_folder, saved_config, data):
    """config.json mutated anywhere, its format fields too."""
    (avatar_folder / "config.json").write_text(json.dumps(data.draw(mutations(saved_config))))
    try:
        read_config(avatar_folder)
    except AvatarError:
        pass


@fuzz(100)
@given(data=st.data())
def test_the_avatar_folder_loader(avatar_folder, saved_config, data):
    """The config mutated below its format fields, loaded with the tiny weights: most fit no weights, some load."""
    body = data.draw(mutations({k: v for k, v in saved_config.items() if k not in FORMAT_KEYS}))
    doc = {**{k: saved_config[k] for k in FORMAT_KEYS}, **body} if isinstance(body, dict) else body
    (avatar_folder / "config.json").write_text(json.dumps(doc))
    try:
        avatar = Avatar.from_pretrained(avatar_folder)
    except AvatarError as e:
        event(type(e).__name__ + ": " + PATHS.sub("", str(e))[:40])
        return
    event("loaded")
    assert avatar.config.expression_dim >= 1 and not avatar.is_meta


# -- cameras ----------------------------------------------------------------------------------------------
def _rotation(q) -> list[list[float]]:
    w, x, y, z = np.asarray(q) / np.linalg.norm(q)
    return [[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]]


FLOATS = st.floats(-1e3, 1e3)
VALID = {
    "R": st.lists(st.floats(-1, 1), min_size=4, max_size=4).map(lambda q: _rotation([q[0] + 2, *q[1:]])),
    "t": st.lists(FLOATS, min_size=3, max_size=3),
    "fx": st.floats(1e-3, 1e4), "fy": st.floats(1e-3, 1e4), "cx": FLOATS, "cy": FLOATS,
    "width": st.integers(1, 4096), "height": st.integers(1, 4096),
}
ARRAYS = hnp.arrays(st.sampled_from([np.float32, np.float64, np.int64, np.bool_, np.complex64, np.uint8]),
                    hnp.array_shapes(min_dims=0, max_dims=3, max_side=4))
JUNK = (JSON | ARRAYS | ARRAYS.map(lambda a: torch.from_numpy(a) if a.dtype != np.uint8 else a.tolist())
        | st.complex_numbers() | st.sampled_from([np.float32(2.0), np.int64(128), np.complex64(1j), np.bool_(True)]))


@st.composite
def camera_fields(draw):
    fields = {name: draw(strategy) for name, strategy in VALID.items()}
    for name in draw(st.lists(st.sampled_from(sorted(VALID)), max_size=3, unique=True)):
        fields[name] = draw(JUNK)
    return fields


def _check(camera: Camera) -> None:
    assert camera.R.shape == (3, 3) and camera.R.dtype == torch.float32 and camera.t.shape == (3,)
    assert torch.allclose(camera.R.double() @ camera.R.double().T, torch.eye(3, dtype=torch.float64), atol=1e-3)
    assert all(type(getattr(camera, k)) is float and math.isfinite(getattr(camera, k)) for k in ("fx", "fy", "cx",
                                                                                                 "cy"))
    assert camera.fx > 0 and camera.fy > 0 and type(camera.width) is int and camera.width > 0 and camera.height > 0


@fuzz(400)
@given(fields=camera_fields())
def test_camera_construction(fields):
    try:
        camera = Camera(**fields)
    except AvatarError:
        return
    _check(camera)


@fuzz(400)
@given(fields=camera_fields(), extra=st.dictionaries(st.text(max_size=4) | st.integers(), JSON, max_size=2),
       drop=st.lists(st.sampled_from(sorted(VALID)), max_size=2), other=st.none() | JUNK)
def test_camera_from_dict(fields, extra, drop, other):
    d = {k: v for k, v in fields.items() if k not in drop}
    d.update(extra)
    d = d if other is None else other
    try:
        camera = Camera.from_dict(d)
    except AvatarError:
        return
    _check(camera)
    assert Camera.from_dict(camera.to_dict()).to_dict() == camera.to_dict()
