"""The one place where use-case errors become gRPC statuses.

Servicer methods raise `transaction_service.errors` exceptions; `@grpc_errors` turns them into
rich statuses (google.rpc.BadRequest for invalid arguments, google.rpc.ErrorInfo where the client
can act on a reason). Anything else escaping a handler is a bug or an unexpected fault: the caller
gets INTERNAL with a generic message (never Python's exception text), and the log gets the
traceback once. Every error carries the call's request id (google.rpc.RequestInfo), the one its
log lines carry (see api/access.py).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2, struct_pb2
from google.protobuf.message import DecodeError, Message

# googleapis-common-protos ships no type information (and typeshed has none for it).
from google.rpc import code_pb2, error_details_pb2, status_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status

from transaction_service import logs
from transaction_service.api.access import Context as Context
from transaction_service.api.access import current_call
from transaction_service.domain.limits import MAX_BODY_DEPTH
from transaction_service.errors import (
    AlreadyExists,
    DeadlinePassed,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    OutOfRange,
    Overloaded,
    PermissionDenied,
    RequestTimeout,
    ServiceError,
    TooLarge,
    Unauthenticated,
    Unavailable,
)
from transactions.v1 import transactions_pb2 as pb

log = logging.getLogger(__name__)

ERROR_DOMAIN = "transactions.v1"
MAX_MESSAGE = 2000

F = TypeVar("F", bound=Callable[..., Any])

# Most specific first (a subclass maps as its base does).
CODES: tuple[tuple[type[ServiceError], int], ...] = (
    (InvalidArgument, code_pb2.INVALID_ARGUMENT),
    (AlreadyExists, code_pb2.ALREADY_EXISTS),
    (NotFound, code_pb2.NOT_FOUND),
    (Unauthenticated, code_pb2.UNAUTHENTICATED),
    (PermissionDenied, code_pb2.PERMISSION_DENIED),
    (TooLarge, code_pb2.RESOURCE_EXHAUSTED),
    (Overloaded, code_pb2.RESOURCE_EXHAUSTED),
    (DeadlinePassed, code_pb2.DEADLINE_EXCEEDED),
    (OutOfRange, code_pb2.OUT_OF_RANGE),
    (Unavailable, code_pb2.UNAVAILABLE),
    (RequestTimeout, code_pb2.DEADLINE_EXCEEDED),
    (FailedPrecondition, code_pb2.FAILED_PRECONDITION),
)


def status_for(exc: ServiceError) -> status_pb2.Status:
    """The google.rpc.Status a use-case error is answered with: BadRequest for an invalid
    argument, ErrorInfo where the error names a reason, then RetryInfo where it says when to
    retry (ErrorInfo stays first: clients read the reason from the first detail)."""
    # A ServiceError subclass nobody mapped is still not the caller's fault: INTERNAL.
    code = next((code for kind, code in CODES if isinstance(exc, kind)), code_pb2.INTERNAL)
    message = exc.message
    detail: Message | None = None
    if isinstance(exc, InvalidArgument):
        message = "invalid request: " + exc.message
        detail = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in exc.violations
            ]
        )
    elif exc.reason:
        detail = error_details_pb2.ErrorInfo(
            reason=exc.reason, domain=ERROR_DOMAIN, metadata=exc.metadata
        )
    found: list[Message] = [detail] if detail is not None else []
    if exc.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(exc.retry_after * 1e9))
        found.append(error_details_pb2.RetryInfo(retry_delay=delay))
    return _status(code, message, found)


def _status(code: int, message: str, found: list[Message]) -> status_pb2.Status:
    """A status with the `found` details and the call's RequestInfo (if served in a call)."""
    details = []
    for message_detail in found:
        packed = any_pb2.Any()
        packed.Pack(message_detail)
        details.append(packed)
    if request_id := logs.request_id.get():
        packed = any_pb2.Any()
        packed.Pack(error_details_pb2.RequestInfo(request_id=request_id))
        details.append(packed)
    return status_pb2.Status(code=code, message=message[:MAX_MESSAGE], details=details)


def ingest_error(exc: ServiceError) -> pb.IngestError:
    """An `IngestError` for one refused request of an IngestEvents stream: the code, message,
    reason and field violations the same request to IngestEvent would have ended with."""
    status = status_for(exc)
    violations = exc.violations if isinstance(exc, InvalidArgument) else []
    return pb.IngestError(
        code=status.code,
        message=status.message,
        reason=exc.reason or "",
        field_violations=[
            pb.IngestError.FieldViolation(field=v.field, description=v.description)
            for v in violations
        ],
    )


