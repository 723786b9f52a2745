"""The live protocol, the render worker and `avatar serve`'s robustness: garbage, oversized messages, clients that
vanish mid-frame, four clients at once, bounded memory; plus the code-stream pieces (example client, socket
source -> Renderer.stream)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="the live extra is not installed (pip install -e '.[live]')")
pytest.importorskip("uvicorn", reason="the live extra is not installed (pip install -e '.[live]')")
pytest.importorskip("websockets", reason="the live extra is not installed (pip install -e '.[live]')")

from websockets.sync.client import connect  # noqa: E402

from engine.geometry import Camera  # noqa: E402
from engine.live.app import BackgroundServer  # noqa: E402
from engine.live.protocol import (  # noqa: E402
    ProtocolError,
    Request,
    StreamSpec,
    pack_binary,
    parse_camera,
    parse_message,
    unpack_binary,
)
from engine.live.worker import RenderWorker, Slot  # noqa: E402
from engine.orbit import orbit_camera  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("jawOpen", "mouthSmileLeft", "mouthSmileRight", "browInnerUp", "eyeBlinkLeft", "eyeBlinkRight",
         "mouthPucker", "cheekPuff")
SPEC = StreamSpec(128, 8, NAMES, steps=1, max_steps=4, backends=("reference",), backend="reference")


def _render(code, i=None, **extra) -> str:
    return json.dumps({"type": "render", "id": i, "code": list(map(float, code)), **extra})


def _code(i: int) -> list[float]:
    """A distinct code per i (so no frame comes from the last-frame cache)."""
    return [0.5 + 0.45 * np.sin(0.37 * i + k) for k in range(8)]


def _frame(ws, timeout=30) -> dict:
    """The next frame's header (skipping nothing: an error here fails the test)."""
    reply = ws.recv(timeout=timeout)
    assert isinstance(reply, bytes), f"expected a frame, got {reply}"
    header, jpeg = unpack_binary(reply)
    assert jpeg[:2] == b"\xff\xd8" and header["type"] == "frame"
    return header


def _error(ws, timeout=30) -> dict:
    reply = ws.recv(timeout=timeout)
    assert isinstance(reply, str), f"expected an error, got a frame {unpack_binary(reply)[0]}"
    message = json.loads(reply)
    assert message["type"] == "error" and message["message"]
    return message


@contextlib.contextmanager
def _open(server):
    """A connected client that has read the server's `info`."""
    with connect(server.ws_url, max_size=None, open_timeout=30) as ws:
        info = json.loads(ws.recv(timeout=30))
        assert info["type"] == "info" and info["expression_dim"] == 8
        yield ws


@pytest.fixture(scope="module")
def server(tiny_avatar):
    worker = RenderWorker(tiny_avatar, sampler="ddim", steps=1, max_steps=4)
    with BackgroundServer(worker) as s:
        yield s


# -- protocol ----------------------------------------------------------------------------------------------
def test_parse_render_messages():
    r = parse_message(_render(range(8), 3, steps=2, camera={"yaw": 20, "distance": 1.2}), SPEC)
    assert isinstance(r, Request) and r.id == 3 and r.steps == 2 and r.backend == "reference"
    assert r.code.dtype == np.float32 and r.code.tolist() == list(range(8))
    assert r.camera.width == 128 and np.isclose(float(r.camera.center.norm()), 1.2, atol=1e-5)
    named = parse_message(json.dumps({"type": "render", "code": {"jawOpen": 0.7}}), SPEC)
    assert named.code[0] == pytest.approx(0.7) and named.code[1:].sum() == 0 and named.steps == 1
    full = Camera.look_at(eye=(0.1, 0.0, 0.9), width=512, height=512, fov_deg=16)
    r = parse_message(json.dumps({"type": "render", "code": [0] * 8, "camera": full.to_dict()}), SPEC)
    assert (r.camera.width, r.camera.height) == (128, 128) and torch.allclose(r.camera.R, full.R)


