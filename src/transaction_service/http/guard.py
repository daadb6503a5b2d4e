"""The HTTP listener's edge: what one caller on the internet can hold before any signature is
checked (see docs/limits.md).

aiohttp bounds the size of each header line, but not the time a request head or body takes, nor
the connections or bodies in progress. So every connection goes through a `ConnectionGuard`, an
asyncio protocol wrapped around aiohttp's own, with one timer:

- idle: after opening, or after a response, a connection that sends nothing for
  `idle_timeout` is closed;
- head: from the first byte of a request head, the head must end (an empty line) within
  `head_timeout` and `max_head_bytes`, else the connection is closed (431 when too large);
- then the request is aiohttp's and the handler's: the webhook handler bounds its body in time
  and the bodies in progress at once (`BodySlots`).

Past `max_connections` a new connection is answered 503 and closed at once. `Shedding` counts
what is refused and logs each episode of shedding once, when it starts and when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import cast

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_request import BaseRequest

from transaction_service.config import Settings
from transaction_service.errors import Reason, RequestTimeout, Unavailable
from transaction_service.http.errors import Handler
from transaction_service.metrics import SHED, Metrics

log = logging.getLogger(__name__)

# After refusing a request whose body is still coming, what the client sends is read and dropped
# for this long (so it can read the answer instead of a reset), then the connection is closed.
LINGER_SECONDS = 2.0
# An episode of shedding ends when nothing was shed for this long.
SHED_QUIET_SECONDS = 10.0
# A refused caller may come back after this many seconds.
RETRY_AFTER_SECONDS = 1


def _canned(status: str, code: str, message: str) -> bytes:
    """A complete HTTP/1.1 response that closes the connection, with the JSON error body every
    refusal of this listener has (http/errors.py)."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: {RETRY_AFTER_SECONDS}\r\n"
        "Server: transaction-service\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


@dataclass(frozen=True)
class EdgeLimits:
    max_connections: int
    idle_timeout: float
    head_timeout: float
    max_head_bytes: int

    @classmethod
    def of(cls, settings: Settings, max_connections: int) -> EdgeLimits:
        return cls(
            max_connections=max_connections,
            idle_timeout=settings.http_idle_timeout_seconds,
            head_timeout=settings.http_head_timeout_seconds,
            max_head_bytes=settings.http_max_head_bytes,
        )


