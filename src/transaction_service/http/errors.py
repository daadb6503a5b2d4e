"""The one place where use-case errors become HTTP statuses, with a JSON body.

Handlers raise `transaction_service.errors` exceptions; the `json_errors` middleware answers them.
The body names the problem like the gRPC status does (code, message, and for a bad body each field
at fault), never a Python exception's text and never a secret. Anything else escaping a handler is
a bug: 500 with a generic message, and the traceback in the log once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from transaction_service.errors import (
    AlreadyExists,
    DeadlinePassed,
    FailedPrecondition,
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

log = logging.getLogger(__name__)

# Most specific first; the code names match the gRPC ones a caller may know.
STATUSES: tuple[tuple[type[ServiceError], int, str], ...] = (
    (InvalidArgument, 400, "INVALID_ARGUMENT"),
    (OutOfRange, 400, "OUT_OF_RANGE"),
    (Unauthenticated, 401, "UNAUTHENTICATED"),
    (PermissionDenied, 403, "PERMISSION_DENIED"),
    (NotFound, 404, "NOT_FOUND"),
    (RequestTimeout, 408, "REQUEST_TIMEOUT"),
    (AlreadyExists, 409, "ALREADY_EXISTS"),
    (FailedPrecondition, 400, "FAILED_PRECONDITION"),
    (TooLarge, 413, "TOO_LARGE"),
    (Unavailable, 503, "UNAVAILABLE"),
    # 503, not 429: Svix retries a 503 later and does not count it against the endpoint as a
    # client error; Retry-After says when.
    (Overloaded, 503, "RESOURCE_EXHAUSTED"),
    (DeadlinePassed, 503, "DEADLINE_EXCEEDED"),
)
# Retry-After of an UNAVAILABLE that names no delay of its own.
DEFAULT_RETRY_AFTER = 5

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Called with the request and the error it was refused with (for counting and logging).
RefusalListener = Callable[[web.Request, ServiceError], None]
REFUSAL_LISTENER: web.AppKey[RefusalListener] = web.AppKey("refusal_listener")


def status_for(exc: ServiceError) -> tuple[int, str]:
    """The HTTP status and error code a use-case error is answered with."""
    for kind, status, code in STATUSES:
        if isinstance(exc, kind):
            return status, code
    return 500, "INTERNAL"  # a ServiceError subclass nobody mapped: not the caller's fault


def reason_of(exc: ServiceError) -> str:
    """A short, stable name for why a request was refused (a metrics label)."""
    return (exc.reason or status_for(exc)[1]).lower()


def error_response(exc: ServiceError) -> web.Response:
    status, code = status_for(exc)
    error: dict[str, Any] = {"code": code, "message": exc.message}
    if isinstance(exc, InvalidArgument):
        error["message"] = "invalid request: " + exc.message
        error["field_violations"] = [
            {"field": v.field, "description": v.description} for v in exc.violations
        ]
    if exc.reason:
        error["reason"] = exc.reason
    if exc.metadata:
        error["metadata"] = exc.metadata
    response = web.json_response({"error": error}, status=status)
    if exc.retry_after is not None:
        # Whole seconds, at least 1 (RFC 9110's delay-seconds).
        response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    elif isinstance(exc, Unavailable):
        # Svix retries on its own schedule; other callers get a hint.
        response.headers["Retry-After"] = str(DEFAULT_RETRY_AFTER)
    return response


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ServiceError as exc:
        refusal = exc
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # The router's own refusals (unknown path, wrong method), in the same JSON shape.
        response = web.json_response(
            {"error": {"code": exc.reason.upper().replace(" ", "_"), "message": exc.reason}},
            status=exc.status,
            headers={k: v for k, v in exc.headers.items() if k.lower() == "allow"},
        )
        return response
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return web.json_response(
            {
                "error": {
                    "code": "INTERNAL",
                    "message": "internal error; it was logged on the server. Retry later.",
                }
            },
            status=500,
        )
    listener = request.app.get(REFUSAL_LISTENER)
    if listener is not None:
        listener(request, refusal)
    return error_response(refusal)