@pytest.mark.parametrize("message, words", [
    ("not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ("[" * 100_000, "not valid JSON"),
    (json.dumps({"type": "dance"}), "unknown message type"),
    (json.dumps({"type": "render", "code": [0] * 8, "colour": 1}), "unknown field"),
    (json.dumps({"type": "render"}), "needs \"code\""),
    (json.dumps({"type": "render", "code": [0] * 7}), "list of 8 numbers"),
    ('{"type": "render", "code": [NaN, 0, 0, 0, 0, 0, 0, 0]}', "finite number"),
    (json.dumps({"type": "render", "code": [0] * 7 + [1e9]}), "code[7]"),
    (json.dumps({"type": "render", "code": {"smirk": 1}}), "unknown expression name"),
    (json.dumps({"type": "render", "code": [0] * 8, "steps": 9}), "1..4"),
    (json.dumps({"type": "render", "code": [0] * 8, "backend": "magic"}), "not served here"),
    (json.dumps({"type": "render", "code": [0] * 8, "camera": {"distance": 40}}), "[0.3, 1.8]"),
    (json.dumps({"type": "render", "code": [0] * 8, "camera": {"zoom": 2}}), "unknown field"),
    (json.dumps({"type": "render", "code": [0] * 8, "camera": {"R": [[2, 0, 0]] * 3, "t": [0, 0, 1], "fx": 1,
                                                            "fy": 1, "cx": 0, "cy": 0, "width": 8, "height": 8}}),
     "invalid camera"),
    (json.dumps({"type": "video_frame", "jpeg": "%%%"}), "base64"),
    (json.dumps({"type": "video_frame", "jpeg": base64.b64encode(b"GIF89a").decode()}), "not a JPEG"),
    (b"\x00\x01", "too short"),
    (b"\x00\x00\xff\xff{}", "announces"),
    (pack_binary({"type": "render"}, b"\xff\xd8"), "webcam image"),
    ("x" * (SPEC.max_message_bytes + 1), "exceeds the limit"),
    ('{"type": "render", "code": [' + "1" * 5000 + "]}", "not valid JSON"),
])
def test_malformed_messages_are_explained(message, words):
    with pytest.raises(ProtocolError) as info:
        parse_message(message, SPEC)
    assert words in str(info.value), str(info.value)


def test_errors_echo_the_request_id_and_binary_roundtrip():
    with pytest.raises(ProtocolError) as info:
        parse_message(json.dumps({"type": "render", "id": "abc", "code": [1]}), SPEC)
    assert info.value.request_id == "abc"
    header, payload = unpack_binary(pack_binary({"type": "video_frame", "id": 5}, b"\xff\xd8jpeg"))
    assert header == {"type": "video_frame", "id": 5} and payload == b"\xff\xd8jpeg"
    assert parse_message(pack_binary(header, payload), SPEC).jpeg == payload


# -- the worker's scheduling, without its thread -------------------------------------------------------------
def test_slots_keep_the_newest_request_and_take_turns(tiny_avatar):
    worker = RenderWorker(tiny_avatar, sampler="ddim", steps=1)
    slots = [worker.open_slot(lambda payload: None) for _ in range(3)]
    camera = orbit_camera(size=128)
    for k, slot in enumerate(slots):
        for i in range(3 if k == 0 else 1):  # client 0 floods: only its newest request survives
            worker.submit(slot, Request((k, i), np.zeros(8, np.float32), camera, 1, "reference"))
    assert slots[0].dropped == 2
    order = []
    while (job := worker._take()) is not None:
        order.append(job[1].id)
        if job[0] is slots[0] and len(order) == 1:  # client 0 asks again at once: it waits for its turn
            worker.submit(slots[0], Request((0, 9), np.zeros(8, np.float32), camera, 1, "reference"))
    assert order == [(0, 2), (1, 0), (2, 0), (0, 9)]
    worker.close_slot(slots[1])
    worker.submit(slots[1], Request("late", None, camera, 1, "reference"))
    assert worker._take() is None and len(worker.stats()) == 2


def test_unchanged_request_reuses_the_last_frame(tiny_avatar):
    worker = RenderWorker(tiny_avatar, sampler="ddim", steps=1)
    slot = Slot(0, lambda payload: None)
    camera = orbit_camera(10, size=128)
    def serve(i, steps):
        return unpack_binary(worker.serve(slot, Request(i, np.ones(8, np.float32) / 2, camera, steps,
                                                        "reference")).result())

    first, again = serve(1, 1), serve(2, 1)
    assert not first[0]["cached"] and again[0]["cached"] and again[0]["render_ms"] == 0 and first[1] == again[1]
    other = serve(3, 2)
    assert not other[0]["cached"] and other[1] != first[1]


# -- the server ----------------------------------------------------------------------------------------------
def test_garbage_and_oversized_messages_get_errors_and_the_server_keeps_serving(server):
    with _open(server) as ws:
        ws.send(_render(_code(0), "ok"))
        assert _frame(ws)["id"] == "ok"
        garbage = ["", "{", "null", "[" * 50_000, json.dumps({"type": "render", "id": 7, "code": "smile"}),
                   os.urandom(300), b"", b"\x00\x00\x00\x02{}", os.urandom(3 << 20), "y" * (3 << 20),
                   '{"id": ' + "9" * 5000 + "}", '{"type": "render", "code": [' + "1e999, " * 7 + "1]}",
                   json.dumps({"type": "video_frame", "id": 8, "jpeg": base64.b64encode(b"\xff\xd8junk").decode()})]
        for message in garbage:
            ws.send(message)
            error = _error(ws)
            if message is garbage[4]:
                assert error["id"] == 7 and "\"code\" must be a list of 8 numbers" in error["message"]
        assert "could not be decoded" in error["message"] or "tracking unavailable" in error["message"]
        ws.send(_render(_code(1), "still"))
        assert _frame(ws)["id"] == "still"


def test_a_message_beyond_the_transport_cap_closes_only_that_client(server):
    from websockets.exceptions import ConnectionClosed

    with _open(server) as ws:
        ws.send(b"\x00" * (17 << 20))
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=30)
            ws.recv(timeout=30)
    with _open(server) as ws:
        ws.send(_render(_code(2), 1))
        assert _frame(ws)["id"] == 1


def test_clients_that_vanish_mid_frame(server):
    for i in range(3):  # ask for a frame and leave before it is back
        with _open(server) as ws:
            ws.send(_render(_code(10 + i), i))
    upgrade = (f"GET /ws HTTP/1.1\r\nHost: {server.host}:{server.port}\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
               "\r\n").encode()
    raw = socket.create_connection((server.host, server.port))  # half a WebSocket frame, then gone
    raw.sendall(upgrade)
    assert b"101" in raw.recv(4096).split(b"\r\n")[0]
    raw.sendall(b"\x81\xfe\x10\x00" + b"\x00\x00\x00\x00" + b'{"type": "ren')  # masked text, 4096 announced
    raw.close()
    abrupt = socket.create_connection((server.host, server.port))  # a TCP reset right after the upgrade
    abrupt.sendall(upgrade)
    abrupt.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    abrupt.close()
    with _open(server) as ws:
        for i in range(3):
            ws.send(_render(_code(20 + i), i))
            assert _frame(ws)["id"] == i
    deadline = time.monotonic() + 10
    while True:  # the vanished clients' slots are gone
        with urllib.request.urlopen(f"{server.url}/api/stats", timeout=5) as r:
            clients = json.load(r)
        if not clients or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert clients == [], f"slots of vanished clients remain: {clients}"


def test_four_clients_at_once_each_get_frames(server):
    results, errors = {}, []

    def client(k: int) -> None:
        try:
            with _open(server) as ws:
                got = []
                for i in range(5):
                    ws.send(_render(_code(100 * k + i), i, camera={"yaw": 10 * k}))
                    got.append(_frame(ws, timeout=60))
                results[k] = got
        except Exception as e:  # reported below, with the client's number
            errors.append((k, repr(e)))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sorted(results) == [0, 1, 2, 3]
    for got in results.values():
        assert [h["id"] for h in got] == list(range(5)) and not any(h["cached"] for h in got)
        assert all(h["latency_ms"] >= h["render_ms"] > 0 for h in got)


def test_a_flooding_client_gets_its_newest_frame_without_a_backlog(server):
    with _open(server) as ws:
        for i in range(40):
            ws.send(_render(_code(300 + i), i))
        last = None
        while last is None or last["id"] != 39:
            last = _frame(ws)
        assert last["dropped"] > 0
        assert last["latency_ms"] < 5000


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow  # 500 frames: ~20 s on 2 idle cores
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc for the resident set size")
def test_memory_is_flat_over_500_frames(capsys):
    from engine.config import from_preset
    from engine.model import Avatar

    avatar = Avatar(from_preset("tiny").replace(image_size=64), seed=0).eval().requires_grad_(False)
    worker = RenderWorker(avatar, sampler="ddim", steps=1, max_steps=1)
    rss = {}
    with BackgroundServer(worker) as s, connect(s.ws_url, max_size=None) as ws:
        ws.recv(timeout=30)
        for i in range(1, 501):
            ws.send(_render(_code(i), i, camera={"yaw": (i % 61) - 30}))
            assert _frame(ws)["id"] == i
            if i in (100, 500):
                rss[i] = _rss_mb()
    growth = rss[500] - rss[100]
    with capsys.disabled():
        print(f"\n[server memory] RSS at frame 100 {rss[100]:.0f} MB, at frame 500 {rss[500]:.0f} MB, "
              f"growth {growth:+.1f} MB")
    assert growth < 50, f"resident memory grew by {growth:.1f} MB from frame 100 to frame 500"


# -- code streams ----------------------------------------------------------------------------------------------
def test_example_stream_client_saves_frames(server, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("stream_client", ROOT / "examples" / "stream_client.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--url", server.ws_url, "--frames", "4", "--out", str(tmp_path)]) == 0
    jpegs = sorted(tmp_path.glob("*.jpg"))
    assert [p.name for p in jpegs] == [f"{i:05d}.jpg" for i in range(4)]
    assert len({p.read_bytes() for p in jpegs}) == 4
    assert "4 frames" in capsys.readouterr().out


def test_socket_source_feeds_renderer_stream(tiny_avatar):
    from engine.live.socket_source import SocketSource
    from engine.renderer import Renderer

    renderer = Renderer(tiny_avatar, sampler="ddim", steps=1)
    cameras = [{"yaw": -10}, {"yaw": 0, "pitch": 5}, {"yaw": 15, "distance": 1.1}]
    with SocketSource(tiny_avatar.config, port=0) as source:
        def push():
            with connect(source.url) as ws:
                ws.send("nonsense")
                assert "not valid JSON" in json.loads(ws.recv(timeout=30))["message"]
                for i, camera in enumerate(cameras):
                    ws.send(_render(_code(i), i, camera=camera))

        sender = threading.Thread(target=push)
        sender.start()
        images = list(renderer.stream(source))
        sender.join(30)
    assert len(images) == 3
    for i, (image, camera) in enumerate(zip(images, cameras)):
        expected = renderer.render(parse_camera(camera, 128), np.asarray(_code(i), np.float32))
        np.testing.assert_array_equal(image, expected)
