"""The browser viewer's server (`avatar serve` is `engine.live.server`): a FastAPI app with one WebSocket endpoint
and one static page, and the ways to run it (uvicorn's config, `BackgroundServer`).

    GET /            the viewer page (engine/live/static: no build step, nothing from a CDN)
    GET /api/info    the `info` message (avatar, code names, pad corners, steps, backends)
    GET /api/stats   per-client frames, dropped requests, fps and latency
    WS  /ws          the live protocol (engine/live/protocol.py): codes, cameras and webcam images in,
                     JPEG frames out

Every request passes `engine.live.access` first (Host, Origin, token: HTTP 403 otherwise). All rendering
happens on `RenderWorker`'s threads; the event loop only parses, validates and forwards, each client at a
limited rate (`engine.live.session`). Each connection has an outbox that keeps text messages (up to 32) but
only the newest frame, so a client that reads slowly gets fresh frames, not a backlog. Messages over
`max_message_bytes` get an error reply; ones over the transport's hard cap (4x that, at least 16 MiB) close
that connection with code 1009.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from contextlib import asynccontextmanager
from pathlib import Path

from ..errors import BackendError

try:
    from fastapi import FastAPI, WebSocket
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
except ImportError as e:
    raise BackendError(f"avatar serve needs the live extra ({e}); pip install -e '.[live]'") from e

from .access import AccessGuard, AccessPolicy, is_loopback
from .session import SessionLimits, session
from .worker import RenderWorker

STATIC = Path(__file__).parent / "static"


def create_app(worker: RenderWorker, policy: AccessPolicy, limits: SessionLimits | None = None):
    """The ASGI app serving `worker` (started by the app's lifespan, stopped with it) to the clients `policy`
    admits, within `limits`."""
    limits = limits or SessionLimits()
    clients: set = set()

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
        await session(websocket, worker, policy, limits, clients)

    return AccessGuard(app, policy)


# -- running -------------------------------------------------------------------------------------------
def host_warning(policy: AccessPolicy) -> str | None:
    """The warning `avatar serve` prints for a host other machines can reach (None for loopback)."""
    if is_loopback(policy.host):
        return None
    clear = "" if policy.tls else ("; without --tls-cert/--tls-key the token and the frames travel in clear and "
                                   "browsers refuse the webcam")
    return (f"warning: serving on {policy.host}: any machine that can reach this port and has the token can drive "
            f"the renderer and watch its frames{clear}; use --host 127.0.0.1 to stay local")


def uvicorn_config(app, host: str, port: int, worker: RenderWorker, tls: tuple[str, str] | None = None,
                   **options):
    """uvicorn's config for `app`; `tls` = (certificate file, key file) serves HTTPS and WSS."""
    import uvicorn

    hard_cap = max(16 * 1024 * 1024, 4 * worker.spec.max_message_bytes)
    if tls is not None:
        options.update(ssl_certfile=tls[0], ssl_keyfile=tls[1])
    return uvicorn.Config(app, host=host, port=port, ws_max_size=hard_cap, log_level="warning",
                          lifespan="on", **options)


class BackgroundServer:
    """`avatar serve` in a thread of this process (for tests and notebooks): `with BackgroundServer(worker) as s:
    s.url ...`. Binds an ephemeral loopback port unless given one; `access` holds `AccessPolicy.for_server`'s
    options (allow_origins, allow_hosts, token), `tls` a (certificate, key) pair."""

    def __init__(self, worker: RenderWorker, host: str = "127.0.0.1", port: int = 0,
                 limits: SessionLimits | None = None, tls: tuple[str, str] | None = None, **access):
        import uvicorn

        self.worker = worker
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.host, self.port = self._socket.getsockname()[:2]
        self.policy = AccessPolicy.for_server(self.host, self.port, tls=tls is not None, **access)
        self.server = uvicorn.Server(uvicorn_config(create_app(worker, self.policy, limits), self.host, self.port,
                                                    worker, tls))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]},
                                        name="avatar-serve", daemon=True)

    @property
    def url(self) -> str:
        return f"{self.policy.scheme}://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"{'wss' if self.policy.tls else 'ws'}://{self.host}:{self.port}/ws"

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
