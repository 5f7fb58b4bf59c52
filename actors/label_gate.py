"""What the label service checks before any route runs: where it binds, whom it answers.

- `check_bind`: the bind is loopback unless at least one annotator token is live.
- `Gate` (ASGI middleware): requests whose Host is not a loopback name, the bound host or an
  allowed host get 403, so do cross-origin requests (an `Origin` that is neither the page's own
  nor allowed); bodies over the cap get 413, whether announced by Content-Length or streamed;
  every response carries `SECURITY_HEADERS`. No CORS headers are ever sent.
- `TokenBucket`: the per-token rate limit (429 with Retry-After, raised by the service).
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Callable
from typing import Any

from starlette.datastructures import Headers

from actors.label_schemas import ApiError, error_response
from storage.ledger import Ledger

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


class UnsafeBind(ValueError):
    """A non-loopback bind was asked for while no annotator token is live."""


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback IP literals (`127.0.0.0/8`, `::1`)."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, ledger: Ledger) -> None:
    """Refuse to serve beyond loopback while the ledger holds no live annotator token.

    Raises:
        UnsafeBind: ``host`` is not loopback and every annotator is revoked (or none exists).
    """
    if is_loopback(host):
        return
    if not any(a.revoked_at is None for a in ledger.list_annotators()):
        raise UnsafeBind(
            f"refusing to bind the label service to {host!r}: it is not a loopback address and "
            "the ledger has no live annotator token, so anyone who can reach it could label. "
            "Create one with `prefloop annotators add NAME`, or bind 127.0.0.1"
        )


class TokenBucket:
    """Per-key token buckets: ``burst`` requests at once, refilled at ``rate`` per second."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets: dict[Any, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: Any) -> float:
        """Take a token for ``key``: 0.0 when granted, else seconds until one is available."""
        with self._lock:
            now = self.clock()
            tokens, then = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - then) * self.rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                return (1.0 - tokens) / self.rate
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0


class _BodyTooLarge(Exception):
    pass


def host_name(host_header: str) -> str:
    """The name of a Host header or bind address, lowercase, without port or IPv6 brackets."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Gate:
    """ASGI middleware run before any route: Host allowlist, Origin check, body cap, headers."""

    def __init__(self, app: Any, hosts: frozenset[str], origins: frozenset[str], max_body: int):
        self.app, self.hosts, self.origins, self.max_body = app, hosts, origins, max_body

    def _refusal(self, headers: Headers) -> ApiError | None:
        host = headers.get("host", "")
        if host_name(host) not in self.hosts:
            return ApiError(403, "forbidden_host", f"Host {host[:100]!r} is not served here")
        origin = headers.get("origin")
        if origin is not None and origin not in self.origins:
            scheme, _, netloc = origin.partition("://")
            if scheme not in ("http", "https") or netloc.lower() != host.lower():
                return ApiError(403, "forbidden_origin", f"cross-origin request from "
                                f"{origin[:100]!r} refused; open the page served here instead")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return ApiError(413, "body_too_large", f"request body over {self.max_body} bytes")
        return None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_with_headers(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()
                         if k.encode() not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        refusal = self._refusal(Headers(scope=scope))
        if refusal is not None:
            return await error_response(refusal)(scope, receive, send_with_headers)
        seen = 0

        async def capped_receive() -> Any:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise _BodyTooLarge
            return message

        try:
            await self.app(scope, capped_receive, send_with_headers)
        except _BodyTooLarge:
            if started:
                raise
            too_large = ApiError(413, "body_too_large", f"request body over {self.max_body} bytes")
            await error_response(too_large)(scope, receive, send_with_headers)
