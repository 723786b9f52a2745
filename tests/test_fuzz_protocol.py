"""Fuzzing the live WebSocket protocol's reader (`engine.live.protocol.parse_message`): whatever a client sends
(JSON-ish objects near the documented messages, arbitrary JSON, garbage text and bytes, binary frames with any
header) either parses into a `Request` or raises `ProtocolError`; nothing else escapes to the server's loop.

Deterministic (`derandomize=True`, no example database) and a few seconds in all.
"""

from __future__ import annotations

import base64
import json
import math
import struct

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from engine.geometry import Camera
from engine.live.protocol import (
    CAMERA_KEYS,
    ORBIT_DEFAULTS,
    ORBIT_RANGES,
    ProtocolError,
    Request,
    StreamSpec,
    error_message,
    pack_binary,
    parse_camera,
    parse_code,
    parse_message,
    unpack_binary,
)

NAMES = ("jawOpen", "mouthSmileLeft", "mouthSmileRight", "browInnerUp")
# a small size limit, so that generated messages cross it too
NAMED = StreamSpec(32, 4, NAMES, steps=1, max_steps=4, backends=("reference", "compiled"), max_message_bytes=4096)
UNNAMED = StreamSpec(32, 3, None, steps=2, max_steps=3, max_message_bytes=4096)
TINY = StreamSpec(32, 4, NAMES, max_message_bytes=16)
FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=300,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# Numbers at the edges: JSON's own, huge integers (beyond a float's range), NaN and infinities (Python's json reads
# NaN / Infinity), booleans (an int subclass), and values just inside and outside the documented ranges.
NUMBERS = st.one_of(
    st.integers(), st.integers(min_value=-(10**400), max_value=10**400), st.floats(allow_nan=True),
    st.sampled_from([0, 1, -1, 2**53, 2**63, 10**308 * 10, 0.5, 9.99, 10.0, 10.0001, 1e308, -1e308, 80.0, 80.5,
                     0.3, 1.8, 1.81, 5.0, 90.0, True, False]),
)
TEXT = st.text(st.characters(codec="utf-8"), max_size=12) | st.sampled_from(["render", "video_frame", "jawOpen",
                                                                            "reference", "R", "yaw", ""])
SCALARS = st.none() | st.booleans() | NUMBERS | TEXT
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=5)
                    | st.dictionaries(TEXT, inner, max_size=5), max_leaves=20)


def _values(n):
    """A list of about `n` values: mostly numbers, sometimes anything."""
    return st.lists(NUMBERS | JSON, min_size=max(0, n - 1), max_size=n + 1)


def _mostly(valid, weird):
    """`valid` four times in five: a message must get past its other fields before a bad one is read."""
    return st.integers(0, 4).flatmap(lambda i: weird if i == 0 else valid)


GOOD_NUMBER = st.floats(-10, 10)
CODE = _mostly(st.lists(GOOD_NUMBER, min_size=4, max_size=4) | st.dictionaries(st.sampled_from(NAMES), GOOD_NUMBER),
               st.one_of(_values(4), _values(3), st.dictionaries(st.sampled_from(NAMES) | TEXT, NUMBERS | JSON,
                                                                 max_size=5), JSON))
ORBIT = _mostly(st.fixed_dictionaries({}, optional={k: _mostly(st.floats(*ORBIT_RANGES[k]), NUMBERS | JSON)
                                                   for k in ORBIT_DEFAULTS}),
                st.dictionaries(st.sampled_from(sorted(ORBIT_DEFAULTS)) | TEXT, NUMBERS | JSON, max_size=5))
_VALID = Camera.look_at(eye=(0.1, 0.0, 0.9), width=64, height=64, fov_deg=16).to_dict()
_FULL = {"R": _mostly(st.just(_VALID["R"]), st.lists(_values(3), min_size=2, max_size=4) | JSON),
         "t": _mostly(st.just(_VALID["t"]), _values(3) | JSON)}
_SCALARS = {k: _mostly(st.just(_VALID[k]), NUMBERS | JSON) for k in CAMERA_KEYS[2:]}
FULL_CAMERA = _mostly(st.fixed_dictionaries({**_FULL, **_SCALARS}),  # every key, each mostly valid
                      st.fixed_dictionaries(_FULL, optional={**_SCALARS, "zoom": JSON}))  # keys missing or extra
CAMERA = _mostly(st.none() | ORBIT | FULL_CAMERA, JSON)
JPEG = st.binary(max_size=16).map(lambda b: b"\xff\xd8" + b) | st.binary(max_size=16)
_COMMON = {"id": _mostly(st.integers(-5, 5) | TEXT, JSON), "camera": CAMERA,
           "steps": _mostly(st.integers(1, 3), NUMBERS | JSON),
           "backend": _mostly(st.sampled_from(["reference", "compiled"]), st.just("magic") | JSON)}
