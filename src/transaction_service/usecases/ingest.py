"""The one use case that writes: ingest webhook deliveries.

`decode_delivery` checks and parses a body (no I/O; bad input never reaches the store).
`Ingestor` queues deliveries and commits them in groups: all deliveries waiting at a moment share
one store transaction (`plan.py` decides every write of the group, the store applies it), and each
is acknowledged only after that commit. That is what makes durable (fsync-per-commit) ingest fast.

The gRPC servicer and the HTTP webhook receiver both call this; neither re-implements any of it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from transaction_service import tracing
from transaction_service.domain.limits import DEFAULT_LIMITS, StateLimits
from transaction_service.domain.payload import (
    FieldViolation,
    OrderEvent,
    PayloadError,
    body_digest,
    canonical_bytes,
    decode_json_body,
    normalise_body,
    parse_event,
)
from transaction_service.errors import AlreadyExists, ServiceError, Unavailable
from transaction_service.metrics import Metrics
from transaction_service.store.base import StoreUnavailable
from transaction_service.usecases.commit import CommitPath
from transaction_service.usecases.plan import (
    Delivery,
    EventIdConflict,
    IngestResult,
    Outcome,
    batch_keys,
    plan_batch,
)

if TYPE_CHECKING:
    from opentelemetry.trace import Span

__all__ = [
    "Delivery",
    "EventIdConflict",
    "IngestResult",
    "Ingestor",
    "IngestorStopped",
    "Outcome",
    "StoreUnavailable",
    "decode_delivery",
]

log = logging.getLogger(__name__)
# One line per ingested event, whichever transport it came by.
event_log = logging.getLogger("transaction_service.events")

MAX_EVENT_ID_LENGTH = 256


class IngestorStopped(Unavailable):
    """The ingestor is shutting down and takes no more deliveries."""

    def __init__(self) -> None:
        super().__init__(
            "the service is shutting down; nothing was stored: retry on another replica or later",
            reason="SHUTTING_DOWN",
        )


def decode_delivery(
    event_id: str,
    *,
    payload_json: str | None = None,
    payload: dict[str, Any] | None = None,
    max_body_bytes: int,
    source: str = "grpc",
    limits: StateLimits = DEFAULT_LIMITS,
) -> Delivery:
    """Check and parse one delivery. Raises PayloadError naming each field at fault.

    Field names in violations are those of the request: `event_id`, `payload_json`, or
    `payload.<path>` / `payload_json.<path>` for a field inside the body. `limits` bounds what the
    body may add to the state (see StateLimits).
    """
    if len(event_id) > MAX_EVENT_ID_LENGTH:
        raise PayloadError(
            [FieldViolation("event_id", f"longer than {MAX_EVENT_ID_LENGTH} characters")]
        )
    if event_id != event_id.strip() or not event_id.isprintable():
        raise PayloadError(
            [FieldViolation("event_id", "must not have surrounding spaces or control characters")]
        )
    if (payload_json is None) == (payload is None):
        raise PayloadError([FieldViolation("body", "set exactly one of payload or payload_json")])
    if payload_json is not None:
        root, raw = "payload_json", payload_json.encode()
        body_format = "json"
        if len(raw) > max_body_bytes:
            raise _too_large(root, len(raw), max_body_bytes)
        try:
            body = decode_json_body(payload_json)
            digest = body_digest(body)
            event = parse_event(body, digest, limits=limits)
        except PayloadError as exc:
            raise _rooted(exc, root) from None
    else:
        assert payload is not None
        root, body_format = "payload", "struct"
        try:
            body = normalise_body(payload)
        except PayloadError as exc:
            raise _rooted(exc, root) from None
        # Proto strings are valid UTF-8, so the canonical form always encodes.
        raw = canonical_bytes(body)
        if len(raw) > max_body_bytes:
            raise _too_large(root, len(raw), max_body_bytes)
        digest = hashlib.sha256(raw).hexdigest()
        try:
            event = parse_event(body, digest, limits=limits)
        except PayloadError as exc:
            raise _rooted(exc, root) from None
    return Delivery(
        event_id=event_id or f"sha256:{digest}",
        event=event,
        body_format=body_format,
        body=raw,
        source=source,
    )


def _too_large(root: str, size: int, limit: int) -> PayloadError:
    return PayloadError([FieldViolation(root, f"body is {size} bytes; the limit is {limit}")])


def _rooted(exc: PayloadError, root: str) -> PayloadError:
    return PayloadError(
        [
            FieldViolation(f"{root}.{v.field}" if v.field else root, v.description)
            for v in exc.violations
        ]
    )


def _discard_outcome(done: asyncio.Future[IngestResult]) -> None:
    # Nobody waits any more; retrieve the exception so asyncio does not report it as lost.
    if not done.cancelled():
        done.exception()


@dataclass
class _Pending:
    delivery: Delivery
    done: asyncio.Future[IngestResult] = field(repr=False)
    # When traced: the delivery's `ingest` span, and when it joined the queue (ns since epoch).
    span: Span | None = None
    queued_at: int = 0


class Ingestor:
    """Queues deliveries and commits them in groups; each caller is answered after its commit.

    Every transport calls `ingest` (gRPC, webhooks, reconcile); each delivery is counted and
    logged here, once, whichever way it came. Call `start()` before use and `stop()` to drain:
    deliveries already queued are committed and answered, later ones are refused with
    IngestorStopped.
    """

    def __init__(
        self,
        commits: CommitPath,
        *,
        max_batch: int = 256,
        limits: StateLimits | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        metrics: Metrics | None = None,
        want_results: bool = False,
    ) -> None:
        self._metrics = metrics if metrics is not None else Metrics()
        self._commits = commits
        self._max_batch = max_batch
        self._limits = limits or StateLimits()
        self._clock = clock
        # Whether completions mark combined results to fetch (Junction's API is configured).
        self._want_results = want_results
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ingestor")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._queue.put_nowait(None)
            await self._task
            self._task = None

    async def ingest(self, delivery: Delivery) -> IngestResult:
        """Ingest a decoded delivery; answered after the commit that holds it. Counted and
        logged (one line per delivery) under the delivery's `source`. Traced, when tracing is
        on, as an `ingest` span whose trace its change carries (see tracing.py)."""
        if not tracing.enabled:
            return await self._ingest(delivery, None)
        attributes = {"transaction_service.source": delivery.source}
        if delivery.event_id:
            attributes["transaction_service.event_id"] = delivery.event_id
        with tracing.span("ingest", attributes) as span:
            trace_id, span_id = tracing.ids(span)
            delivery = dataclasses.replace(delivery, trace_id=trace_id, span_id=span_id)
            result = await self._ingest(delivery, span)
            if span is not None:
                span.set_attribute("transaction_service.outcome", result.outcome.value)
            return result

    async def _ingest(self, delivery: Delivery, span: Span | None) -> IngestResult:
        source = delivery.source
        started = time.perf_counter()
        try:
            result = await self._enqueue(delivery, span)
        except AlreadyExists:
            self._metrics.ingest_refused(source, "conflict")
            raise
        except Unavailable:
            self._metrics.ingest_refused(source, "unavailable")
            raise
        seconds = time.perf_counter() - started
        self._metrics.ingested(source, result.outcome.value, seconds)
        event = delivery.event
        fields = {
            "event_id": result.event_id,
            "order_id": event.order.id if isinstance(event, OrderEvent) else None,
            "transaction_id": result.transaction.view.id if result.transaction else None,
            "outcome": result.outcome.value,
            "revision": result.revision,
            "source": source,
            "ms": round(seconds * 1000, 2),
        }
        event_log.info("ingested", extra={"fields": fields})
        return result

    async def _enqueue(self, delivery: Delivery, span: Span | None) -> IngestResult:
        if self._stopping or self._task is None:
            raise IngestorStopped
        done: asyncio.Future[IngestResult] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(
            _Pending(delivery, done)
            if span is None
            else _Pending(delivery, done, span, time.time_ns())
        )
        # Shielded: a caller that goes away does not stop its delivery from being committed (it
        # may already be in the batch being written); it is simply not told.
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            done.add_done_callback(_discard_outcome)
            raise

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            if first is None:
                return
            batch = [first]
            stop_after = False
            while len(batch) < self._max_batch and not self._queue.empty():
                item = self._queue.get_nowait()
                if item is None:
                    stop_after = True
                    break
                batch.append(item)
            await self._commit(batch)
            if stop_after:
                return

    async def _commit(self, batch: list[_Pending]) -> None:
        if tracing.enabled:
            await self._commit_traced(batch)
        else:
            await self._commit_batch(batch)

    async def _commit_traced(self, batch: list[_Pending]) -> None:
        """`_commit_batch` in a `commit batch` span of its own trace, linked to every delivery's
        `ingest` span; then each traced delivery gets its `queue wait` and `commit` spans in its
        own trace, the latter linked to the batch's (a delivery keeps its own trace, whatever
        batch it was committed in)."""
        traced = [p for p in batch if p.span is not None]
        started = time.time_ns()
        with tracing.span(
            "commit batch",
            {"transaction_service.batch.size": len(batch)},
            links=[p.span.get_span_context() for p in traced if p.span is not None],
            root=True,
        ) as batch_span:
            await self._commit_batch(batch)
        ended = time.time_ns()
        links = [batch_span.get_span_context()] if batch_span is not None else []
        for pending in traced:
            assert pending.span is not None
            tracing.past_span("queue wait", pending.span, pending.queued_at, started)
            tracing.past_span(
                "commit",
                pending.span,
                started,
                ended,
                {"transaction_service.batch.size": len(batch)},
                links=links,
            )

    async def _commit_batch(self, batch: list[_Pending]) -> None:
        now = self._clock()
        deliveries = [p.delivery for p in batch]
        try:
            applied, answers = await self._commits.commit(
                batch_keys(deliveries),
                lambda state: plan_batch(
                    deliveries, state, now, self._limits, want_results=self._want_results
                ),
            )
        except Exception as exc:
            refusal = exc if isinstance(exc, ServiceError) else _unexpected(exc, len(batch))
            for pending in batch:
                if not pending.done.done():
                    pending.done.set_exception(refusal)
            return
        self._metrics.batch_committed(len(batch))
        for pending, answer in zip(batch, answers, strict=True):
            if pending.done.done():
                continue
            if isinstance(answer, ServiceError):
                pending.done.set_exception(answer)
            else:
                pending.done.set_result(answer.resolve(applied))


def _unexpected(exc: Exception, size: int) -> StoreUnavailable:
    # A bug or a fault the store did not classify: log it once with its traceback; the callers
    # are told only that nothing was stored.
    log.error("commit of %d deliveries failed; none acknowledged", size, exc_info=exc)
    return StoreUnavailable("the event was not stored: the store could not commit. Retry later.")
