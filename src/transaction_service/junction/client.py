"""An async client for Junction's API (formerly Vital), on httpx.

Only what the service needs to reconcile with the provider: an order, an order transaction, the
transaction's combined results (JSON and PDF), the orders updated in a time window, and a request
to re-send orders' webhooks. Answers are parsed with the lenient models that parse webhook `data`
(`answers.py`).

Resilience, in one place (`_send`):
- every attempt has a timeout (connect, read, write and pool, each);
- 5xx, 408, timeouts and network errors are retried with exponential backoff and full jitter;
- 429 (and 503) wait out `Retry-After`, in seconds or as an HTTP date; a wait longer than the
  policy allows gives up at once, saying when to come back, rather than stall a sweep;
- any other 4xx gives up at once, naming the endpoint, the status and the provider's message;
- a semaphore caps the requests in flight, so a sweep or a back-fill cannot flood the provider.
  A request waiting to retry does not hold a slot. Interactive reads (the results PDF) have slots
  of their own, so they can never take the ones reconcile, the sweep and the results fetcher
  need; and a PDF is read whole (up to a limit) before it is handed over, so a slow reader of
  it holds no slot.

Sleep, clock and jitter are injectable, so tests never really wait. Neither the API key nor a
response body is ever logged: bodies are health data.

Each attempt is counted by endpoint and outcome, with its latency (`Metrics.junction_answered`),
and each call (its attempts together) is a span named after the endpoint when tracing is on.
"""

from __future__ import annotations

import asyncio
import email.utils
import enum
import json
import logging
import math
import random as _random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from transaction_service import tracing
from transaction_service.domain.payload import DOT_SEGMENTS
from transaction_service.errors import echo
from transaction_service.junction.answers import (
    OrderAnswer,
    OrdersPage,
    TransactionAnswer,
    TransactionResults,
)
from transaction_service.junction.endpoints import (
    GET_ORDER,
    GET_ORDER_TRANSACTION,
    GET_TRANSACTION_RESULTS,
    GET_TRANSACTION_RESULTS_PDF,
    LIST_ORDERS,
    RESEND_EVENTS,
)
from transaction_service.metrics import Metrics

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import httpx

API_KEY_HEADER = "X-Vital-API-Key"
# `POST /v3/order/resend_events`: "the window cannot exceed 60 days".
RESEND_WINDOW = timedelta(days=60)
# `GET /v3/orders` takes `size` from 1 to 100.
MAX_PAGE_SIZE = 100
# The provider's message is cut to this in errors: enough to act on, too short to carry a record.
PROVIDER_MESSAGE_LIMIT = 200


class Region(enum.StrEnum):
    US = "us"
    EU = "eu"


class Environment(enum.StrEnum):
    PRODUCTION = "production"
    SANDBOX = "sandbox"


_BASE_URLS = {
    (Region.US, Environment.PRODUCTION): "https://api.us.junction.com",
    (Region.EU, Environment.PRODUCTION): "https://api.eu.junction.com",
    (Region.US, Environment.SANDBOX): "https://api.sandbox.us.junction.com",
    (Region.EU, Environment.SANDBOX): "https://api.sandbox.eu.junction.com",
}


def junction_base_url(
    region: Region | str = Region.US,
    environment: Environment | str = Environment.PRODUCTION,
    *,
    explicit: str | None = None,
) -> str:
    """The API's base URL: `explicit` when given (tests point it at a fake), else the one for the
    region and environment. An API key works in its own region and environment only."""
    if explicit:
        return explicit.rstrip("/")
    try:
        key = (Region(region), Environment(environment))
    except ValueError:
        raise ValueError(
            f"unknown Junction region or environment {echo(region)}/{echo(environment)}: "
            f"regions are {', '.join(r.value for r in Region)}; "
            f"environments are {', '.join(e.value for e in Environment)}"
        ) from None
    return _BASE_URLS[key]


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


