"""Who may use `avatar serve` (engine/live/access.py): Host and Origin checks at the handshake (HTTP 403), the
token of a server other machines can reach (close code 1008), TLS. Loopback only; about 5 s on 2 cores."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi", reason="the live extra is not installed (pip install -e '.[live]')")
pytest.importorskip("websockets", reason="the live extra is not installed (pip install -e '.[live]')")

from websockets.exceptions import ConnectionClosed, InvalidStatus  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from engine.cli import main as avatar_main  # noqa: E402
from engine.errors import InputError  # noqa: E402
from engine.live.access import AccessPolicy, is_loopback, normalise_origin  # noqa: E402
from engine.live.app import BackgroundServer, host_warning  # noqa: E402
from engine.live.protocol import unpack_binary  # noqa: E402
from engine.live.worker import RenderWorker  # noqa: E402

EMBED = "http://embed.example:3000"
RENDER = json.dumps({"type": "render", "id": 1, "code": [0.1] * 8})


@pytest.fixture(scope="module")
def worker(tiny_avatar):
    return RenderWorker(tiny_avatar, sampler="ddim", steps=1, max_steps=1)


@pytest.fixture(scope="module")
def server(worker):
    with BackgroundServer(worker, allow_origins=[EMBED]) as s:
        yield s


def _status(server, path: str, headers: dict) -> int:
    request = urllib.request.Request(f"{server.url}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _raw_upgrade(server, host: str) -> bytes:
    with socket.create_connection((server.host, server.port), timeout=10) as raw:
        raw.sendall(f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        return raw.recv(4096).split(b"\r\n")[0]


def test_the_policy_by_hand():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.10") and not is_loopback("example.org")
    local = AccessPolicy.for_server("127.0.0.1", 8000, allow_origins=["HTTP://Embed.Example:3000/"])
    assert local.token is None and local.allow_origins == {EMBED}
    own = {"host": "localhost:8000", "origin": "http://localhost:8000"}
    assert local.refusal(own, "/ws", "") is None
    assert local.refusal({"host": "127.0.0.1:8000", "origin": EMBED}, "/ws", "") is None
    assert "Origin http://evil.example" in local.refusal({"host": "127.0.0.1:8000", "origin": "http://evil.example"},
                                                         "/ws", "")
    assert "Origin" in local.refusal({"host": "127.0.0.1:8000", "origin": "http://127.0.0.1:8001"}, "/", "")
    assert "Host" in local.refusal({"host": "evil.example:8000"}, "/", "")
    assert "Host" in local.refusal({"host": "127.0.0.1:9999"}, "/", "")
    assert "Host" in local.refusal({}, "/", "")
    public = AccessPolicy.for_server("192.168.1.10", 8000)
    assert public.token and len(public.token) >= 16 and public.page_url().endswith(f"/?token={public.token}")
    assert public.refusal({"host": "192.168.1.10:8000"}, "/", "") is None  # the page itself holds nothing
    assert "token" in public.refusal({"host": "192.168.1.10:8000"}, "/api/info", "")
    assert public.refusal({"host": "192.168.1.10:8000"}, "/api/info", f"token={public.token}") is None
    assert "Host" in public.refusal({"host": "localhost:8000"}, "/", "")
    anywhere = AccessPolicy.for_server("0.0.0.0", 443, allow_hosts=["avatar.example.org"], tls=True)
    for host in ("10.0.0.7", "avatar.example.org", "127.0.0.1:443", socket.gethostname()):
        assert anywhere.refusal({"host": host, "origin": f"https://{host.split(':')[0]}"}, "/", "") is None, host
    assert anywhere.refusal({"host": "evil.example"}, "/", "") is not None
    assert AccessPolicy.for_server("0.0.0.0", 80, token="my-own-token").token == "my-own-token"
    for bad in ("evil.example", "ftp://x.org", "http://x.org/path", "null"):
        with pytest.raises(InputError, match="not an origin"):
            normalise_origin(bad)
    with pytest.raises(InputError, match="--token"):
        AccessPolicy.for_server("0.0.0.0", 80, token="short")
    assert host_warning(local) is None
    warning = host_warning(public)
    assert "192.168.1.10" in warning and "--tls-cert" in warning and "--host 127.0.0.1" in warning


def test_foreign_origins_and_hosts_are_refused_at_the_handshake(server):
    with pytest.raises(InvalidStatus) as refused:
        connect(server.ws_url, origin="http://evil.example", open_timeout=10)
    assert refused.value.response.status_code == 403
    with pytest.raises(InvalidStatus) as other_port:  # a page served from another loopback port
        connect(server.ws_url, origin=f"http://127.0.0.1:{server.port + 1}", open_timeout=10)
    assert other_port.value.response.status_code == 403
    assert b" 403 " in _raw_upgrade(server, f"evil.example:{server.port}")  # DNS rebinding's shape
    assert b" 101 " in _raw_upgrade(server, f"localhost:{server.port}")
    assert _status(server, "/", {"Host": f"evil.example:{server.port}"}) == 403
    assert _status(server, "/api/info", {"Origin": "http://evil.example"}) == 403
    assert _status(server, "/api/info", {}) == 200
    localhost = f"ws://localhost:{server.port}/ws"
    for url, origin in ((server.ws_url, server.url), (localhost, f"http://localhost:{server.port}"),
                        (server.ws_url, EMBED)):
        with connect(url, origin=origin, open_timeout=10) as ws:
            assert json.loads(ws.recv(timeout=30))["type"] == "info"


def test_a_token_server_closes_sockets_without_the_token(worker):
    with BackgroundServer(worker, token="correct-horse-battery") as s:
        wrong = json.dumps({"type": "hello", "token": "wrong-token-here"})
        for first in (RENDER, wrong, json.dumps({"type": "hello"})):
            with connect(s.ws_url, open_timeout=10) as ws:
                ws.send(first)
                with pytest.raises(ConnectionClosed) as closed:
                    ws.recv(timeout=30)
                assert closed.value.rcvd.code == 1008
        with connect(s.ws_url, open_timeout=10) as ws:
            ws.send(json.dumps({"type": "hello", "token": "correct-horse-battery"}))
            assert json.loads(ws.recv(timeout=30))["type"] == "info"
            ws.send(json.dumps({"type": "hello", "token": "again, ignored"}))
            ws.send(RENDER)
            assert unpack_binary(ws.recv(timeout=60))[0]["id"] == 1
        assert _status(s, "/api/info", {}) == 403
        assert _status(s, "/api/stats?token=correct-horse-battery", {}) == 200


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls_serves_https_and_wss(worker, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    context = ssl.create_default_context(cafile=str(cert))
    with BackgroundServer(worker, tls=(str(cert), str(key))) as s:
        assert s.url.startswith("https://") and s.ws_url.startswith("wss://")
        with urllib.request.urlopen(f"{s.url}/api/info", context=context, timeout=10) as r:
            assert json.load(r)["type"] == "info"
        with connect(s.ws_url, ssl=context, open_timeout=10) as ws:
            assert json.loads(ws.recv(timeout=30))["type"] == "info"
            ws.send(RENDER)
            assert unpack_binary(ws.recv(timeout=60))[0]["id"] == 1


def test_bad_access_options_are_errors(capsys, tmp_path):
    (tmp_path / "cert.pem").write_text("x")
    for args, words in ((["--tls-cert", str(tmp_path / "cert.pem")], "go together"),
                        (["--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "no.pem")],
                         "no such file"),
                        (["--allow-origin", "evil.example"], "not an origin"),
                        (["--token", "abc"], "--token")):
        assert avatar_main(["serve", "--avatar", "tiny", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("avatar serve: error:") and words in err and "Traceback" not in err, err
