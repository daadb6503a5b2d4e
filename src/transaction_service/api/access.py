"""What every gRPC call leaves behind: a request id, the per-call metrics, and access log lines.

`CallObserver` wraps each method's handler:

- a **request id** for the call: the caller's `x-request-id` metadata when it sends a usable one,
  else a new one. It is set in `logs.request_id` while the call runs, so every log line the call
  writes carries it, and `api/errors.py` puts it in each error's details (`google.rpc.RequestInfo`),
  so a caller's error can be found in the log;
- the **metrics** go-grpc-prometheus defines (`grpc_server_started_total`,
  `grpc_server_handled_total`, `grpc_server_handling_seconds`);
- **access log lines** (logger `transaction_service.access`): one per unary call when it ends,
  failures included (method, code, milliseconds, the caller's role, peer, request id); for a
  stream, one when it opens and one when it ends (messages received and sent, and why it ended).
  Successful unary reads (`read_methods`) are sampled: one call in `reads_every` of each method
  gets its line, with `sampled` saying how many calls it stands for (the setting
  `access_log_reads_every`; a line costs more than the read itself, docs/performance.md).

Each method's handler is wrapped once, at registration (`CallObserver.wrap`, by
`api/gateway.py`), not by a grpc.aio interceptor. A call the token check refuses (`api/auth.py`)
is answered by a handler wrapped the same way, so refused calls are counted and logged too.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import grpc

from transaction_service import logs, tracing
from transaction_service.auth import BearerTokens, bearer_token
from transaction_service.metrics import GRPC_TYPES, GrpcMethodMetrics, Metrics

if TYPE_CHECKING:
    # What a handler is handed; the request and response types change nothing it does with it.
    Context = grpc.aio.ServicerContext[Any, Any]
else:
    Context = grpc.aio.ServicerContext
# A grpc.aio handler's behaviour (types-grpcio types a handler's callables as synchronous ones).
UnaryBehavior = Callable[[Any, Context], Awaitable[Any]]
StreamBehavior = Callable[[Any, Context], AsyncIterator[Any]]

access_log = logging.getLogger("transaction_service.access")

# gRPC metadata keys are lowercase; HTTP header names are case-insensitive.
REQUEST_ID_KEY = "x-request-id"
# A caller's own request id is taken as it is when it looks like one (no spaces, no control
# characters, not too long); anything else gets a new id.
_USABLE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,64}")
# New ids: this process's random prefix and a counter (unique without a random draw per call).
_PREFIX = os.urandom(4).hex()
_counter = itertools.count(1)


def new_request_id() -> str:
    return f"{_PREFIX}-{next(_counter):x}"


def usable_request_id(value: object) -> bool:
    return isinstance(value, str) and _USABLE_REQUEST_ID.fullmatch(value) is not None


def request_id_from(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and usable_request_id(value):
            assert isinstance(value, str)
            return value
    return new_request_id()


@dataclass(slots=True)
class Call:
    """The call being served (see `current_call`). What the access line needs of the call's
    context is read when it starts: once a client has cancelled, grpc.aio may have freed the
    call, and asking the context then can crash the process."""

    request_id: str
    peer: str
    # When the call's deadline passes (time.monotonic()), if it has one.
    deadline: float | None
    # The call's metadata (the role of its token is worked out from it for a line written).
    metadata: Iterable[tuple[str, str | bytes]] | None = None
    # The reason of the error the call was refused with (`ErrorInfo.reason`), set by
    # api/errors.py; names why a stream ended (e.g. SHUTTING_DOWN).
    reason: str = ""
    received: int = 0
    sent: int = 0


current_call: contextvars.ContextVar[Call | None] = contextvars.ContextVar(
    "current_call", default=None
)

# grpc.aio reports a call's code as a grpc.StatusCode, or as the core's number before any was set.
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
_CODE_NUMBERS = {name: number for number, name in _CODE_NAMES.items()}


def _code_name(code: object) -> str:
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        return _CODE_NAMES.get(code, "UNKNOWN")
    return "OK"


def _ended_by_cancel(call: Call, observer: CallObserver) -> str:
    """The code of a call whose handler was cancelled: its deadline passed, the server cut it
    off at the end of its shutdown grace (the reason then says SHUTTING_DOWN), or its client
    left."""
    if call.deadline is not None and time.monotonic() >= call.deadline:
        return "DEADLINE_EXCEEDED"
    if observer.cutting_off:
        call.reason = "SHUTTING_DOWN"
    return "CANCELLED"


def _why(code: str, reason: str) -> str:
    """Why a stream ended, for its last log line."""
    if code == "OK":
        return "completed"
    if code == "CANCELLED" and reason == "SHUTTING_DOWN":
        return "cut off at the end of the shutdown grace"
    if code == "CANCELLED":
        return "cancelled by the client"
    if code == "DEADLINE_EXCEEDED":
        return "deadline exceeded"
    if reason == "SHUTTING_DOWN":
        return "server shutting down"
    return "refused" if code in ("UNAUTHENTICATED", "PERMISSION_DENIED") else "error"


class Sampler:
    """Which successful calls of one method get an access line: the first, then one in
    `every` (0: none)."""

    __slots__ = ("_left", "every")

    def __init__(self, every: int) -> None:
        self.every = every
        self._left = 1

    def take(self) -> bool:
        if not self.every:
            return False
        self._left -= 1
        if self._left:
            return False
        self._left = self.every
        return True


class CallObserver:
    """Request id, metrics and access log lines for every call (see the module's doc).

    Not a grpc.aio interceptor: each method's handler is wrapped once, when it is registered
    (`wrap`, called by `api/gateway.py`), and reads what it needs of a call from its context.
    An interceptor costs every call a chain of coroutines and a handler made anew (measured on
    GetTransaction: docs/performance.md, "Access lines").

    `read_methods` (full names, `/package.Service/Method`) are the methods whose successful
    unary calls are sampled, one in `reads_every`."""

    def __init__(
        self,
        metrics: Metrics,
        tokens: BearerTokens,
        *,
        reads_every: int = 1,
        read_methods: Iterable[str] = (),
    ) -> None:
        self._metrics = metrics
        self._tokens = tokens
        self._methods: dict[str, GrpcMethodMetrics] = {}
        self._reads_every = reads_every
        self._read_methods = frozenset(read_methods)
        # Set when the server cancels the calls still running at the end of its shutdown grace.
        self.cutting_off = False

    def register(self, service: Any) -> None:
        """Show `service`'s methods (a ServiceDescriptor) in the metrics before their first
        call, as go-grpc-prometheus's InitializeMetrics does."""
        for method in service.methods:
            self.method_metrics(
                f"/{service.full_name}/{method.name}",
                GRPC_TYPES[method.client_streaming, method.server_streaming],
            )

    def method_metrics(self, method: str, grpc_type: str) -> GrpcMethodMetrics:
        found = self._methods.get(method)
        if found is None:
            service, _, name = method.lstrip("/").partition("/")
            found = self._methods[method] = self._metrics.grpc_method(grpc_type, service, name)
        return found

    def role(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
        """The role the call's token gives: ingest, read, or anonymous (no valid token, or no
        tokens configured: then every caller may do everything)."""
        if not self._tokens.required:
            return "anonymous"
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str):
                token = bearer_token(value)
                role = self._tokens.role_of(token) if token else None
                return role.value if role else "anonymous"
        return "anonymous"

    def wrap(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """`handler` of `method` (its full name), observed: same shape, same codecs."""
        streaming = handler.request_streaming, handler.response_streaming
        sampler = (
            Sampler(self._reads_every)
            if self._reads_every != 1 and not any(streaming) and method in self._read_methods
            else None
        )
        observed = _Observed(self, method, GRPC_TYPES[streaming], sampler)
        codecs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                observed.stream(cast(StreamBehavior, handler.stream_stream), count_requests=True),
                **codecs,
            )
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(
                observed.unary(cast(UnaryBehavior, handler.stream_unary)), **codecs
            )
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                observed.stream(cast(StreamBehavior, handler.unary_stream), count_requests=False),
                **codecs,
            )
        return grpc.unary_unary_rpc_method_handler(
            observed.unary(cast(UnaryBehavior, handler.unary_unary)), **codecs
        )


