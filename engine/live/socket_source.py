"""`SocketSource`: codes and cameras pushed by other programs over a WebSocket, as frames for `Renderer.stream`.

    with SocketSource(avatar.config, port=8765) as source:     # ws://127.0.0.1:8765
        for image in renderer.stream(source):                 # every pushed frame, in order
            writer.write(image)

Senders use the `render` messages of `engine.live.protocol` (their "steps" and "backend" are validated but the
consuming renderer's own settings apply). Unlike `avatar serve`, which renders only each client's newest
request for the lowest latency, a source keeps every frame: up to `max_queue` wait, and beyond that a sender's
socket is simply not read (TCP backpressure), so nothing is dropped. Malformed messages get an error reply and
are skipped. Iteration ends at `close()`, or when every sender that pushed a frame has disconnected.
"""

from __future__ import annotations

import queue
import threading

import torch

from ..frame import Frame
from .protocol import ProtocolError, StreamSpec, error_message, parse_message

_END = object()


class SocketSource:
    """An iterable of `Frame`s pushed over a WebSocket at ws://host:port (port 0: an ephemeral one, see `.port`).

    Args:
        config: the avatar's `AvatarConfig` (code size and names, image size).
        host: the address to listen on (default loopback only).
        max_queue: frames waiting for the renderer before senders are held back.
    """

    def __init__(self, config, host: str = "127.0.0.1", port: int = 8765, max_queue: int = 8):
        from websockets.sync.server import serve

        from ..backends import backend_names

        self.spec = StreamSpec.for_config(config, backends=tuple(backend_names()), backend="reference")
        self._queue: queue.Queue = queue.Queue(max_queue)
        self._lock = threading.Lock()
        self._senders = 0
        self._closed = threading.Event()
        self._server = serve(self._handle, host, port, max_size=max(16 << 20, 4 * self.spec.max_message_bytes))
        self.host, self.port = self._server.socket.getsockname()[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, name="socket-source", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def _handle(self, websocket) -> None:
        from websockets.exceptions import ConnectionClosed

        pushed = False
        try:
            for message in websocket:
                try:
                    request = parse_message(message, self.spec)
                    if request.code is None:
                        raise ProtocolError("a socket source takes render messages (codes); send webcam images "
                                            "to `avatar serve`", request.id)
                except ProtocolError as e:
                    websocket.send(error_message(str(e), e.request_id))
                    continue
                if not pushed:
                    pushed = True
                    with self._lock:
                        self._senders += 1
                if not self._put(Frame(request.camera, torch.from_numpy(request.code))):
                    return
        except ConnectionClosed:
            pass
        finally:
            if pushed:
                with self._lock:
                    self._senders -= 1
                    last = self._senders == 0
                if last:
                    self._put(_END)

    def _put(self, item) -> bool:
        """Queue `item`, waiting while the queue is full; False once the source is closed."""
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        while True:
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._closed.is_set():
                    return
                continue
            if item is _END:
                with self._lock:
                    if self._senders == 0:
                        return
                continue
            yield item

    def close(self) -> None:
        self._closed.set()
        self._server.shutdown()
        self._thread.join(5)

    def __enter__(self) -> "SocketSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
