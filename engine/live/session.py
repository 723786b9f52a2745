"""One viewer connection on `avatar serve`'s event loop: the token handshake, the client cap, the message rate
limit, parsing, and the outbox its replies wait in.

Why a rate limit, and why it pauses reading: every client's messages are read, parsed and answered on the one
event loop, while the render thread needs the same interpreter lock between its torch operations. A client
flooding the socket with (even invalid) messages kept the loop busy, and each time the render thread let go of
the lock it waited up to a switch interval (5 ms) to get it back: another client's 130 ms frame took 370 ms.
So each client has a token bucket (`SessionLimits.message_rate` per second, a large message costing more):
over it, the client gets one error reply, its message is dropped unparsed, and its socket is not read again
until the bucket has a token, so the flood waits in that client's own TCP buffer, not on the loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from dataclasses import dataclass

from fastapi import WebSocketDisconnect  # app.py, this module's one user, reports a missing live extra

from .access import AccessPolicy
from .protocol import ProtocolError, error_message, parse_hello, parse_message
from .worker import RenderWorker

MAX_QUEUED_ERRORS = 32
RATE_UNIT_BYTES = 64 * 1024  # a message costs 1 + its size in these units
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionLimits:
    """Per-server limits: `max_clients` open sockets (one more gets an error and close code 1013), each reading
    at most `message_rate` messages per second (bursts of `burst`); `hello_timeout_s` to present the token."""

    max_clients: int = 16
    message_rate: float = 120.0
    burst: int = 240
    hello_timeout_s: float = 10.0


class RateLimit:
    """A token bucket: `delay(cost)` -> 0 when the message may pass (and takes its tokens), else the seconds until
    one token is back. `calm` says the bucket is full again (the client slowed down)."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self.tokens, self.last = float(burst), time.monotonic()

    def delay(self, cost: float = 1.0) -> float:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= min(cost, self.burst):
            self.tokens -= cost
            return 0.0
        return (1.0 - self.tokens) / self.rate

    @property
    def calm(self) -> bool:
        return self.tokens >= self.burst - 1


class Outbox:
    """A connection's messages waiting to be sent: texts in order (at most 32), frames newest-only."""

    def __init__(self):
        self._items: deque[bytes | str] = deque()
        self._ready = asyncio.Event()

    def put(self, payload: bytes | str, keep: bool = False) -> None:
        """Queue `payload`: a frame replaces a waiting frame; a text is dropped beyond 32 waiting unless `keep`."""
        if isinstance(payload, bytes):
            self._items = deque(p for p in self._items if not isinstance(p, bytes))
        elif len(self._items) >= MAX_QUEUED_ERRORS and not keep:
            return
        self._items.append(payload)
        self._ready.set()

    async def get(self) -> bytes | str:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()


def _payload(message: dict) -> str | bytes:
    data = message.get("text")
    if data is None:
        data = message.get("bytes")
    return data if data is not None else b""


async def _handshake(websocket, policy: AccessPolicy, limits: SessionLimits) -> bool:
    """With a token required: the first message must be {"type": "hello", "token": ...}; otherwise close 1008."""
    if policy.token is None:
        return True
    try:
        message = await asyncio.wait_for(websocket.receive(), limits.hello_timeout_s)
    except asyncio.TimeoutError:
        message = {"type": "websocket.receive", "text": ""}
    if message["type"] == "websocket.disconnect":
        return False
    try:
        ok = policy.token_ok(parse_hello(_payload(message)))
    except ProtocolError:
        ok = False
    if not ok:
        await websocket.close(code=1008, reason="this server requires its token: open the URL printed at start")
    return ok


async def session(websocket, worker: RenderWorker, policy: AccessPolicy, limits: SessionLimits,
                  clients: set) -> None:
    """One client: check the cap and the token, send `info`, then validate each message (at the limited rate)
    and hand it to the worker until the client leaves."""
    await websocket.accept()
    if len(clients) >= limits.max_clients:
        await websocket.send_text(error_message(f"this server already has {limits.max_clients} clients (its "
                                                "--max-clients); try again later"))
        await websocket.close(code=1013, reason="too many clients")
        return
    clients.add(websocket)
    try:
        if await _handshake(websocket, policy, limits):
            await _serve(websocket, worker, limits)
    finally:
        clients.discard(websocket)


async def _serve(websocket, worker: RenderWorker, limits: SessionLimits) -> None:
    loop = asyncio.get_running_loop()
    outbox = Outbox()

    def deliver(payload: bytes | str) -> None:  # called on the worker's threads
        try:
            loop.call_soon_threadsafe(outbox.put, payload)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass

    slot = worker.open_slot(deliver)
    sender = asyncio.create_task(_send(websocket, outbox))
    outbox.put(json.dumps(worker.info()))
    rate, warned = RateLimit(limits.message_rate, limits.burst), False
    try:
        while not sender.done():
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            data = _payload(message)
            delay = rate.delay(1 + len(data) / RATE_UNIT_BYTES)
            if delay > 0:
                if not warned:
                    outbox.put(error_message(f"too many messages: more than {limits.message_rate:g} a second; the "
                                             "extra ones are dropped (send one per input event or animation frame)"),
                               keep=True)
                    warned = True
                await asyncio.sleep(delay)  # this client's socket is not read meanwhile: TCP holds its flood
                continue
            warned = warned and not rate.calm
            try:
                request = parse_message(data, worker.spec)
                if request is not None:
                    worker.submit(slot, request)
            except ProtocolError as e:
                outbox.put(error_message(str(e), e.request_id))
            except Exception as e:  # a parser bug must cost one message, not the connection
                log.exception("could not parse a message")
                outbox.put(error_message(f"internal error reading the message: {type(e).__name__}: {e}"))
            await asyncio.sleep(0)  # the other clients' turn on the loop, even while this one's messages queue
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