async def abort(context: Context, exc: ServiceError) -> NoReturn:
    if exc.reason and (call := current_call.get()) is not None:
        call.reason = exc.reason
    await context.abort_with_status(rpc_status.to_status(status_for(exc)))
    raise AssertionError("unreachable: abort_with_status raises")  # pragma: no cover


async def _abort_internal(context: Context, method: str) -> NoReturn:
    log.exception("unexpected error in %s", method)
    status = _status(
        code_pb2.INTERNAL, "internal error; it was logged on the server. Retry later.", []
    )
    await context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("unreachable")  # pragma: no cover


class UndecodableRequest:
    """Stands in for a request message protobuf could not decode.

    gRPC would answer a deserializer's exception with UNKNOWN and the parser's text; handed this
    instead, `@grpc_errors` answers INVALID_ARGUMENT naming the field.
    """

    def __init__(self, error: InvalidArgument) -> None:
        self.error = error


def tolerant_deserializer(
    message_type: type[Message],
) -> Callable[[bytes], Message | UndecodableRequest]:
    """`message_type.FromString`, but a message that does not decode becomes UndecodableRequest.

    Protobuf decodes at most 100 nested messages; a Struct body takes three per level of JSON, so
    one nested much deeper than MAX_BODY_DEPTH fails here rather than in the use case's own check.
    """
    descriptor = message_type.DESCRIPTOR
    # The field whose content can nest without bound is the one to blame for a decoding failure.
    nesting = next(
        (
            f.name
            for f in descriptor.fields
            if f.message_type is not None
            and f.message_type.full_name == struct_pb2.Struct.DESCRIPTOR.full_name
        ),
        "",
    )
    if nesting:
        description = (
            f"could not be decoded: nested deeper than protobuf decodes (a body may nest objects "
            f"and arrays at most {MAX_BODY_DEPTH} levels), or not a valid {descriptor.name} message"
        )
    else:
        description = f"could not be decoded: not a valid {descriptor.name} message"
    refusal = UndecodableRequest(InvalidArgument([FieldViolation(nesting, description)]))

    def deserialize(raw: bytes) -> Message | UndecodableRequest:
        try:
            return message_type.FromString(raw)
        except DecodeError:
            return refusal

    return deserialize


class StatusOnError:
    """What `@grpc_errors` does, as `async with StatusOnError(request, context, name):` around
    a streaming method's body, for the watch streams: the decorator is an async generator of
    its own between gRPC and the method, one more frame and pending step held by every open
    stream for as long as it is open (thousands of watches, for hours); this is one small
    object."""

    __slots__ = ("_context", "_name", "_request")

    def __init__(self, request: object, context: Context, name: str) -> None:
        self._request = request
        self._context = context
        self._name = name

    async def __aenter__(self) -> None:
        request, self._request = self._request, None
        if isinstance(request, UndecodableRequest):
            await abort(self._context, request.error)

    async def __aexit__(self, kind: object, exc: BaseException | None, tb: object) -> bool:
        if isinstance(exc, ServiceError):
            await abort(self._context, exc)
        if exc is None or isinstance(exc, grpc.aio.BaseError) or not isinstance(exc, Exception):
            return False  # context.abort() unwinds the handler with AbortError; cancellation
        await _abort_internal(self._context, self._name)


def grpc_errors(method: F) -> F:
    """Map the errors a servicer method raises to statuses; works for unary and streaming.

    A request that did not decode (see `tolerant_deserializer`) is refused before the method runs.
    """
    name = method.__name__
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
            if isinstance(request, UndecodableRequest):
                await abort(context, request.error)
            try:
                async for response in method(self, request, context):
                    yield response
            except ServiceError as exc:
                await abort(context, exc)
            except grpc.aio.BaseError:
                raise  # context.abort() unwinds the handler with AbortError
            except Exception:
                await _abort_internal(context, name)

        return stream  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: Any) -> Any:
        if isinstance(request, UndecodableRequest):
            await abort(context, request.error)
        try:
            return await method(self, request, context)
        except ServiceError as exc:
            await abort(context, exc)
        except grpc.aio.BaseError:
            raise
        except Exception:
            await _abort_internal(context, name)

    return unary  # type: ignore[return-value]
