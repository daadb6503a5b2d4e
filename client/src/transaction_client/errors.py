"""The service's errors as typed exceptions.

A failed call raises a `TransactionServiceError` subclass chosen by the gRPC status code (and for
OUT_OF_RANGE and UNAVAILABLE by the google.rpc.ErrorInfo reason), never a raw `grpc.RpcError`.
Each carries the server's message, the ErrorInfo `reason` and `metadata`, and for
INVALID_ARGUMENT the google.rpc.BadRequest field violations. `str(error)` is one line,
`CODE: message`, followed by a hint where the likely cause is a setup mistake (a wrong port,
plaintext against TLS, a missing client certificate or token).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import grpc

# googleapis-common-protos ships no type information (and typeshed has none for it).
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]

_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class FieldViolation:
    """One field of a request at fault (from google.rpc.BadRequest)."""

    field: str
    description: str


class ClientSetupError(ValueError):
    """A client option that cannot work (a certificate file that cannot be read, a bad
    option); raised before anything is sent."""


class TransactionServiceError(Exception):
    """A call failed. `code` is the gRPC status code; `reason` and `metadata` come from the
    status's google.rpc.ErrorInfo (empty when it has none)."""

    # Whether calling again unchanged may succeed (the watches and retries use it).
    retryable: ClassVar[bool] = False

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: tuple[FieldViolation, ...] = (),
        hint: str = "",
    ) -> None:
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata: Mapping[str, str] = dict(metadata or {})
        self.field_violations = field_violations
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.code.name}: {' '.join(self.message.split())}"
        return f"{text} (hint: {self.hint})" if self.hint else text

    def _int(self, key: str) -> int:
        try:
            return int(self.metadata.get(key, "0"))
        except ValueError:
            return 0


class InvalidArgument(TransactionServiceError):
    """The request is malformed or beyond a limit; `field_violations` names each field."""


class NotFound(TransactionServiceError):
    """No webhook has mentioned the transaction or order (or Junction does not know it)."""


class AlreadyExists(TransactionServiceError):
    """The event id was ingested before with a different body."""


class Unauthenticated(TransactionServiceError):
    """No token, or one the server does not know (reason MISSING_TOKEN or UNKNOWN_TOKEN)."""


class PermissionDenied(TransactionServiceError):
    """The token may not call this method (a read token calling a write)."""


class FailedPrecondition(TransactionServiceError):
    """The server cannot do it in its present state (e.g. JUNCTION_NOT_CONFIGURED,
    RESULTS_NOT_READY)."""


class ResourceExhausted(TransactionServiceError):
    """The answer or the request would be too large."""


class OutOfRange(TransactionServiceError):
    """A revision outside what the server can serve."""


class RevisionCompacted(OutOfRange):
    """The change log no longer holds the changes a watch needs, or the state an as-of read
    (`get_transaction(revision=...)`) asks for (reason REVISION_COMPACTED)."""

    @property
    def compacted_revision(self) -> int:
        """Changes up to this revision are gone."""
        return self._int("compacted_revision")

    @property
    def last_sent_revision(self) -> int:
        """Of a watch: the revision to resume from; 0 for an as-of read."""
        return self._int("last_sent_revision")


class RevisionInFuture(OutOfRange):
    """A watch asked to start after (or a read to read at) the newest revision committed
    (reason REVISION_IN_FUTURE): the revision does not come from this server's history, e.g. a
    checkpoint kept across a database reset."""

    @property
    def head_revision(self) -> int:
        return self._int("head_revision")


class Unavailable(TransactionServiceError):
    """Nothing was done; try again (another replica, or later)."""

    retryable = True


class ShuttingDown(Unavailable):
    """The server is stopping (reason SHUTTING_DOWN); a watch resumes elsewhere or later."""

    @property
    def last_sent_revision(self) -> int:
        """Of a watch: the revision to resume from; 0 for an as-of read."""
        return self._int("last_sent_revision")


class DeadlineExceeded(TransactionServiceError):
    """No answer within the call's deadline."""

    retryable = True


class Cancelled(TransactionServiceError):
    """The call was cancelled (by the server's side, or a proxy)."""

    retryable = True


class Internal(TransactionServiceError):
    """A fault of the server or of the transport (INTERNAL, UNKNOWN, or another code); the
    server logged it. Retrying later is reasonable."""

    retryable = True


