"""The server's network edge: which connections and requests reach the app at all, and for how long.

uvicorn already gives a keep-alive timeout (`timeout_keep_alive`), a request limit that answers 503
(`limit_concurrency`) and a cap on buffered headers (`h11_max_incomplete_event_size`); `run.uvicorn_config` passes
those. What it lacks is added here, each piece small and separate:

- `GuardedH11Protocol`: uvicorn's h11 protocol plus a deadline for a request's headers (a client that connects and
  then sends nothing, or one byte at a time, is closed) and a hard cap on open connections (one more is closed as
  soon as it is accepted, so idle clients cannot use up the process's file descriptors).
- `BrowserGuard`: ASGI middleware that refuses a `Host` this server does not answer to (DNS rebinding) and a
  cross-origin POST, so a web page the user visits cannot drive a server on localhost.
- `RepeatFilter`: a logging filter that lets one line per message through per interval, so a flood of bad clients
  cannot flood the log.
- `bind_socket`: the listening socket, bound before the model is loaded, so a port in use is reported at once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any, Callable
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


# --------------------------------------------------------------------------------------------- connections
class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline and a connection cap.

    The deadline runs from when the connection opens, and again from the end of each response, until the next
    request's headers are complete; data arriving slowly does not reset it (uvicorn's keep-alive timer does reset).
    Build it with `functools.partial(GuardedH11Protocol, header_timeout_s=..., max_connections=...)` as uvicorn's
    `http` protocol class.
    """

    def __init__(self, *args: Any, header_timeout_s: float, max_connections: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self.logger.warning("more than %d connections open; closing new ones", self.max_connections)
            transport.abort()
            return
        self._start_deadline()

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's headers are complete: the app (and its body timeout) takes over
            self._stop_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._start_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_deadline()
        super().connection_lost(exc)

    def _start_deadline(self) -> None:
        self._stop_deadline()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _stop_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self.logger.warning("closed a connection that sent no complete request within %g s",
                                self.header_timeout_s)
            self.transport.close()


def bind_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A TCP socket listening on host:port; OSError naming the address when it cannot be had (e.g. in use)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.setblocking(False)
    return sock


# ----------------------------------------------------------------------------------------------- browsers
def browser_refusal(method: str, headers: Headers, allowed_hosts: tuple[str, ...],
                    allowed_origins: tuple[str, ...]) -> tuple[int, str, str] | None:
    """(status, code, message) when a request must be refused for browser safety, else None.

    The `Host` header's name must be one of `allowed_hosts` ("*": any). A request that can change something (any
    method but GET, HEAD, OPTIONS) that carries an `Origin` must come from the server's own origin (the scheme and
    `Host` it was reached at) or one of `allowed_origins`; clients outside a browser send no `Origin`.
    """
    host = headers.get("host", "")
    name = _host_name(host)
    if "*" not in allowed_hosts and name not in allowed_hosts:
        return 400, "invalid_host", (f"this server does not answer to the host {host!r}; allowed: "
                                     f"{', '.join(allowed_hosts)} (serve with --allowed-host to add one)")
    origin = headers.get("origin")
    if method in SAFE_METHODS or origin is None:
        return None
    if origin in allowed_origins or (origin != "null" and urlsplit(origin).netloc.lower() == host.lower()):
        return None
    return 403, "cross_origin", (f"cross-origin request from {origin!r} refused; this server accepts POSTs from its "
                                 "own page and from clients outside a browser (serve with --allowed-origin to add one)")


def _host_name(host: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '::1', 'LocalHost' -> 'localhost'."""
    if host.startswith("["):
        return host[1:].partition("]")[0].lower()
    return host.rpartition(":")[0].lower() if host.count(":") == 1 else host.lower()


class BrowserGuard:
    """ASGI middleware answering `browser_refusal`'s refusals with OpenAI-style error objects."""

    def __init__(self, app: Any, allowed_hosts: tuple[str, ...], allowed_origins: tuple[str, ...],
                 error_body: Callable[[int, str, str], dict]) -> None:
        self.app = app
        self.allowed_hosts = allowed_hosts
        self.allowed_origins = allowed_origins
        self.error_body = error_body

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            refusal = browser_refusal(scope["method"], Headers(scope=scope), self.allowed_hosts, self.allowed_origins)
            if refusal is not None:
                status, code, message = refusal
                await JSONResponse(self.error_body(status, code, message), status_code=status)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ------------------------------------------------------------------------------------------------ logging
class RepeatFilter(logging.Filter):
    """Let each kind of message through at most once per `interval_s` seconds; the next one that passes says how
    many were held back. A flood of bad clients then costs a few log lines, not megabytes.

    A message's kind is its logger and the first line of its template: asyncio writes each failed accept() as a
    fresh multi-line text whose later lines (timer handles, sockets) differ every time.
    """

    def __init__(self, interval_s: float = 10.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._last: dict[str, tuple[float, int]] = {}  # template -> (time let through, suppressed since)

    def filter(self, record: logging.LogRecord) -> bool:
        key = f"{record.name}:{str(record.msg).partition(chr(10))[0][:120]}"
        now = time.monotonic()
        last, suppressed = self._last.get(key, (float("-inf"), 0))
        if now - last < self.interval_s:
            self._last[key] = (last, suppressed + 1)
            return False
        if suppressed:
            record.msg = f"{record.msg} (and {suppressed} more like it in the last {self.interval_s:g} s)"
        self._last[key] = (now, 0)
        return True


def quiet_repeats(interval_s: float = 10.0) -> None:
    """Install a `RepeatFilter` on the loggers that bad clients can make talk: uvicorn's and asyncio's."""
    for name in ("uvicorn.error", "asyncio", "gpt2lab.serve"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RepeatFilter) for f in logger.filters):
            logger.addFilter(RepeatFilter(interval_s))