def connection_cap(wanted: int) -> tuple[int, int | None]:
    """`wanted`, lowered to half the process's file descriptor limit (its soft RLIMIT_NOFILE),
    so that HTTP connections can never take the descriptors gRPC and the store need; and that
    limit (None where the platform has none)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return wanted, None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted, None
    return max(1, min(wanted, soft // 2)), soft


class Shedding:
    """Counts what the listener refuses because a limit was reached (`SHED`), and logs once per
    episode: a line when it starts, a line with the counts when nothing was shed for
    `SHED_QUIET_SECONDS`."""

    def __init__(self, metrics: Metrics, limits: dict[str, int]) -> None:
        self._metrics = metrics
        self._limits = limits  # per kind, for the log line
        self._counts = dict.fromkeys(SHED, 0)
        self._started = 0.0
        self._last = 0.0
        self._check: asyncio.TimerHandle | None = None

    @property
    def active(self) -> bool:
        return self._check is not None

    def shed(self, what: str) -> None:
        self._metrics.http_shed_one(what)
        self._counts[what] += 1
        loop = asyncio.get_running_loop()
        self._last = loop.time()
        if self._check is None:
            self._started = self._last
            log.warning(
                "http: shedding load: %s limit reached (%d); refusing with 503 until it passes",
                _WHAT[what],
                self._limits[what],
            )
            self._check = loop.call_at(self._last + SHED_QUIET_SECONDS, self._maybe_ended)

    def _maybe_ended(self) -> None:
        loop = asyncio.get_running_loop()
        quiet_since = self._last + SHED_QUIET_SECONDS
        if loop.time() < quiet_since:
            self._check = loop.call_at(quiet_since, self._maybe_ended)
            return
        self._ended()

    def _ended(self) -> None:
        self._check = None
        log.warning(
            "http: shedding ended after %.1f s: %d connections and %d webhook bodies refused",
            self._last - self._started,
            self._counts["connection"],
            self._counts["body"],
        )
        self._counts = dict.fromkeys(SHED, 0)

    def close(self) -> None:
        """On stop: an episode still going is reported now."""
        if self._check is not None:
            self._check.cancel()
            self._ended()


_WHAT = {"connection": "connection", "body": "webhook bodies in progress"}


class BodySlots:
    """How many webhook bodies may be read from the network at once, before their signature can
    be checked; one more is refused (503), not queued: a queue would hold its connection."""

    def __init__(self, limit: int, body_timeout: float, shedding: Shedding, metrics: Metrics):
        self._free = limit
        self._timeout = body_timeout
        self._shedding = shedding
        self._metrics = metrics

    @contextlib.contextmanager
    def slot(self) -> Iterator[float]:
        """A slot for one body, for the time of the `with`; yields the seconds the body has to
        arrive. Raises Unavailable when none is free."""
        if self._free <= 0:
            self._shedding.shed("body")
            raise Unavailable(
                "too many webhook bodies are arriving at once; retry in a moment",
                reason=Reason.BUSY,
            )
        self._free -= 1
        try:
            yield self._timeout
        finally:
            self._free += 1

    def timed_out(self) -> RequestTimeout:
        self._metrics.http_closed_one("body_timeout")
        return RequestTimeout(
            f"the body did not arrive within {self._timeout:g} s", reason=Reason.BODY_TIMEOUT
        )


# The states of a guarded connection.
_IDLE = "idle"  # nothing received since opening or since the last response
_HEAD = "head"  # a request head is arriving
_REQUEST = "request"  # aiohttp and the handler have it, until its response is written
_LINGER = "linger"  # answered before its body was read: the rest is dropped until aiohttp closes
_CLOSING = "closing"  # refused by the guard: what arrives is dropped until the close

_HEAD_ENDS = (b"\r\n\r\n", b"\n\n")


class Connections:
    """The open guarded connections; called, it is the protocol factory of the listening socket."""

    def __init__(
        self,
        limits: EdgeLimits,
        make_inner: Callable[[], asyncio.Protocol],
        shedding: Shedding,
        metrics: Metrics,
    ) -> None:
        self.limits = limits
        self._make_inner = make_inner
        self.shedding = shedding
        self.metrics = metrics
        self.open = 0
        metrics.count_http_connections(lambda: self.open)

    def __call__(self) -> ConnectionGuard:
        return ConnectionGuard(self)

    def admit(self) -> asyncio.Protocol | None:
        """aiohttp's protocol for a new connection; None when the listener is full."""
        if self.open >= self.limits.max_connections:
            self.shedding.shed("connection")
            return None
        self.open += 1
        return self._make_inner()

    def released(self) -> None:
        self.open -= 1


_BUSY = _canned(
    "503 Service Unavailable",
    "UNAVAILABLE",
    "this server has too many connections open; retry in a moment",
)


class ConnectionGuard(asyncio.Protocol):
    """One connection: passes everything to aiohttp's protocol, and closes the connection itself
    when the client is too slow or its request head too large."""

    def __init__(self, connections: Connections) -> None:
        self._connections = connections
        self._limits = connections.limits
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._state = _IDLE
        self._head_bytes = 0
        self._tail = b""
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio's classes, but have their methods.
        self._transport = transport = cast(asyncio.Transport, transport)
        self._inner = self._connections.admit()
        if self._inner is None:
            self._state = _CLOSING
            transport.write(_BUSY)
            transport.close()
            return
        self._inner.connection_made(transport)
        self._arm(self._limits.idle_timeout, "idle_timeout")

    def data_received(self, data: bytes) -> None:
        if self._state in (_LINGER, _CLOSING):
            # Dropped here as it arrives, rather than queued for aiohttp to drop: a thousand
            # refused senders would otherwise each hold a chunk until aiohttp gets to it.
            return
        if self._state in (_IDLE, _HEAD) and not self._watch_head(data):
            return
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._inner is None or self._state == _CLOSING:
            return None
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._inner is not None:
            inner, self._inner = self._inner, None
            self._connections.released()
            inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    # -- what the application tells it ----------------------------------------------------------

    def request_started(self) -> None:
        """A request reached the handlers: its head is complete (even one the scan missed)."""
        if self._state in (_IDLE, _HEAD):
            self._state = _REQUEST
            self._disarm()

    def response_written(self, body_read: bool) -> None:
        """The response is written. If the request's body was read to its end, the connection
        can carry another request; if not, aiohttp drops the rest for a while and closes it."""
        if self._state == _CLOSING:
            return
        if body_read:
            self._state = _IDLE
            self._arm(self._limits.idle_timeout, "idle_timeout")
        else:
            self._state = _LINGER
            self._arm(LINGER_SECONDS + 1, "")  # aiohttp closes it first; this is a backstop

    # -- internals --------------------------------------------------------------------------------

    def _watch_head(self, data: bytes) -> bool:
        """Account `data` to the request head; False if the guard refused the connection."""
        if self._state == _IDLE:
            self._state = _HEAD
            self._head_bytes = 0
            self._tail = b""
            self._arm(self._limits.head_timeout, "head_timeout")
        scanned = self._tail + data
        ends = [i + len(end) for end in _HEAD_ENDS if (i := scanned.find(end)) >= 0]
        if ends:
            self._head_bytes += min(ends) - len(self._tail)
        else:
            self._head_bytes += len(data)
            self._tail = scanned[-3:]
        if self._head_bytes > self._limits.max_head_bytes:
            self._refuse(
                "head_too_large",
                _canned(
                    "431 Request Header Fields Too Large",
                    "HEAD_TOO_LARGE",
                    f"the request head is larger than {self._limits.max_head_bytes} bytes, the "
                    "limit of this server",
                ),
            )
            return False
        if ends:
            self._state = _REQUEST
            self._disarm()
        return True

    def _refuse(self, reason: str, answer: bytes = b"") -> None:
        """Answer (if `answer`), drop what arrives for a moment so the client can read it, close."""
        self._connections.metrics.http_closed_one(reason)
        self._state = _CLOSING
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if answer:
            transport.write(answer)
            self._arm(LINGER_SECONDS, "")
        else:
            transport.close()

    def _arm(self, seconds: float, reason: str) -> None:
        self._disarm()
        self._timer = asyncio.get_running_loop().call_later(seconds, self._expired, reason)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self, reason: str) -> None:
        self._timer = None
        if self._state == _CLOSING or not reason:
            if self._transport is not None:
                self._transport.close()
            return
        self._refuse(reason)


