"""The errors the use cases raise, independent of any transport.

Each transport maps this hierarchy once: gRPC to a status code with a google.rpc detail
(`api/errors.py`), HTTP to a status with a JSON body. Handlers never catch these one by one.

Messages are written for the caller: they name what is wrong and what to do, and never carry a
Python exception's text. Anything raised that is *not* a `ServiceError` is a bug or an unexpected
fault; transports answer it with a generic INTERNAL / 500 and log it once.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# Echoed input is cut to this many characters, so an error message cannot be used to reflect a
# large or hostile value back at a caller (or into a log line).
ECHO_LIMIT = 80


def echo(value: object, limit: int = ECHO_LIMIT) -> str:
    """`value` quoted for a message or log line: repr-escaped (no newline can forge a line) and cut
    to `limit` characters."""
    text = repr(value) if isinstance(value, str) else repr(str(value))
    return text if len(text) <= limit else text[: limit - 4] + "...'"


@dataclass(frozen=True)
class FieldViolation:
    """One thing wrong with a request: `field` is a path such as `payload.data.events[1].id`."""

    field: str
    description: str


class Reason(enum.StrEnum):
    """Why a call was refused, where a client can act on it: the `reason` of the
    google.rpc.ErrorInfo over gRPC and of the JSON error body over HTTP (lower-cased, the label of
    the refused-webhooks metric). Part of the API: a value never changes once released."""

    # UNAUTHENTICATED: a bearer token (both transports).
    MISSING_TOKEN = "MISSING_TOKEN"
    UNKNOWN_TOKEN = "UNKNOWN_TOKEN"
    # UNAUTHENTICATED: a webhook's Svix signature.
    MISSING_SIGNATURE = "MISSING_SIGNATURE"
    BAD_TIMESTAMP = "BAD_TIMESTAMP"
    TIMESTAMP_OUT_OF_TOLERANCE = "TIMESTAMP_OUT_OF_TOLERANCE"
    BAD_SIGNATURE = "BAD_SIGNATURE"
    # FAILED_PRECONDITION
    WEBHOOKS_DISABLED = "WEBHOOKS_DISABLED"
    JUNCTION_NOT_CONFIGURED = "JUNCTION_NOT_CONFIGURED"
    JUNCTION_REFUSED = "JUNCTION_REFUSED"
    ANSWER_BEYOND_LIMITS = "ANSWER_BEYOND_LIMITS"
    RESULTS_NOT_READY = "RESULTS_NOT_READY"
    RESULTS_ERASED = "RESULTS_ERASED"
    # OUT_OF_RANGE: a watch's start revision.
    REVISION_COMPACTED = "REVISION_COMPACTED"
    REVISION_IN_FUTURE = "REVISION_IN_FUTURE"
    # RESOURCE_EXHAUSTED (Overloaded): the ingest queue's share is full; retry after a while.
    INGEST_QUEUE_FULL = "INGEST_QUEUE_FULL"
    # RESOURCE_EXHAUSTED (Overloaded): a Watch stream has the most watches open it may have.
    TOO_MANY_WATCHES = "TOO_MANY_WATCHES"
    # RESOURCE_EXHAUSTED (Overloaded): GetTransactionResultsPdf's calls at once or per minute
    # are used up; retry after the RetryInfo's delay.
    PDF_BUDGET_EXHAUSTED = "PDF_BUDGET_EXHAUSTED"
    # DEADLINE_EXCEEDED (DeadlinePassed): dropped before the commit; send it again.
    DEADLINE_PASSED = "DEADLINE_PASSED"
    # 408 over HTTP: a webhook body did not arrive within its deadline.
    BODY_TIMEOUT = "BODY_TIMEOUT"
    # UNAVAILABLE: retry.
    SHUTTING_DOWN = "SHUTTING_DOWN"
    # 503 over HTTP: too many webhook bodies arriving at once (retry after Retry-After).
    BUSY = "BUSY"
    STORE_UNAVAILABLE = "STORE_UNAVAILABLE"
    TRANSACTION_LOCKED = "TRANSACTION_LOCKED"
    JUNCTION_UNAVAILABLE = "JUNCTION_UNAVAILABLE"


class ServiceError(Exception):
    """Base of every error a caller is meant to see. `reason` and `metadata`, when set, tell the
    client what it can do about it: transports send them as a google.rpc.ErrorInfo, or in the
    JSON error body. `retry_after` (seconds), when set, is when a retry may succeed: a
    google.rpc.RetryInfo over gRPC, the `Retry-After` header over HTTP."""

    def __init__(
        self,
        message: str,
        reason: Reason | None = None,
        metadata: dict[str, str] | None = None,
        *,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.metadata = metadata or {}
        self.retry_after = retry_after


class InvalidArgument(ServiceError):
    """The request is malformed; `violations` names each field at fault. Nothing was stored."""

    def __init__(self, violations: list[FieldViolation]) -> None:
        self.violations = violations
        super().__init__(
            "; ".join(
                f"{v.field}: {v.description}" if v.field else v.description for v in violations
            )
        )


class AlreadyExists(ServiceError):
    """The request conflicts with something stored before (an event id reused for another body)."""


class Unauthenticated(ServiceError):
    """The caller did not prove who it is (no or an unknown token, no valid signature).

    `reason` (e.g. `BAD_SIGNATURE`) says which check failed, never with the secret involved."""


class PermissionDenied(ServiceError):
    """The caller is known but its role may not do this (a read token calling IngestEvent)."""


class TooLarge(ServiceError):
    """The request, or its answer, is larger than the service accepts; nothing of it was
    stored."""


class RequestTimeout(ServiceError):
    """The caller took too long to send its request (a webhook body trickling in); nothing of
    it was stored."""


class NotFound(ServiceError):
    """What the request names is not known."""


class FailedPrecondition(ServiceError):
    """The request is well formed, but the service is not in a state to do it (a setting missing,
    the provider refusing for good, results not fetched yet)."""


class OutOfRange(ServiceError):
    """A position outside what can be served; `reason` and `metadata` tell the client what to do."""


class Unavailable(ServiceError):
    """A transient condition (shutting down, the store cannot write): retry, here or elsewhere."""


class Overloaded(ServiceError):
    """Too much is waiting already (the ingest queue's share of this kind of caller is full), or
    a budget is used up (results PDFs): nothing was stored or done; retry after `retry_after`
    seconds. gRPC RESOURCE_EXHAUSTED, HTTP 503."""


class DeadlinePassed(ServiceError):
    """The caller's deadline passed before the commit: the delivery was dropped unstored, so it
    does not delay the deliveries after it. gRPC DEADLINE_EXCEEDED, HTTP 503."""