_BY_CODE: dict[grpc.StatusCode, type[TransactionServiceError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
}
_BY_REASON: dict[str, type[TransactionServiceError]] = {
    "REVISION_COMPACTED": RevisionCompacted,
    "REVISION_IN_FUTURE": RevisionInFuture,
    "SHUTTING_DOWN": ShuttingDown,
}


def _status_details(error: grpc.RpcError) -> tuple[str, dict[str, str], tuple[FieldViolation, ...]]:
    """The ErrorInfo reason and metadata, and the BadRequest field violations, of a status."""
    trailing: tuple[tuple[str, str | bytes], ...] = ()
    if isinstance(error, grpc.Call | grpc.aio.AioRpcError):
        trailing = tuple(error.trailing_metadata() or ())
    raw = next((value for key, value in trailing if key == _DETAILS_KEY), None)
    reason, metadata, violations = "", dict[str, str](), tuple[FieldViolation, ...]()
    if isinstance(raw, bytes):
        status = status_pb2.Status.FromString(raw)
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            bad = error_details_pb2.BadRequest()
            if detail.Unpack(info):
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Unpack(bad):
                violations = tuple(
                    FieldViolation(v.field, v.description) for v in bad.field_violations
                )
    return reason, metadata, violations


def from_rpc_error(
    error: grpc.RpcError, target: str = "", *, tls: bool = False
) -> TransactionServiceError:
    """The typed exception for a failed call to `target` (over TLS or not, for the hint)."""
    if isinstance(error, grpc.Call | grpc.aio.AioRpcError):
        code, message = error.code(), error.details() or ""
    else:  # pragma: no cover - gRPC raises one of those for a call
        code, message = grpc.StatusCode.UNKNOWN, str(error)
    reason, metadata, violations = _status_details(error)
    kind = _BY_REASON.get(reason) or _BY_CODE.get(code, Internal)
    return kind(
        code,
        message,
        reason=reason,
        metadata=metadata,
        field_violations=violations,
        hint=_hint(code, message, reason, target, tls),
    )


_REFUSED = re.compile(r"connection refused|failed to connect to remote host", re.IGNORECASE)
_NOT_TLS = re.compile(r"wrong_version_number|wrong version number|packet length", re.IGNORECASE)
_UNTRUSTED = re.compile(r"certificate_verify_failed|certificate verify failed", re.IGNORECASE)
_CLOSED = re.compile(r"socket closed|connection reset|end of tcp stream", re.IGNORECASE)
_HTTP1 = re.compile(r"http1\.x server", re.IGNORECASE)


def _hint(code: grpc.StatusCode, message: str, reason: str, target: str, tls: bool) -> str:
    """What a person should check, for the errors that usually mean a setup mistake (the
    messages are gRPC's own, as seen with grpcio 1.85 against this server)."""
    at = f" at {target}" if target else ""
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return "pass a token (token=, --token or TRANSACTION_SERVICE_TOKEN)"
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return "this call needs an ingest token"
    if code != grpc.StatusCode.UNAVAILABLE or reason:
        return ""
    if _REFUSED.search(message):
        return (
            f"nothing accepts connections{at}: is the server running, and is that its gRPC port "
            "(default 50051)?"
        )
    if _HTTP1.search(message):
        return (
            f"the server{at} answers HTTP/1, not gRPC: is that its HTTP port (webhooks, metrics; "
            "default 8080)? gRPC's is another (default 50051)"
        )
    if tls and _NOT_TLS.search(message):
        return f"the server{at} does not speak TLS: drop the TLS options (--ca, --tls)"
    if tls and _UNTRUSTED.search(message):
        return (
            f"the certificate of the server{at} is not signed by a CA this client trusts: pass "
            "its CA (--ca), and --server-name if it names another host"
        )
    # Only when no connection could be made: a stream cut by a server that died says
    # "Socket closed" too, and needs no hint.
    if _CLOSED.search(message) and "failed to connect" in message:
        if tls:
            return (
                f"the server{at} closed the connection during the TLS handshake: it wants a "
                "client certificate its CA signed (--cert, --key)"
            )
        return (
            f"the server{at} closed the connection: it probably wants TLS (--tls, or --ca with "
            "its CA; under mutual TLS also --cert and --key)"
        )
    return ""