class JunctionError(Exception):
    """Base of the client's errors. `endpoint` is the template, e.g. `GET /v3/order/{order_id}`."""

    def __init__(self, message: str, *, endpoint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.endpoint = endpoint


class JunctionRequestInvalid(JunctionError, ValueError):
    """The call was refused before anything was sent (an empty id, a resend window over 60 days)."""


class JunctionPermanentError(JunctionError):
    """Junction refused the request for good (401, 403, 404, 422, ...): retrying will not help."""

    def __init__(
        self, message: str, *, endpoint: str, status: int, provider_message: str = ""
    ) -> None:
        super().__init__(message, endpoint=endpoint)
        self.status = status
        self.provider_message = provider_message


class JunctionNotFound(JunctionPermanentError):
    """404: Junction does not know the order or transaction (or not under this API key's team)."""


class JunctionTooLarge(JunctionError):
    """The answer is larger than the caller would hold (`limit` bytes); it was not read further."""

    def __init__(self, message: str, *, endpoint: str, limit: int) -> None:
        super().__init__(message, endpoint=endpoint)
        self.limit = limit


class JunctionBadResponse(JunctionPermanentError):
    """A 2xx answer that is not what the API documents (not JSON, or a field of the wrong type)."""


class JunctionUnavailable(JunctionError):
    """Junction could not be reached, or kept failing (5xx, 429, timeouts), until the retry budget
    ran out. Transient: try again later. `retry_after` (seconds) is set when the provider asked
    for a longer pause than this client waits out."""

    def __init__(
        self,
        message: str,
        *,
        endpoint: str,
        attempts: int,
        last_failure: str,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, endpoint=endpoint)
        self.attempts = attempts
        self.last_failure = last_failure
        self.retry_after = retry_after


# --------------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How hard the client tries. `attempts` counts every try, the first included."""

    attempts: int = 5
    # Backoff before retry n (from 1): uniform in [0, min(max_delay, base_delay * 2**(n-1))].
    base_delay: float = 0.5
    max_delay: float = 30.0
    # The longest Retry-After waited out; beyond it the call gives up at once with
    # JunctionUnavailable.retry_after set, so the caller can reschedule instead of stalling.
    max_retry_after: float = 120.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be at least 1")
        if self.base_delay < 0 or self.max_delay < 0 or self.max_retry_after < 0:
            raise ValueError("RetryPolicy delays must not be negative")

    def backoff(self, attempt: int, rand: Callable[[], float]) -> float:
        """Full jitter: spreads the retries of many callers over the whole window."""
        return rand() * min(self.max_delay, self.base_delay * 2.0 ** (attempt - 1))


Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class _Failure:
    """Why an attempt failed in a way worth retrying, and how long to wait before the next."""

    reason: str
    delay: float
    retry_after: float | None = None
    # The provider asked for a pause longer than the policy waits out.
    too_long: bool = False


_Parsed = TypeVar("_Parsed")


class JunctionClient:
    """Async client for the Junction API. Use as `async with JunctionClient(...) as client:` or
    call `aclose()`.

    `sleep`, `now` and `random` are injectable so tests can watch the backoff without waiting;
    `transport` lets tests swap the network (httpx.MockTransport) if a real fake server is too much.
    """

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        max_concurrency: int = 4,
        interactive_concurrency: int = 1,
        sleep: Sleep = asyncio.sleep,
        now: Clock = _utc_now,
        random: Callable[[], float] = _random.random,
        transport: httpx.AsyncBaseTransport | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if not api_key:
            raise ValueError("the Junction API key is empty")
        if not base_url.startswith(("https://", "http://")):
            raise ValueError(f"the Junction base URL must be http(s): {echo(base_url)}")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if max_concurrency < 1 or interactive_concurrency < 1:
            raise ValueError("max_concurrency and interactive_concurrency must be at least 1")
        self._api_key = api_key
        self._metrics = metrics
        self._retry = retry or RetryPolicy()
        self._sleep = sleep
        self._now = now
        self._random = random
        self._slots = asyncio.Semaphore(max_concurrency)
        self._interactive_slots = asyncio.Semaphore(interactive_concurrency)
        connections = max_concurrency + interactive_concurrency
        self.base_url = base_url.rstrip("/")
        # httpx only once a client exists (a Junction API key is configured): ~40 ms of imports.
        import httpx

        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers={
                API_KEY_HEADER: api_key,
                "Accept": "application/json",
                "User-Agent": "transaction-service",
            },
            timeout=httpx.Timeout(timeout),
            # As many connections as requests may be in flight: no request waits for the pool.
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
            transport=transport,
            follow_redirects=False,
        )

    def __repr__(self) -> str:
        # Never the key.
        return f"JunctionClient(base_url={self.base_url!r})"

    async def __aenter__(self) -> JunctionClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ---------------------------------------------------------------------------------- endpoints

    async def get_order(self, order_id: str) -> OrderAnswer:
        """`GET /v3/order/{order_id}`: the order, the same object as a webhook's `data`."""
        path = f"/v3/order/{_segment(order_id, 'order_id', GET_ORDER)}"
        _, raw = await self._call_json(GET_ORDER, "GET", path)
        return self._parse(GET_ORDER, path, OrderAnswer.from_raw, raw)

    async def get_order_transaction(self, transaction_id: str) -> TransactionAnswer:
        """`GET /v3/order_transaction/{id}`: `{id, team_id, status, orders}`; each order's status
        under `last_status` or `low_level_status`, both understood."""
        segment = _segment(transaction_id, "transaction_id", GET_ORDER_TRANSACTION)
        path = f"/v3/order_transaction/{segment}"
        _, raw = await self._call_json(GET_ORDER_TRANSACTION, "GET", path)
        return self._parse(GET_ORDER_TRANSACTION, path, TransactionAnswer.from_raw, raw)

    async def get_transaction_results(self, transaction_id: str) -> TransactionResults:
        """`GET /v3/order_transaction/{id}/result`: the combined results, kept byte for byte,
        with `metadata.status` (partial or final) parsed out."""
        segment = _segment(transaction_id, "transaction_id", GET_TRANSACTION_RESULTS)
        path = f"/v3/order_transaction/{segment}/result"
        content, raw = await self._call_json(GET_TRANSACTION_RESULTS, "GET", path)
        return self._parse(
            GET_TRANSACTION_RESULTS, path, partial(TransactionResults.from_raw, content), raw
        )

    async def fetch_transaction_results_pdf(
        self, transaction_id: str, *, max_bytes: int, chunk_size: int = 64 * 1024
    ) -> list[bytes]:
        """`GET /v3/order_transaction/{id}/result/pdf`, read whole, as chunks of `chunk_size`.

        An interactive read: it takes one of the interactive slots, never one of those the
        other calls share, and gives it back before it returns, so whoever the PDF is for may
        read it as slowly as it likes. More than `max_bytes` (declared, or as it arrives):
        JunctionTooLarge, and no more is read. Failures before the answer are retried like any
        call; a body that breaks off raises JunctionUnavailable.
        """
        import httpx  # loaded by __init__; imported here for the except clause

        segment = _segment(transaction_id, "transaction_id", GET_TRANSACTION_RESULTS_PDF)
        path = f"/v3/order_transaction/{segment}/result/pdf"
        too_large = JunctionTooLarge(
            f"GET {path}: the PDF is larger than {max_bytes} bytes",
            endpoint=GET_TRANSACTION_RESULTS_PDF,
            limit=max_bytes,
        )
        async with self._exchange(
            GET_TRANSACTION_RESULTS_PDF,
            "GET",
            path,
            headers={"Accept": "application/pdf"},
            stream=True,
            slots=self._interactive_slots,
        ) as response:
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise too_large
            chunks: list[bytes] = []
            size = 0
            try:
                async for chunk in response.aiter_bytes(chunk_size):
                    size += len(chunk)
                    if size > max_bytes:
                        raise too_large
                    chunks.append(chunk)
            except httpx.RequestError as exc:
                reason = _transport_reason(exc)
                raise JunctionUnavailable(
                    f"GET {path}: the PDF broke off after it began ({reason})",
                    endpoint=GET_TRANSACTION_RESULTS_PDF,
                    attempts=1,
                    last_failure=reason,
                ) from None
        return chunks

    async def iter_orders_updated(
        self,
        start: datetime,
        end: datetime | None = None,
        *,
        page_size: int = MAX_PAGE_SIZE,
    ) -> AsyncIterator[OrdersPage]:
        """Every page of `GET /v3/orders` updated in [start, end] (end: now when not given).

        Pages are numbered (`page`, `size`) and sorted by creation, oldest first, with the window's
        end fixed for the whole walk so that the pages describe one set. An order updated *during*
        the walk leaves the window and can shift the pages after it; it was updated after `end`,
        so the next window (or its webhook) brings it.
        """
        _require_aware(start, "start", LIST_ORDERS)
        end = end or self._now()
        _require_aware(end, "end", LIST_ORDERS)
        if start > end:
            raise JunctionRequestInvalid(
                f"{LIST_ORDERS}: start {start.isoformat()} is after end {end.isoformat()}",
                endpoint=LIST_ORDERS,
            )
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise JunctionRequestInvalid(
                f"{LIST_ORDERS}: page_size must be 1 to {MAX_PAGE_SIZE}, got {page_size}",
                endpoint=LIST_ORDERS,
            )
        page = 1
        while True:
            params = {
                "updated_start_date": _iso(start),
                "updated_end_date": _iso(end),
                "order_key": "created_at",
                "order_direction": "asc",
                "page": str(page),
                "size": str(page_size),
            }
            _, raw = await self._call_json(LIST_ORDERS, "GET", "/v3/orders", params=params)
            answer = self._parse(
                LIST_ORDERS,
                "/v3/orders",
                partial(OrdersPage.from_raw, page=page, size=page_size),
                raw,
            )
            yield answer
            if not answer.orders:
                return
            if answer.total is not None:
                if page * answer.size >= answer.total:
                    return
            elif len(answer.orders) < answer.size:
                return
            page += 1

    async def resend_events(
        self,
        order_ids: Sequence[str] | None = None,
        *,
        start_at: datetime | None = None,
        end_at: datetime | None = None,
    ) -> list[str]:
        """`POST /v3/order/resend_events`: Junction re-sends the latest webhook of the orders named,
        or of the orders in [start_at, end_at] (end: the provider's now), as new deliveries.

        Checked before anything is sent: order ids or start_at (at least one), aware times, and a
        window of at most 60 days. Returns the order ids Junction will re-send. Retried like any
        call: a re-sent webhook the service already has is STALE, so a double re-send is harmless.
        """
        if end_at is not None and start_at is None:
            raise JunctionRequestInvalid(
                f"{RESEND_EVENTS}: end_at needs start_at", endpoint=RESEND_EVENTS
            )
        if order_ids is not None and not order_ids:
            raise JunctionRequestInvalid(
                f"{RESEND_EVENTS}: order_ids is empty; name at least one order or give start_at",
                endpoint=RESEND_EVENTS,
            )
        if order_ids is None and start_at is None:
            raise JunctionRequestInvalid(
                f"{RESEND_EVENTS}: give order_ids, start_at, or both", endpoint=RESEND_EVENTS
            )
        body: dict[str, Any] = {}
        if order_ids is not None:
            body["order_ids"] = [_id(oid, "order_ids", RESEND_EVENTS) for oid in order_ids]
        if start_at is not None:
            _require_aware(start_at, "start_at", RESEND_EVENTS)
            if end_at is not None:
                _require_aware(end_at, "end_at", RESEND_EVENTS)
            window_end = end_at or self._now()
            if start_at > window_end:
                raise JunctionRequestInvalid(
                    f"{RESEND_EVENTS}: start_at {start_at.isoformat()} is after "
                    f"{'end_at' if end_at else 'now'} {window_end.isoformat()}",
                    endpoint=RESEND_EVENTS,
                )
            if window_end - start_at > RESEND_WINDOW:
                raise JunctionRequestInvalid(
                    f"{RESEND_EVENTS}: the window from {start_at.isoformat()} to "
                    f"{window_end.isoformat()} is longer than the {RESEND_WINDOW.days} days "
                    "Junction allows; split it or back-fill from the API instead",
                    endpoint=RESEND_EVENTS,
                )
            body["start_at"] = _iso(start_at)
            if end_at is not None:
                body["end_at"] = _iso(end_at)
        path = "/v3/order/resend_events"
        _, raw = await self._call_json(RESEND_EVENTS, "POST", path, json_body=body)
        answer = self._parse(RESEND_EVENTS, path, _ResendAnswer.model_validate, raw)
        return answer.order_ids

    # ---------------------------------------------------------------------------------- internals

    async def _call_json(
        self,
        endpoint: str,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        json_body: dict[str, Any] | None = None,
    ) -> tuple[bytes, dict[str, Any]]:
        """The answer's bytes and its JSON object."""
        async with self._exchange(
            endpoint, method, path, params=params, json_body=json_body
        ) as response:
            content, status = response.content, response.status_code
        try:
            value = json.loads(content)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise JunctionBadResponse(
                f"{method} {path} answered {status} with a body that is not a JSON object",
                endpoint=endpoint,
                status=status,
            )
        return content, value

    def _parse(
        self,
        endpoint: str,
        path: str,
        build: Callable[[dict[str, Any]], _Parsed],
        raw: dict[str, Any],
    ) -> _Parsed:
        try:
            return build(raw)
        except ValidationError as exc:
            # Field paths and pydantic's reasons only: never the values, which are health data.
            problems = "; ".join(
                f"{_loc(error['loc'])}: {error['msg']}" for error in exc.errors(include_url=False)
            )
            raise JunctionBadResponse(
                f"{_method(endpoint)} {path} answered a body this client cannot read: "
                f"{echo(problems, PROVIDER_MESSAGE_LIMIT)}",
                endpoint=endpoint,
                status=200,
            ) from None

    @asynccontextmanager
    async def _exchange(
        self,
        endpoint: str,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        json_body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        stream: bool = False,
        slots: asyncio.Semaphore | None = None,
    ) -> AsyncIterator[httpx.Response]:
        """A successful response, after retries; its concurrency slot (one of `slots`, by
        default the shared ones) is released on exit."""
        slots = slots or self._slots
        request = self._http.build_request(
            method, path, params=params, json=json_body, headers=headers
        )
        with tracing.span(f"junction {endpoint}", {"transaction_service.endpoint": endpoint}):
            response = await self._send(endpoint, request, stream=stream, slots=slots)
        try:
            yield response
        finally:
            await response.aclose()
            slots.release()

    async def _send(
        self, endpoint: str, request: httpx.Request, *, stream: bool, slots: asyncio.Semaphore
    ) -> httpx.Response:
        """Send with retries. Returns a 2xx response *holding a concurrency slot* of `slots`,
        which the caller releases; raises JunctionPermanentError or JunctionUnavailable."""
        import httpx  # loaded by __init__; imported here for the except clause

        where = f"{request.method} {request.url.path}"
        attempts = self._retry.attempts
        for attempt in range(1, attempts + 1):
            keep_slot = False
            await slots.acquire()
            sent = time.perf_counter()
            outcome = "network_error"
            try:
                response = await self._http.send(request, stream=True)
                outcome = _outcome(response.status_code)
                try:
                    if response.is_success and not stream:
                        await response.aread()
                    if response.is_success:
                        keep_slot = True
                        return response
                    await response.aread()
                finally:
                    if not keep_slot:
                        await response.aclose()
            except httpx.RequestError as exc:  # network errors and timeouts
                failure = _Failure(_transport_reason(exc), self._backoff(attempt))
            else:
                failure = self._judge(endpoint, where, response, attempt)
            finally:
                if not keep_slot:
                    slots.release()
                if self._metrics is not None:
                    self._metrics.junction_answered(endpoint, outcome, time.perf_counter() - sent)

            if failure.too_long:
                raise JunctionUnavailable(
                    f"{where}: Junction asked to retry after {failure.delay:.0f} s "
                    f"({failure.reason}), longer than the {self._retry.max_retry_after:.0f} s "
                    "this client waits; try again then",
                    endpoint=endpoint,
                    attempts=attempt,
                    last_failure=failure.reason,
                    retry_after=failure.retry_after,
                )
            if attempt == attempts:
                raise JunctionUnavailable(
                    f"{where}: Junction is unavailable: {attempts} attempts failed, "
                    f"the last with {failure.reason}",
                    endpoint=endpoint,
                    attempts=attempts,
                    last_failure=failure.reason,
                )
            log.warning(
                "%s: %s; retry %d of %d in %.1f s",
                endpoint,
                failure.reason,
                attempt,
                attempts - 1,
                failure.delay,
            )
            await self._sleep(failure.delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _judge(self, endpoint: str, where: str, response: httpx.Response, attempt: int) -> _Failure:
        """A non-2xx answer: a retryable failure, or a permanent error raised at once."""
        status = response.status_code
        reason = f"{status} {response.reason_phrase}".strip()
        if status in (408, 429) or status >= 500:
            retry_after = self._retry_after(response)
            if retry_after is None:
                return _Failure(reason, self._backoff(attempt))
            if retry_after > self._retry.max_retry_after:
                return _Failure(reason, retry_after, retry_after=retry_after, too_long=True)
            return _Failure(reason, retry_after, retry_after=retry_after)
        provider_message = self._provider_message(response)
        message = f"{where} answered {reason}"
        if provider_message:
            message += f": {echo(provider_message, PROVIDER_MESSAGE_LIMIT)}"
        if status in (401, 403):
            message += " (check the API key, and that it is for this region and environment)"
        error = JunctionNotFound if status == 404 else JunctionPermanentError
        raise error(message, endpoint=endpoint, status=status, provider_message=provider_message)

    def _backoff(self, attempt: int) -> float:
        return self._retry.backoff(attempt, self._random)

    def _retry_after(self, response: httpx.Response) -> float | None:
        """`Retry-After` in seconds, from delta-seconds or an HTTP date; None if absent or bad."""
        value = response.headers.get("Retry-After", "").strip()
        if not value:
            return None
        try:
            seconds = float(value)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                return None
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            seconds = (when - self._now()).total_seconds()
        if not math.isfinite(seconds):
            return None
        return max(0.0, seconds)

    def _provider_message(self, response: httpx.Response) -> str:
        """What the provider said about a refusal: FastAPI's `detail` (a string, or a list of
        validation errors whose `msg`s are kept but never their `input`), else the text."""
        try:
            body = json.loads(response.content)
        except ValueError:
            text = response.content[: PROVIDER_MESSAGE_LIMIT * 4].decode("utf-8", "replace")
        else:
            text = _message_from_json(body)
        # The provider could echo the request's headers; the key must not travel on in an error.
        text = text.replace(self._api_key, "[api key]")
        return " ".join(text.split())


class _ResendAnswer(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, defer_build=True)

    order_ids: list[str] = Field(default_factory=list)


def _message_from_json(body: object) -> str:
    if not isinstance(body, dict):
        return ""
    detail = next((body[k] for k in ("detail", "message", "error") if k in body), None)
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict) and isinstance(item.get("msg"), str):
                loc = item.get("loc")
                where = _loc(loc) if isinstance(loc, list | tuple) else ""
                parts.append(f"{where}: {item['msg']}" if where else item["msg"])
        return "; ".join(parts)
    return ""