def guard_of(request: web.BaseRequest) -> ConnectionGuard | None:
    transport = request.transport
    protocol = transport.get_protocol() if transport is not None else None
    return protocol if isinstance(protocol, ConnectionGuard) else None


@web.middleware
async def guarded_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Tells the connection's guard that its request reached the handlers; and closes, after the
    answer, a connection whose request body was not read to its end (a refusal before the body),
    rather than wait for the rest of that body to read the next request."""
    guard = guard_of(request)
    if guard is not None:
        guard.request_started()
    response = await handler(request)
    if not request.content.is_eof():
        response.force_close()
    return response


class ResponseWritten(AbstractAccessLogger):
    """aiohttp calls an access logger's `log` once a response is completely written: that is
    where a guarded connection's request ends. Nothing is logged (webhook outcomes have their
    own line)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        guard = guard_of(request)
        if guard is not None:
            guard.response_written(request.content.is_eof() and response.keep_alive is not False)

    @property
    def enabled(self) -> bool:
        return True


class JsonErrors(web.RequestHandler):
    """aiohttp's protocol for one connection, answering a request it cannot parse (a bad request
    line, header or chunked encoding; 400) as every other refusal of this listener is: a JSON
    error body and this server's `Server` header. aiohttp's own answer is text with the bytes
    it choked on as a Python literal, and names aiohttp's and Python's versions on a port that
    faces the internet."""

    __slots__ = ()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's: logs it (`MalformedRequests` makes that one line) and refuses to answer on
        # a connection whose response has begun.
        super().handle_error(request, status, exc, message)
        if status == 504:  # the handler did not finish in time
            code, text = "DEADLINE_EXCEEDED", "the server did not answer in time; retry"
        elif status >= 500:
            code, text = "INTERNAL", "the server could not answer this request"
        else:
            # The first line of aiohttp's message names the fault ("Invalid header token:");
            # what follows quotes the bytes, which are the caller's and are not repeated.
            reason = (message or "").split("\n", 1)[0].strip().rstrip(":")
            code = "MALFORMED_REQUEST"
            text = "malformed HTTP request" + (f": {reason}" if reason else "")
        response = web.json_response(
            {"error": {"code": code, "message": text}},
            status=status,
            headers={"Server": "transaction-service"},
        )
        response.force_close()
        return response


class MalformedRequests(logging.Filter):
    """aiohttp logs a request it cannot parse (bad request line, bad chunked encoding...) at
    ERROR with a traceback, although it answers 400 and nothing is wrong with the server: one
    line at INFO instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = (
                "http: malformed request answered %d: %s",
                (
                    exc.code or 400,
                    exc.message,
                ),
            )
            record.exc_info, record.exc_text = None, None
            return logging.getLogger(record.name).isEnabledFor(logging.INFO)
        return True