class _Observed:
    """One method: wraps its handler's behaviour; what a call needs is read from its context."""

    __slots__ = ("_grpc_type", "_method", "_metrics", "_name", "_observer", "_sampler")

    def __init__(
        self, observer: CallObserver, method: str, grpc_type: str, sampler: Sampler | None
    ) -> None:
        self._observer = observer
        self._method = method
        self._name = method.lstrip("/")
        self._grpc_type = grpc_type
        self._sampler = sampler
        # Looked up at the first call: methods not registered with their service's descriptor
        # (reflection) show up in the metrics once called.
        self._metrics: GrpcMethodMetrics | None = None

    def _begin(
        self, context: Context
    ) -> tuple[Call, GrpcMethodMetrics, contextvars.Token[Call | None], contextvars.Token[str]]:
        metrics = self._metrics
        if metrics is None:
            metrics = self._metrics = self._observer.method_metrics(self._method, self._grpc_type)
        metrics.started()
        metadata = context.invocation_metadata()
        request_id = request_id_from(metadata)
        remaining = context.time_remaining()
        call = Call(
            request_id,
            context.peer(),
            time.monotonic() + remaining if remaining is not None else None,
            metadata=metadata,
        )
        return call, metrics, current_call.set(call), logs.request_id.set(request_id)

    def _end(
        self,
        call: Call,
        metrics: GrpcMethodMetrics,
        code: str,
        started: float,
        message: str,
        **extra: Any,
    ) -> None:
        seconds = time.perf_counter() - started
        metrics.handled(code, seconds)
        if code != "OK":
            tracing.call_failed(code, _CODE_NUMBERS.get(code, 2))
        elif (sampler := self._sampler) is not None:
            if not sampler.take():
                return
            extra["sampled"] = sampler.every
        fields = {
            "method": self._name,
            "code": code,
            "ms": round(seconds * 1000, 2),
            # The role is worked out (from the token) only for a line that is written.
            "role": self._observer.role(call.metadata),
            "peer": call.peer,
            **extra,
        }
        if call.reason:
            fields["reason"] = call.reason
        access_log.info(message, extra={"fields": fields})

    def unary(self, behavior: UnaryBehavior) -> UnaryBehavior:
        async def observed(request: Any, context: Context) -> Any:
            call, metrics, call_token, id_token = self._begin(context)
            started = time.perf_counter()
            code = "UNKNOWN"
            try:
                response = await behavior(request, context)
                code = _code_name(context.code())
                return response
            except asyncio.CancelledError:
                code = _ended_by_cancel(call, self._observer)
                raise
            except grpc.aio.AbortError:
                code = _code_name(context.code())
                raise
            finally:
                self._end(call, metrics, code, started, "grpc call")
                current_call.reset(call_token)
                logs.request_id.reset(id_token)

        return observed

    def stream(
        self,
        behavior: Callable[[Any, Context], AsyncIterator[Any]],
        *,
        count_requests: bool,
    ) -> Callable[[Any, Context], AsyncIterator[Any]]:
        async def observed(request: Any, context: Context) -> AsyncIterator[Any]:
            call, metrics, call_token, id_token = self._begin(context)
            started = time.perf_counter()
            access_log.info(
                "grpc stream opened",
                extra={
                    "fields": {
                        "method": self._name,
                        "role": self._observer.role(call.metadata),
                        "peer": call.peer,
                    }
                },
            )
            if count_requests:
                request = _counted(request, call)
            code = "UNKNOWN"
            try:
                async for response in behavior(request, context):
                    call.sent += 1
                    yield response
                code = _code_name(context.code())
            except asyncio.CancelledError:
                code = _ended_by_cancel(call, self._observer)
                raise
            except GeneratorExit:
                # The stream was closed from outside: its client went away, or its deadline
                # (or one of the server's, e.g. a results PDF's) passed.
                code = _ended_by_cancel(call, self._observer)
                raise
            except grpc.aio.AbortError:
                code = _code_name(context.code())
                raise
            finally:
                self._end(
                    call,
                    metrics,
                    code,
                    started,
                    "grpc stream ended",
                    received=call.received,
                    sent=call.sent,
                    ended=_why(code, call.reason),
                )
                # A generator may be finalised in another context than the one it started in.
                try:
                    current_call.reset(call_token)
                    logs.request_id.reset(id_token)
                except ValueError:
                    pass

        return observed


async def _counted(requests: AsyncIterator[Any], call: Call) -> AsyncIterator[Any]:
    async for request in requests:
        call.received += 1
        yield request
