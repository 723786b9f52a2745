"""`avatar serve`: the browser viewer, a FastAPI app with one WebSocket endpoint and one static page.

    GET /            the viewer page (engine/live/static: no build step, nothing from a CDN)
    GET /api/info    the `info` message (avatar, code names, pad corners, steps, backends)
    GET /api/stats   per-client frames, dropped requests, fps and latency
    WS  /ws          the live protocol (engine/live/protocol.py): codes, cameras and webcam images in,
                     JPEG frames out

All rendering happens on one `RenderWorker` thread; the event loop only parses, validates and forwards. Each
connection has an outbox that keeps error messages (up to 32) but only the newest frame, so a client that
reads slowly gets fresh frames, not a backlog. Messages over `max_message_bytes` get an error reply; ones over
the transport's hard cap (4x that, at least 16 MiB) close that connection with code 1009.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import socket
import sys
import threading
from collections import deque
from contextlib import asynccontextmanager
from pathlib import Path

from ..errors import BackendError

try:
    from fastapi import FastAPI, WebSocket, WebSocketDisconnect
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
except ImportError as e:
    raise BackendError(f"avatar serve needs the live extra ({e}); pip install -e '.[live]'") from e

from .protocol import MAX_MESSAGE_BYTES, ProtocolError, error_message, parse_message
from .worker import RenderWorker

STATIC = Path(__file__).parent / "static"
MAX_QUEUED_ERRORS = 32
log = logging.getLogger(__name__)


class Outbox:
    """A connection's messages waiting to be sent: errors in order (at most 32), frames newest-only."""

    def __init__(self):
        self._items: deque[bytes | str] = deque()
        self._ready = asyncio.Event()

    def put(self, payload: bytes | str) -> None:
        if isinstance(payload, bytes):
            self._items = deque(p for p in self._items if not isinstance(p, bytes))
        elif len(self._items) >= MAX_QUEUED_ERRORS:
            return
        self._items.append(payload)
        self._ready.set()

    async def get(self) -> bytes | str:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()


