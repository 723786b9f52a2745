"""The browser viewer's server (`avatar serve` is `engine.live.server`): a FastAPI app with one WebSocket endpoint
and one static page, and the ways to run it (uvicorn's config, `BackgroundServer`).

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

import asyncio
import ipaddress
import json
import logging
import socket
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

from .protocol import ProtocolError, error_message, parse_message
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

    def __enter__(self) -> BackgroundServer:
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