_JPEG_TEXT = _mostly(st.builds(lambda b: base64.b64encode(b).decode(), JPEG), TEXT | JSON)
MESSAGE = _mostly(
    st.fixed_dictionaries({"type": st.just("render"), "code": CODE}, optional=_COMMON)
    | st.fixed_dictionaries({"type": st.just("video_frame"), "jpeg": _JPEG_TEXT}, optional=_COMMON),
    st.fixed_dictionaries({"type": st.sampled_from(["render", "video_frame"]) | JSON},
                          optional={**_COMMON, "code": CODE, "jpeg": _JPEG_TEXT, "extra": JSON}),
)


def _json_text(value) -> str:
    return json.dumps(value)  # allow_nan: Python's reader takes NaN back, as the server's does


def _check(data, spec):
    """`data` parses into a valid Request, or is refused with a ProtocolError whose reply is valid JSON."""
    try:
        request = parse_message(data, spec)
    except ProtocolError as e:
        # the reply the server sends back: JSON, echoing only an int or a short string as the id
        reply = json.loads(error_message(str(e), e.request_id))
        assert reply["message"] and (reply["id"] is None or type(reply["id"]) in (int, str))
        return None
    assert isinstance(request, Request)
    assert isinstance(request.camera, Camera) and (request.camera.width, request.camera.height) == (32, 32)
    assert 1 <= request.steps <= spec.max_steps and request.backend in spec.backends
    if request.code is None:
        assert request.jpeg.startswith(b"\xff\xd8")
    else:
        assert request.code.shape == (spec.expression_dim,) and request.code.dtype == np.float32
        assert np.isfinite(request.code).all() and np.abs(request.code).max(initial=0) <= 10
    return request


@FUZZ
@given(MESSAGE, st.sampled_from([NAMED, UNNAMED]))
def test_message_like_objects_parse_or_are_refused(message, spec):
    _check(_json_text(message), spec)


@FUZZ
@given(CODE | NUMBERS, st.sampled_from([NAMED, UNNAMED]))
def test_codes_parse_or_are_refused(code, spec):
    try:
        parsed = parse_code(code, spec)
    except ProtocolError:
        return
    assert parsed.shape == (spec.expression_dim,) and np.isfinite(parsed).all() and np.abs(parsed).max() <= 10


@FUZZ
@given(CAMERA)
def test_cameras_parse_or_are_refused(camera):
    try:
        parsed = parse_camera(camera, 32)
    except ProtocolError:
        return
    assert isinstance(parsed, Camera) and (parsed.width, parsed.height) == (32, 32)


@FUZZ
@given(JSON)
def test_any_json_value_parses_or_is_refused(value):
    _check(_json_text(value), NAMED)


@settings(FUZZ, max_examples=200)
@given(st.text(max_size=64) | st.from_regex(r"\{.*\}")
       | st.lists(st.characters() | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=()),
                  max_size=64).map("".join))
def test_garbage_text_is_refused(text):
    """Also over a 16-byte limit, and with lone surrogates (a Python str can hold them, a WebSocket frame not)."""
    _check(text, NAMED)
    _check(text, TINY)


@settings(FUZZ, max_examples=200)
@given(st.binary(max_size=64) | st.binary(min_size=4090, max_size=4100))
def test_garbage_bytes_are_refused(data):
    _check(data, NAMED)
    _check(bytearray(data), NAMED)
    _check(memoryview(data), NAMED)


@FUZZ
@given(MESSAGE | JSON, JPEG, st.integers(-8, 8))
def test_binary_frames_parse_or_are_refused(header, payload, skew):
    """A binary frame: `uint32 n | n bytes of JSON header | JPEG`, also with a wrong n and a non-UTF-8 header."""
    if isinstance(header, dict):
        header = {k: v for k, v in header.items() if k != "jpeg"}
    text = json.dumps(header).encode()
    _check(struct.pack(">I", max(0, len(text) + skew)) + text + payload, NAMED)
    _check(struct.pack(">I", len(text) + 2) + b"\xc3\x28" + text + payload, NAMED)


def test_a_well_formed_binary_frame_round_trips():
    """The fuzzed reader still accepts what the documented writer produces."""
    header = {"type": "video_frame", "id": "cam", "camera": {"yaw": 10.0}, "steps": 2, "backend": "compiled"}
    data = pack_binary(header, b"\xff\xd8jpeg")
    assert unpack_binary(data) == (header, b"\xff\xd8jpeg")
    request = _check(data, NAMED)
    assert request.id == "cam" and request.jpeg == b"\xff\xd8jpeg" and request.steps == 2
    assert math.isclose(float(request.camera.center.norm()), 1.0, abs_tol=1e-5)