def _loc(parts: Sequence[object]) -> str:
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _outcome(status: int) -> str:
    """How an answer counts in the `junction_requests` metric."""
    if 200 <= status < 300:
        return "ok"
    if status == 404:
        return "not_found"
    if status == 429:
        return "rate_limited"
    if status >= 500 or status == 408:
        return "server_error"
    return "refused"


def _method(endpoint: str) -> str:
    return endpoint.split(" ", 1)[0]


def _transport_reason(exc: httpx.RequestError) -> str:
    # The class says enough (ReadTimeout, ConnectError, RemoteProtocolError); the text may carry
    # the URL and adds nothing.
    import httpx  # loaded with the client (JunctionClient.__init__)

    kind = type(exc).__name__
    return f"{kind} (timed out)" if isinstance(exc, httpx.TimeoutException) else kind


def _id(value: str, name: str, endpoint: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise JunctionRequestInvalid(f"{endpoint}: {name} is empty", endpoint=endpoint)
    return value


def _segment(value: str, name: str, endpoint: str) -> str:
    # Quoted so that an id can never reach another path; `.` and `..` are refused, since quoting
    # leaves them as they are and the URL would then name the parent path.
    if value in DOT_SEGMENTS:
        raise JunctionRequestInvalid(
            f"{endpoint}: {name} must not be `.` or `..`", endpoint=endpoint
        )
    return quote(_id(value, name, endpoint), safe="")


def _require_aware(value: datetime, name: str, endpoint: str) -> None:
    if value.tzinfo is None:
        raise JunctionRequestInvalid(
            f"{endpoint}: {name} has no time zone; give an aware datetime (UTC)",
            endpoint=endpoint,
        )


def _iso(value: datetime) -> str:
    # UTC with a "Z": no "+" to be misread as a space in a query string.
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
