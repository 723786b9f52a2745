"""Push a sweep of expression codes and cameras to `avatar serve` and save the frames that come back.

    avatar serve --avatar tiny &
    python examples/stream_client.py --url ws://127.0.0.1:8000/ws --frames 48 --out out/stream

Any program can drive an avatar this way (a tracker on another machine, a game engine): send JSON
`render` messages, read binary frames (a 4-byte big-endian header length, a JSON header, a JPEG). The format is
documented in engine/live/protocol.py. Needs only the `websockets` package.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import time
from pathlib import Path

from websockets.sync.client import connect


def sweep(info: dict, frames: int) -> list[dict]:
    """Render messages: the code moves around the pad's four corners while the camera swings left to right."""
    corners = info["corners"]  # [4][E]: neutral, then three expressions
    messages = []
    for i in range(frames):
        phase = i / max(frames - 1, 1)
        k, w = divmod(phase * 3, 1)  # neutral -> corner 1 -> corner 2 -> corner 3
        a, b = corners[int(k)], corners[min(int(k) + 1, 3)]
        code = [(1 - w) * x + w * y for x, y in zip(a, b)]
        camera = {"yaw": 25 * math.sin(2 * math.pi * phase), "pitch": 5 * math.cos(2 * math.pi * phase),
                  "distance": 1.0}
        messages.append({"type": "render", "id": i, "code": code, "camera": camera})
    return messages


def read_frame(data: bytes) -> tuple[dict, bytes]:
    """A binary frame message -> (header, JPEG bytes)."""
    (n,) = struct.unpack_from(">I", data)
    return json.loads(data[4:4 + n]), data[4 + n:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8000/ws", help="the server's WebSocket endpoint")
    parser.add_argument("--frames", type=int, default=48, help="frames to push (default: 48)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the server's)")
    parser.add_argument("--out", default="out/stream", help="folder for the returned JPEG frames")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with connect(args.url, max_size=None) as ws:
        info = json.loads(ws.recv())  # the server introduces itself first
        print(f"connected to {info['avatar']} ({info['image_size']} px, codes of {info['expression_dim']})")
        start, latencies = time.perf_counter(), []
        for message in sweep(info, args.frames):
            if args.steps is not None:
                message["steps"] = args.steps
            sent = time.perf_counter()
            ws.send(json.dumps(message))
            # one request in flight: every frame is rendered (a faster sender would see stale ones dropped)
            reply = ws.recv()
            if isinstance(reply, str):
                print(f"frame {message['id']}: {json.loads(reply)['message']}")
                continue
            header, jpeg = read_frame(reply)
            latencies.append(1e3 * (time.perf_counter() - sent))
            (out / f"{header['id']:05d}.jpg").write_bytes(jpeg)
        elapsed = time.perf_counter() - start
    if latencies:
        latencies.sort()
        print(f"{len(latencies)} frames in {elapsed:.1f} s ({len(latencies) / elapsed:.1f} fps), round trip median "
              f"{latencies[len(latencies) // 2]:.0f} ms; saved to {out.resolve()}")
    return 0 if latencies else 1


if __name__ == "__main__":
    raise SystemExit(main())
