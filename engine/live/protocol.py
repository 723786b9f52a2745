"""The live WebSocket protocol (version 1): how the viewer page and other programs push codes and cameras to
`avatar serve` (endpoint `/ws`) and get frames back. Parsing and validation live here, so the server, the
socket source and the tests share one reader and one writer.

Client -> server
----------------
Text frames are JSON objects, at most `max_message_bytes` (2 MiB by default):

    {"type": "render", "id": 7,                 # id: optional int or short string, echoed in the reply
     "code": [E floats] | {"jawOpen": 0.4, ...}, # the avatar's expression code; a dict names dimensions (the
                                                 #   avatar's expression_names), the others are 0
     "camera": {"yaw": 10, "pitch": -5, "distance": 1.0, "fov": 16}   # degrees, metres, all optional
             | {"R": [[3x3]], "t": [3], "fx", "fy", "cx", "cy", "width", "height"},  # or a full OpenCV camera
                                                 #   (engine.geometry.Camera.to_dict); scaled to the avatar's size
     "steps": 2,                                 # optional: denoising steps, 1..max_steps (server default)
     "backend": "reference"}                     # optional: one of the server's backends

    {"type": "video_frame", "id": 8, "jpeg": "<base64 JPEG>", "time": 12.345, "camera": {...}, "steps": ..,
     "backend": ..}                              # a webcam image: the server tracks it and drives the avatar;
                                                 #   "camera" is the base camera the tracked head pose moves;
                                                 #   "time" (optional) its capture time in seconds on the
                                                 #   client's clock, which the tracker's smoothing runs on
                                                 #   (default: its arrival time at the server)

    {"type": "hello", "token": "..."}            # the first message, where the server requires a token
                                                 #   (engine/live/access.py); ignored elsewhere

A full camera must be a rotation with a finite translation, positive focal lengths giving a field of view of
1..150 degrees, the principal point inside the image and the head (the world origin) between the near and far
planes (the avatar's znear..zfar); an error names the field.

Binary frames carry a webcam image without base64: `uint32 big-endian n | n bytes of UTF-8 JSON header |
JPEG bytes`, the header being a video_frame message without "jpeg".

Every message replaces the sender's pending one: the server renders only each client's newest request, so a
fast sender sees bounded latency rather than a growing queue (ids of dropped requests get no reply). Webcam
images are tracked apart from rendering: each one tracked (stale ones are dropped) is answered by a `tracked`
message, and the newest tracked code is rendered. A client sending more than the server's message rate gets
one error, then its extra messages are dropped.

Server -> client
----------------
    text   {"type": "info", "protocol": 1, "avatar": .., "image_size": .., "expression_dim": E,
            "expression_names": [..] | null, "corners": [[E floats] x 4], "corner_labels": [4 strings],
            "camera": {orbit defaults}, "view_range": {"yaw", "pitch", "distance": [low, high]} | null
                                                 (the orbit range the avatar was trained on),
            "steps": .., "max_steps": .., "backends": [..], "backend": .., "sampler": ..,
            "max_message_bytes": .., "tracking": null | "why it is unavailable"}      (sent once, on connect)
    text   {"type": "error", "message": "what was wrong and how to fix it", "id": <the request's id or null>}
    binary uint32 big-endian n | JSON header | JPEG, the header being
           {"type": "frame", "id": .., "width": .., "height": .., "code": [E floats], "cached": bool,
            "render_ms": .., "latency_ms": .., "fps": .., "dropped": .., "tracked": bool (video frames only)}
    text   {"type": "tracked", "id": .., "time": .., "face": bool, "head": {"yaw", "pitch", "roll"} | null,
            "code": [E floats], "fps": ..}       (one per webcam image tracked; fps: the tracking rate)

`latency_ms` runs from the request's arrival to its JPEG; `fps` is the client's delivered frame rate (moving
average); `cached` says an unchanged code and camera reused the previous frame; `dropped` counts this client's
requests replaced before they were served.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import AvatarError, InputError
from ..geometry import Camera
from ..orbit import DEFAULT_FOV_DEG, orbit_camera
from ..trained_on import CAMERA_KEYS

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 2 * 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024
MAX_CODE_VALUE = 10.0
FOV_RANGE_DEG = (1.0, 150.0)  # of a full camera's focal lengths: beyond, a pixel spans nothing or everything
ORBIT_DEFAULTS = {"yaw": 0.0, "pitch": 0.0, "distance": 1.0, "fov": DEFAULT_FOV_DEG}  # engine.orbit's angles
# (low, high) per orbit field: pitch stops short of the poles (look_at's up vector), distance keeps the head
# inside the conditioning's [znear, zfar] = [0.1, 2] m depth range.
ORBIT_RANGES = {"yaw": (-180.0, 180.0), "pitch": (-80.0, 80.0), "distance": (0.3, 1.8), "fov": (5.0, 90.0)}
_HEADER = struct.Struct(">I")
_FIELDS = {
    "render": {"type", "id", "code", "camera", "steps", "backend"},
    "video_frame": {"type", "id", "jpeg", "time", "camera", "steps", "backend"},
}


class ProtocolError(InputError):
    """A message that is not in the documented format; its text is sent back to the client."""

    def __init__(self, message: str, request_id=None):
        super().__init__(message)
        self.request_id = request_id


@dataclass(frozen=True)
class StreamSpec:
    """What a server accepts: the avatar's shapes and the server's choices (the `info` message's facts)."""

    image_size: int
    expression_dim: int
    expression_names: tuple[str, ...] | None = None
    steps: int = 2
    max_steps: int = 50
    backends: tuple[str, ...] = ("reference",)
    backend: str = "reference"
    max_message_bytes: int = MAX_MESSAGE_BYTES
    depth_range: tuple[float, float] = (0.1, 2.0)  # where the head may lie in front of a full camera (metres)

    @classmethod
    def for_config(cls, config, **options) -> "StreamSpec":
        """The spec of an `AvatarConfig` (image size, code size and names, the conditioning's depth range) plus
        server `options`."""
        depth = (config.conditioning.znear, config.conditioning.zfar)
        return cls(config.image_size, config.expression_dim, config.expression_names, depth_range=depth, **options)


@dataclass
class Request:
    """One validated request. `code` [E] float32 (None for a webcam image, which tracking turns into a code);
    `camera` the camera to render (for a webcam image: the base camera the tracked pose moves); `jpeg` the
    webcam image, `capture_time` its capture time (seconds, the client's clock; None: unknown); `received` the
    `time.perf_counter()` of its arrival."""

    id: int | str | None
    code: np.ndarray | None
    camera: Camera
    steps: int
    backend: str
    jpeg: bytes | None = None
    capture_time: float | None = None
    tracked: bool | None = None  # a code the server tracked from a webcam image: whether a face was found
    received: float = field(default_factory=time.perf_counter)


# -- client messages ---------------------------------------------------------------------------------------
def parse_message(data: str | bytes, spec: StreamSpec) -> Request | None:
    """A client's WebSocket message (text JSON, or a binary webcam frame) -> `Request` (None for a `hello`, which
    asks nothing); raises ProtocolError."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        _check_size(len(data), spec)
        header, payload = unpack_binary(bytes(data))
        if header.get("type") != "video_frame" or "jpeg" in header:
            raise ProtocolError("a binary message is a webcam image: its header must be {\"type\": "
                                "\"video_frame\", ...} without \"jpeg\" (the JPEG follows the header)",
                                _safe_id(header.get("id")))
        return _request(header, spec, payload)
    if not isinstance(data, str):
        raise ProtocolError(f"a message must be text (JSON) or binary, got {type(data).__name__}")
    if 4 * len(data) > spec.max_message_bytes:  # a character is at most 4 bytes of UTF-8
        # "surrogatepass": a str handed over in Python may hold lone surrogates, which no UTF-8 frame can carry
        _check_size(len(data.encode("utf-8", "surrogatepass")), spec)
    message = _json_object(data, "message")
    return None if message.get("type") == "hello" else _request(message, spec, None)


def parse_hello(data: str | bytes) -> str | None:
    """A `hello` message -> its token (None when it has none); ProtocolError for anything else."""
    if not isinstance(data, str) or len(data) > 4096:
        raise ProtocolError("the first message must be {\"type\": \"hello\", \"token\": \"...\"}")
    message = _json_object(data, "hello message")
    if message.get("type") != "hello" or set(message) - {"type", "token"}:
        raise ProtocolError("the first message must be {\"type\": \"hello\", \"token\": \"...\"}")
    token = message.get("token")
    return token if isinstance(token, str) else None


def _request(message: dict, spec: StreamSpec, jpeg: bytes | None) -> Request:
    request_id = _safe_id(message.get("id"))
    kind = message.get("type")
    if not isinstance(kind, str) or kind not in _FIELDS:
        raise ProtocolError(f"unknown message type {_short(kind)}; send one of {sorted(_FIELDS)} (see "
                            "engine/live/protocol.py)", request_id)
    unknown = sorted(set(message) - _FIELDS[kind])
    if unknown:
        raise ProtocolError(f"{kind} message has unknown field(s) {unknown}; its fields are "
                            f"{sorted(_FIELDS[kind])}", request_id)
    try:
        if "id" in message and request_id is None and message["id"] is not None:
            raise ProtocolError("\"id\" must be an int or a string of at most 64 characters")
        camera = parse_camera(message.get("camera"), spec.image_size, spec.depth_range)
        steps = _steps(message.get("steps", spec.steps), spec)
        backend = message.get("backend", spec.backend)
        if backend not in spec.backends:
            raise ProtocolError(f"backend {_short(backend)} is not served here; choose one of {list(spec.backends)}")
        if kind == "render":
            if "code" not in message:
                raise ProtocolError(f"a render message needs \"code\": a list of {spec.expression_dim} numbers"
                                    + (" or an object keyed by expression name" if spec.expression_names else ""))
            return Request(request_id, parse_code(message["code"], spec), camera, steps, backend)
        if jpeg is None:
            if not isinstance(message.get("jpeg"), str):
                raise ProtocolError("a video_frame message needs \"jpeg\": the base64 text of a JPEG image "
                                    "(or send the JPEG as a binary message)")
            try:
                jpeg = base64.b64decode(message["jpeg"], validate=True)
            except (binascii.Error, ValueError) as e:
                raise ProtocolError(f"\"jpeg\" is not valid base64 ({e})") from e
        if not jpeg.startswith(b"\xff\xd8"):
            raise ProtocolError("the webcam image is not a JPEG (it must start with the bytes FF D8)")
        capture_time = message.get("time")
        if capture_time is not None and not _is_number(capture_time, 0.0, 1e12):
            raise ProtocolError(f"\"time\" = {_short(capture_time)}: the capture time must be a number of seconds "
                                "(e.g. performance.now() / 1000)")
        return Request(request_id, None, camera, steps, backend, jpeg=jpeg,
                       capture_time=None if capture_time is None else float(capture_time))
    except ProtocolError as e:
        raise ProtocolError(str(e), request_id) from None
    except AvatarError as e:  # a camera the geometry module rejects
        raise ProtocolError(str(e), request_id) from None


def parse_code(value, spec: StreamSpec) -> np.ndarray:
    """A code as a list of E numbers or a {name: number} object -> [E] float32."""
    names = spec.expression_names
    if isinstance(value, dict):
        if not names:
            raise ProtocolError("this avatar's code dimensions have no names; send \"code\" as a list of "
                                f"{spec.expression_dim} numbers")
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ProtocolError(f"unknown expression name(s) {unknown[:8]}; this avatar's are {list(names)}")
        value = [value.get(name, 0.0) for name in names]
    if not isinstance(value, list) or len(value) != spec.expression_dim:
        raise ProtocolError(f"\"code\" must be a list of {spec.expression_dim} numbers"
                            f"{' or an object keyed by expression name' if names else ''}, got "
                            f"{_describe(value)}")
    for i, v in enumerate(value):
        if not _is_number(v, -MAX_CODE_VALUE, MAX_CODE_VALUE):
            raise ProtocolError(f"code[{i}] = {_short(v)}: each code value must be a finite number in "
                                f"[-{MAX_CODE_VALUE:g}, {MAX_CODE_VALUE:g}]")
    return np.asarray(value, dtype=np.float32)


def parse_camera(value, image_size: int, depth_range: tuple[float, float] = (0.1, 2.0)) -> Camera:
    """An orbit ({yaw, pitch, distance, fov}, each optional) or a full camera dict -> Camera of the avatar's size.
    A full camera must see the head (the world origin) at a depth within `depth_range` (see the module's text)."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ProtocolError(f"\"camera\" must be an object, got {_describe(value)}")
    if "R" in value:
        unknown = sorted(set(value) - set(CAMERA_KEYS))
        missing = [k for k in CAMERA_KEYS if k not in value]
        if unknown or missing:
            raise ProtocolError(f"a full camera holds exactly {list(CAMERA_KEYS)} (missing {missing}, unknown "
                                f"{unknown}); or send an orbit {{yaw, pitch, distance, fov}}")
        for key in CAMERA_KEYS[2:]:
            if not _is_number(value[key]):
                raise ProtocolError(f"invalid camera: {key} = {_short(value[key])}: must be a finite number")
        try:
            camera = Camera.from_dict(value)
        except (AvatarError, TypeError, ValueError, OverflowError) as e:
            raise ProtocolError(f"invalid camera: {e}") from None
        _check_view(camera, depth_range)
        if (camera.width, camera.height) != (image_size, image_size):
            camera = camera.scaled(image_size, image_size)
        return camera
    unknown = sorted(set(value) - set(ORBIT_DEFAULTS))
    if unknown:
        raise ProtocolError(f"camera has unknown field(s) {unknown}; an orbit camera holds {list(ORBIT_DEFAULTS)} "
                            f"and a full camera {list(CAMERA_KEYS)}")
    orbit = {}
    for key, default in ORBIT_DEFAULTS.items():
        v = value.get(key, default)
        lo, hi = ORBIT_RANGES[key]
        if not _is_number(v, lo, hi):
            raise ProtocolError(f"camera {key} = {_short(v)}: must be a number in [{lo:g}, {hi:g}]")
        orbit[key] = float(v)
    return orbit_camera(orbit["yaw"], orbit["pitch"], size=image_size, distance=orbit["distance"],
                        fov_deg=orbit["fov"])


def _check_view(camera: Camera, depth_range: tuple[float, float]) -> None:
    """A valid `Camera` that also renders something: the field of view, the principal point, the head's depth."""
    lo, hi = FOV_RANGE_DEG
    for name, focal, size in (("fx", camera.fx, camera.width), ("fy", camera.fy, camera.height)):
        fov = math.degrees(2 * math.atan(0.5 * size / focal))
        if not lo <= fov <= hi:
            raise ProtocolError(f"invalid camera: {name} = {focal:g} pixels gives a field of view of {fov:.3g} "
                                f"degrees across {size} pixels; it must be {lo:g}..{hi:g} degrees")
    for name, c, size in (("cx", camera.cx, camera.width), ("cy", camera.cy, camera.height)):
        if not -0.5 <= c <= size - 0.5:
            raise ProtocolError(f"invalid camera: {name} = {c:g}: the principal point must lie inside the image "
                                f"(-0.5..{size - 0.5:g} pixels)")
    depth = float(camera.t[2])  # the world origin in camera coordinates is t: its depth is t_z
    near, far = depth_range
    if not near <= depth <= far:
        raise ProtocolError(f"invalid camera: t: the head (the world origin) is {depth:.3g} m in front of the "
                            f"camera; it must lie between the near and far planes, {near:g}..{far:g} m")


def camera_key(camera: Camera) -> tuple:
    """A hashable identity of a camera (for the last-frame cache)."""
    return (tuple(camera.R.flatten().tolist()), tuple(camera.t.tolist()), camera.fx, camera.fy, camera.cx,
            camera.cy, camera.width, camera.height)


def _is_number(v, lo: float = -math.inf, hi: float = math.inf) -> bool:
    """`v` is a JSON number (not a bool), finite as a float (no integer beyond a float's range) and in [lo, hi]."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        v = float(v)
    except OverflowError:
        return False
    return math.isfinite(v) and lo <= v <= hi


def _short(value) -> str:
    """repr(value), cut to 40 characters: error messages quote what was sent, not all of it."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _steps(value, spec: StreamSpec) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= spec.max_steps:
        raise ProtocolError(f"\"steps\" = {_short(value)}: must be an integer in 1..{spec.max_steps}")
    return value


def _safe_id(value):
    """The id to echo: an int or a short string; anything else is not echoed."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and abs(value) < 2**53:
        return value
    if isinstance(value, str) and len(value) <= 64:
        return value
    return None


def _check_size(n: int, spec: StreamSpec) -> None:
    if n > spec.max_message_bytes:
        raise ProtocolError(f"message of {n} bytes exceeds the limit of {spec.max_message_bytes} bytes; send "
                            "smaller webcam images (e.g. 640x480 JPEG) or one code per message")


def _json_object(text: str, what: str) -> dict:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, or an integer of over 4300 digits
        raise ProtocolError(f"{what} is not valid JSON ({str(e)[:120]}); send a JSON object such as "
                            "{\"type\": \"render\", \"code\": [...]}") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object with a \"type\", got {_describe(value)}")
    return value


def _describe(value) -> str:
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    return f"{type(value).__name__} {str(value)[:40]!r}" if not isinstance(value, (dict, list)) else "an object"


# -- binary frames (both directions) -----------------------------------------------------------------------
def pack_binary(header: dict, payload: bytes) -> bytes:
    """`uint32 big-endian len(json) | UTF-8 JSON header | payload`."""
    text = json.dumps(header, separators=(",", ":")).encode()
    return _HEADER.pack(len(text)) + text + payload


def unpack_binary(data: bytes) -> tuple[dict, bytes]:
    """The inverse of `pack_binary`; raises ProtocolError on a malformed message."""
    if len(data) < _HEADER.size:
        raise ProtocolError(f"binary message of {len(data)} bytes is too short; it starts with a 4-byte "
                            "big-endian header length")
    (n,) = _HEADER.unpack_from(data)
    if n > MAX_HEADER_BYTES or _HEADER.size + n > len(data):
        raise ProtocolError(f"binary message announces a {n}-byte header but holds {len(data) - _HEADER.size} "
                            f"bytes after the length (headers are at most {MAX_HEADER_BYTES} bytes)")
    try:
        text = data[_HEADER.size:_HEADER.size + n].decode()
    except UnicodeDecodeError as e:
        raise ProtocolError(f"binary message header is not UTF-8 ({e})") from None
    return _json_object(text, "binary message header"), data[_HEADER.size + n:]


# -- server messages ---------------------------------------------------------------------------------------
def error_message(message: str, request_id=None) -> str:
    return json.dumps({"type": "error", "message": message, "id": request_id})


def frame_message(header: dict, jpeg: bytes) -> bytes:
    return pack_binary({"type": "frame", **header}, jpeg)


def tracked_message(request_id, capture_time: float | None, face: bool, head, code, fps: float) -> str:
    """The reply to a tracked webcam image; `head` = (yaw, pitch, roll) degrees or None."""
    return json.dumps({"type": "tracked", "id": request_id, "time": capture_time, "face": face,
                       "head": None if head is None else dict(zip(("yaw", "pitch", "roll"),
                                                                  (round(v, 3) for v in head))),
                       "code": [round(float(v), 5) for v in code], "fps": round(fps, 2)})
