"""Who may talk to `avatar serve`: the Host and Origin check of every HTTP request and WebSocket upgrade, and the
token a server reachable from other machines requires.

A browser lets any page open a WebSocket to any address, sending the page's own `Origin`; and a page whose
DNS name is rebound to this machine reaches it under that name (`Host: evil.example:PORT`). So a request is
refused with HTTP 403 (at the handshake, before any frame) unless its Host is a name this server is served
under and its Origin, when it has one, is the page's own (`scheme://Host`) or one allowed by `--allow-origin`.

A server bound to anything but loopback also requires a token (generated at start, or `--token`): in the page's
URL (`/?token=...`, which the page sends as its socket's first message, {"type": "hello", "token": ...}) and as
`?token=` on `/api/*`. A wrong or missing token closes the socket with code 1008 (policy violation).
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import socket
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from ..errors import InputError

WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def split_host(value: str) -> tuple[str, int | None]:
    """A Host header ("name:port", "[::1]:port", "name") -> (lower-case name, port or None); ("", None) if bad."""
    value = value.strip().lower()
    try:
        parts = urlsplit(f"//{value}")
        return (parts.hostname or "", parts.port)
    except ValueError:  # a port that is not a number, an unbalanced bracket
        return ("", None)


def normalise_origin(origin: str) -> str:
    """"HTTPS://Example.org:443/" -> "https://example.org" (scheme and host lower-case, default port dropped);
    InputError when it is not scheme://host[:port]."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        port, parts = None, None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.username:
        raise InputError(f"--allow-origin {origin!r} is not an origin (scheme://host[:port], e.g. "
                         "https://example.org or http://127.0.0.1:3000)")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    default = {"http": 80, "https": 443}[parts.scheme]
    return f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, default) else "")


@dataclass(frozen=True)
class AccessPolicy:
    """Which requests a server at `host`:`port` accepts.

    Args:
        host, port: the address the server listens on.
        allow_origins: origins (besides the page's own) whose pages may use the server: `--allow-origin`.
        allow_hosts: Host names (besides the served address) the server answers to, e.g. a TLS certificate's DNS
            name when serving on 0.0.0.0: `--allow-host`.
        token: the token clients must present (None: none required; `for_server` generates one for a non-loopback
            host).
        tls: whether the server speaks HTTPS/WSS (the scheme of the page's own origin).
    """

    host: str
    port: int
    allow_origins: frozenset[str] = frozenset()
    allow_hosts: frozenset[str] = frozenset()
    token: str | None = None
    tls: bool = False
    _names: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    @classmethod
    def for_server(cls, host: str, port: int, allow_origins=(), allow_hosts=(), token: str | None = None,
                   tls: bool = False) -> AccessPolicy:
        """The policy of `avatar serve --host host --port port ...`: a non-loopback host without `token` gets a
        generated one."""
        if token is not None and (len(token) < 8 or not token.isascii() or not token.isprintable()):
            raise InputError("--token must be at least 8 printable ASCII characters (or leave it out for a "
                             "generated one)")
        if token is None and not is_loopback(host):
            token = secrets.token_urlsafe(18)
        names = {host.lower().strip("[]")} | {h.lower() for h in allow_hosts}
        if host in WILDCARD_HOSTS:  # every address of the machine: its names too (IP literals pass by form)
            names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        return cls(host, port, frozenset(normalise_origin(o) for o in allow_origins), frozenset(allow_hosts),
                   token, tls, frozenset(names))

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def page_url(self, host: str | None = None) -> str:
        """The URL to open (with the token, when one is required)."""
        host = host or ("127.0.0.1" if self.host in WILDCARD_HOSTS else self.host)
        host = f"[{host}]" if ":" in host else host
        return f"{self.scheme}://{host}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    def host_allowed(self, name: str, port: int | None) -> bool:
        if port != self.port and not (port is None and self.port == (443 if self.tls else 80)):
            return False
        if is_loopback(name):  # a loopback name reaches only this machine: no rebinding through it
            return is_loopback(self.host) or self.host in WILDCARD_HOSTS or name in self._names
        if self.host in WILDCARD_HOSTS and _is_ip(name):
            return True
        return name in self._names

    def refusal(self, headers: dict[str, str], path: str, query: str) -> str | None:
        """Why a request is refused (HTTP 403), or None. `headers`: lower-case names -> values."""
        name, port = split_host(headers.get("host", ""))
        if not name or not self.host_allowed(name, port):
            return (f"Host {headers.get('host', '')!r} is not an address this server is served under; open "
                    f"{self.page_url()} (or start it with --allow-host NAME)")
        origin = headers.get("origin")
        if origin is not None:
            try:
                origin = normalise_origin(origin)
            except InputError:
                return f"Origin {origin!r} may not use this server"
            own = normalise_origin(f"{self.scheme}://{headers['host']}")
            if origin != own and origin not in self.allow_origins:
                return (f"Origin {origin} may not use this server; start it with --allow-origin {origin} to let "
                        "that page embed the viewer")
        if self.token is not None and path.startswith("/api/") and not self.token_ok(
                (parse_qs(query).get("token") or [None])[0]):
            return "this server requires its token: add ?token=... (printed at start) to the URL"
        return None

    def token_ok(self, token) -> bool:
        if self.token is None:
            return True
        return isinstance(token, str) and hmac.compare_digest(token.encode(), self.token.encode())


class AccessGuard:
    """ASGI middleware: requests `policy` refuses get HTTP 403 (a WebSocket upgrade is refused before it is
    accepted, which uvicorn answers with 403); others go to `app`."""

    def __init__(self, app, policy: AccessPolicy):
        self.app, self.policy = app, policy

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        reason = self.policy.refusal(headers, scope.get("path", ""), scope.get("query_string", b"").decode("latin-1"))
        if reason is None:
            return await self.app(scope, receive, send)
        body = f"403 Forbidden: {reason}\n".encode()
        if scope["type"] == "websocket":
            if "websocket.http.response" in scope.get("extensions", {}):
                await send({"type": "websocket.http.response.start", "status": 403,
                            "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
                await send({"type": "websocket.http.response.body", "body": body})
            else:
                await send({"type": "websocket.close", "code": 1008})
            return
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
