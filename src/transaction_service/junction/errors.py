"""The Junction client's errors as the service's errors (`transaction_service.errors`), mapped
once, here: every use case that calls Junction's API raises these, and each transport maps them
like any other.

- unreachable, or still failing after the retries: UNAVAILABLE (try again later);
- Junction does not know the order or transaction: NOT_FOUND;
- refused for good (401, 403, 422, an answer of the wrong shape): FAILED_PRECONDITION, with the
  provider's message as the client cut it (never a body: bodies are health data);
- refused before anything was sent (a window over 60 days): INVALID_ARGUMENT;
- larger than the service would hold (a results PDF over its limit): RESOURCE_EXHAUSTED;
- no API key configured: FAILED_PRECONDITION naming the setting.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from transaction_service.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Reason,
    ServiceError,
    TooLarge,
    Unavailable,
)
from transaction_service.junction.client import (
    JunctionError,
    JunctionNotFound,
    JunctionPermanentError,
    JunctionRequestInvalid,
    JunctionTooLarge,
    JunctionUnavailable,
)

API_KEY_SETTING = "TRANSACTION_SERVICE_JUNCTION_API_KEY"
PDF_MAX_BYTES_SETTING = "TRANSACTION_SERVICE_RESULTS_PDF_MAX_BYTES"


class JunctionNotConfigured(FailedPrecondition):
    """Asked to talk to Junction's API, but no API key is configured."""

    def __init__(self) -> None:
        super().__init__(
            f"Junction's API is not configured on this server: set {API_KEY_SETTING} (and "
            "TRANSACTION_SERVICE_JUNCTION_REGION / _ENVIRONMENT, or _BASE_URL) and restart it",
            reason=Reason.JUNCTION_NOT_CONFIGURED,
            metadata={"setting": API_KEY_SETTING},
        )


def service_error(exc: JunctionError, *, field: str = "") -> ServiceError:
    """The service error for a client error; `field` names the request field an invalid request
    came from (e.g. `since`)."""
    if isinstance(exc, JunctionUnavailable):
        metadata = {"endpoint": exc.endpoint}
        if exc.retry_after is not None:
            metadata["retry_after_seconds"] = str(round(exc.retry_after))
        return Unavailable(
            f"Junction's API is unavailable; try again later: {exc.message}",
            reason=Reason.JUNCTION_UNAVAILABLE,
            metadata=metadata,
        )
    if isinstance(exc, JunctionTooLarge):
        return TooLarge(
            f"Junction's answer is larger than this server fetches ({exc.limit} bytes, "
            f"{PDF_MAX_BYTES_SETTING}): {exc.message}",
            metadata={"endpoint": exc.endpoint, "setting": PDF_MAX_BYTES_SETTING},
        )
    if isinstance(exc, JunctionNotFound):
        return NotFound(f"Junction does not know it: {exc.message}")
    if isinstance(exc, JunctionPermanentError):
        return FailedPrecondition(
            f"Junction refused the request: {exc.message}",
            reason=Reason.JUNCTION_REFUSED,
            metadata={"endpoint": exc.endpoint, "status": str(exc.status)},
        )
    if isinstance(exc, JunctionRequestInvalid):
        return InvalidArgument([FieldViolation(field, exc.message)])
    return Unavailable(f"Junction's API failed: {exc.message}", reason=Reason.JUNCTION_UNAVAILABLE)


@contextmanager
def provider_errors(*, field: str = "") -> Iterator[None]:
    """Raise the service error for any client error raised inside."""
    try:
        yield
    except JunctionError as exc:
        raise service_error(exc, field=field) from None