def create_app(worker: RenderWorker):
    """The FastAPI app serving `worker` (started by the app's lifespan, stopped with it)."""
    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        await asyncio.to_thread(worker.stop)

    app = FastAPI(title="avatar serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    @app.get("/api/info")
    async def info():
        return JSONResponse(worker.info())

    @app.get("/api/stats")
    async def stats():
        return JSONResponse(worker.stats())

    @app.websocket("/ws")
    async def ws(websocket: WebSocket):
        await session(websocket, worker)

    return app


async def session(websocket, worker: RenderWorker) -> None:
    """One client: send `info`, then validate each message and hand it to the worker until the client leaves."""
    await websocket.accept()
    loop = asyncio.get_running_loop()
    outbox = Outbox()

    def deliver(payload: bytes | str) -> None:  # called on the worker thread
        try:
            loop.call_soon_threadsafe(outbox.put, payload)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass

    slot = worker.open_slot(deliver)
    sender = asyncio.create_task(_send(websocket, outbox))
    outbox.put(json.dumps(worker.info()))
    try:
        while not sender.done():
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            data = message.get("text")
            if data is None:
                data = message.get("bytes")
            try:
                worker.submit(slot, parse_message(data if data is not None else b"", worker.spec))
            except ProtocolError as e:
                outbox.put(error_message(str(e), e.request_id))
            except Exception as e:  # a parser bug must cost one message, not the connection
                log.exception("could not parse a message")
                outbox.put(error_message(f"internal error reading the message: {type(e).__name__}: {e}"))
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass  # the client vanished (mid-message or not): its slot goes, the server stays
    finally:
        worker.close_slot(slot)
        sender.cancel()


async def _send(websocket, outbox: Outbox) -> None:
    try:
        while True:
            payload = await outbox.get()
            if isinstance(payload, bytes):
                await websocket.send_bytes(payload)
            else:
                await websocket.send_text(payload)
    except Exception:  # closed under us; the receive loop notices and cleans up
        log.debug("send failed", exc_info=True)


# -- running -------------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_warning(host: str) -> str | None:
    """The warning `avatar serve` prints for a host other machines can reach (None for loopback)."""
    if is_loopback(host):
        return None
    return (f"warning: serving on {host}: any machine that can reach this port can drive the renderer and watch "
            "its frames (no authentication, no TLS); use --host 127.0.0.1 to stay local")


def uvicorn_config(app, host: str, port: int, worker: RenderWorker, **options):
    import uvicorn

    hard_cap = max(16 * 1024 * 1024, 4 * worker.spec.max_message_bytes)
    return uvicorn.Config(app, host=host, port=port, ws_max_size=hard_cap, log_level="warning",
                          lifespan="on", **options)


class BackgroundServer:
    """`avatar serve` in a thread of this process (for tests and notebooks): `with BackgroundServer(worker) as s:
    s.url ...`. Binds an ephemeral loopback port unless given one."""

    def __init__(self, worker: RenderWorker, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.worker = worker
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.host, self.port = self._socket.getsockname()[:2]
        self.server = uvicorn.Server(uvicorn_config(create_app(worker), self.host, self.port, worker))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]},
                                        name="avatar-serve", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/ws"

    def __enter__(self) -> "BackgroundServer":
        self._thread.start()
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server thread stopped during start-up; see its log")
            self._thread.join(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(30)
        self._socket.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--avatar", required=True, help="a preset (tiny, sd21), an avatar shipped with the package, "
                        "or an avatar folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, loopback "
                        "only; anything else is reachable from other machines and prints a warning)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--sampler", default="ddim", choices=["ddpm", "ddim"],
                        help="sampler (default: ddim, which stays sharp at few steps)")
    parser.add_argument("--steps", type=int, default=2, help="default denoising steps (default: 2)")
    parser.add_argument("--max-steps", type=int, default=20, help="the most steps a client may choose (default: 20)")
    parser.add_argument("--backends", default=None, help="comma-separated backends clients may choose, the first "
                        "being the default (default: the device's default backend)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="precision (default: the backend's)")
    parser.add_argument("--seed", type=int, default=None, help="fixed-noise seed (default: the avatar's)")
    parser.add_argument("--raster", default="torch", choices=["torch", "nvdiffrast"], help="rasteriser")
    parser.add_argument("--map", default=None, help="expression map file for webcam driving (`avatar fit-driver`); "
                        "default: by name, for ARKit-coded avatars such as tiny")
    parser.add_argument("--max-message-bytes", type=int, default=MAX_MESSAGE_BYTES,
                        help=f"largest accepted message (default: {MAX_MESSAGE_BYTES})")


def build_worker(args) -> RenderWorker:
    from ..avatars import load_avatar
    from ..backends import default_backend

    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip()) if args.backends else \
        (default_backend(args.device),)
    return RenderWorker(load_avatar(args.avatar, device=args.device), device=args.device, sampler=args.sampler,
                        steps=args.steps, max_steps=args.max_steps, backends=backends, seed=args.seed,
                        dtype=args.dtype, raster_backend=args.raster, max_message_bytes=args.max_message_bytes,
                        expression_map=args.map)


def run(args) -> None:
    """`avatar serve`: build the worker, warn about non-loopback hosts, serve until interrupted."""
    import uvicorn

    worker = build_worker(args)
    warning = host_warning(args.host)
    if warning:
        print(warning, file=sys.stderr)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"avatar serve: {worker.config.name} on http://{host}:{args.port}/ (Ctrl-C to stop)", flush=True)
    uvicorn.Server(uvicorn_config(create_app(worker), args.host, args.port, worker)).run()


def main(argv: list[str] | None = None) -> int:
    """`python -m engine.live.server ...`, the same as `avatar serve ...`."""
    from ..cli import main as avatar_main

    return avatar_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
