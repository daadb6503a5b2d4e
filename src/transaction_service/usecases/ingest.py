"""The one use case that writes: ingest webhook deliveries.

`decode_delivery` checks and parses a body (no I/O; bad input never reaches the store).
`Ingestor` queues deliveries and commits them in groups: the deliveries waiting at a moment share
one store transaction (`plan.py` decides every write of the group, the store applies it), and each
is acknowledged only after that commit. That is what makes durable (fsync-per-commit) ingest fast.
What may wait, and in which order batches are filled, is `admission.py`'s: bounded, and fair
among webhooks, unary calls and bulk streams. A delivery whose caller's deadline passes while it
waits is dropped before the commit, so it delays nobody.

The gRPC servicer and the HTTP webhook receiver both call this; neither re-implements any of it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

from transaction_service import tracing
from transaction_service.domain.limits import DEFAULT_LIMITS, StateLimits
from transaction_service.domain.payload import (
    NUL_ESCAPE,
    OrderEvent,
    PayloadError,
    canonical_bytes,
    decode_json_body,
    digest_of,
    normalise_body,
    nul_violations,
    parse_event,
)
from transaction_service.errors import (
    AlreadyExists,
    DeadlinePassed,
    FieldViolation,
    InvalidArgument,
    Overloaded,
    Reason,
    ServiceError,
    Unavailable,
    echo,
)
from transaction_service.metrics import Metrics
from transaction_service.store.base import (
    BatchKeys,
    KeysBusy,
    Planner,
    StoreDataRefused,
    StoreUnavailable,
)
from transaction_service.usecases.admission import AdmissionQueue, Flow, Lane, Ticket
from transaction_service.usecases.commit import CommitPath, Committed
from transaction_service.usecases.plan import (
    Delivery,
    EventIdConflict,
    IngestResult,
    Outcome,
    Planned,
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
# Event-id prefixes the service gives records of its own: Junction's API answers
# (`api:sha256:`) and results fetches (`api:results:sha256:`), rebuilds (`rebuild:`). A caller's
# id may not start with one (in any case), or the delivery history would say the service wrote
# what a caller sent.
RESERVED_EVENT_ID_PREFIXES = ("api:", "rebuild:")
# What an event id left empty becomes: this and the digest of the body. A caller may send such an
# id only for that same body (a retry quoting the id it was answered with); any other body under
# it would pass for a delivery that came without an id.
DERIVED_EVENT_ID_PREFIX = "sha256:"
# The sources whose event ids a caller chose (gRPC, webhooks); `api` ids are the service's own.
CALLER_SOURCES = frozenset({"grpc", "webhook"})
# Bounds of the deliveries waiting for a commit (settings ingest_queue_limit, _bytes).
DEFAULT_QUEUE_LIMIT = 4096
DEFAULT_QUEUE_BYTES = 256 * 1024 * 1024
# What a caller refused for a full queue, or for a locked transaction, is told to wait.
RETRY_AFTER_SECONDS = 1.0
# Dropped deliveries are logged in one line per this many seconds, with counts.
DROP_LOG_SECONDS = 5.0
# While webhooks or unary calls came in the last INTERACTIVE_SECONDS, a batch takes at most
# BULK_SLICE stream deliveries: a caller waits for the batch being committed and then its own,
# so batches stay short while such callers are about. Measured with 20 flooding streams
# (bench/abuse_ingest.py fairness): a slice of 32 gave unary calls a p50 of 94 ms, a slice of 8
# 22 ms, and the streams' own throughput was the same (decoding them is what bounds it).
INTERACTIVE_SECONDS = 1.0
BULK_SLICE = 8


class IngestorStopped(Unavailable):
    """The ingestor is shutting down and takes no more deliveries."""

    def __init__(self) -> None:
        super().__init__(
            "the service is shutting down; nothing was stored: retry on another replica or later",
            reason=Reason.SHUTTING_DOWN,
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
    caller = source in CALLER_SOURCES
    if caller and event_id.lower().startswith(RESERVED_EVENT_ID_PREFIXES):
        raise PayloadError(
            [
                FieldViolation(
                    "event_id",
                    "must not start with "
                    + " or ".join(f"`{p}`" for p in RESERVED_EVENT_ID_PREFIXES)
                    + ": the service names its own records so",
                )
            ]
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
            if NUL_ESCAPE in payload_json and (violations := nul_violations(body)):
                raise PayloadError(violations)
            digest, canonical = digest_of(body)
            event = parse_event(body, digest, limits=limits, canonical=canonical)
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
            if NUL_ESCAPE.encode() in raw and (violations := nul_violations(body)):
                raise PayloadError(violations)
            event = parse_event(body, digest, limits=limits, canonical=raw)
        except PayloadError as exc:
            raise _rooted(exc, root) from None
    derived = DERIVED_EVENT_ID_PREFIX + digest
    if caller and event_id.lower().startswith(DERIVED_EVENT_ID_PREFIX) and event_id != derived:
        raise PayloadError(
            [
                FieldViolation(
                    "event_id",
                    f"an id starting with `{DERIVED_EVENT_ID_PREFIX}` must be the one the service "
                    "derives from this body (`sha256:` and its digest)"
                    # A webhook's id is Svix's: its sender cannot leave it empty.
                    + ("" if source == "webhook" else "; leave event_id empty to have it derived"),
                )
            ]
        )
    return Delivery(
        event_id=event_id or derived,
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


@dataclass(eq=False)
class _Pending:
    delivery: Delivery
    done: asyncio.Future[IngestResult] = field(repr=False)
    # loop.time() by which the caller stops waiting; None: no deadline.
    deadline: float | None = None
    # When traced: the delivery's `ingest` span, and when it joined the queue (ns since epoch).
    span: Span | None = None
    queued_at: int = 0


class _Entry(NamedTuple):
    """A delivery of `Ingestor.ingest_many`: its place in the request, its ticket, and the
    future that says it was queued, when it had to wait for room."""

    place: int
    ticket: Ticket[_Pending]
    room: asyncio.Future[None] | None


def _room_refused(done: asyncio.Future[IngestResult], room: asyncio.Future[None]) -> None:
    if not room.cancelled() and (error := room.exception()) is not None and not done.done():
        done.set_exception(error)


def _exception(error: BaseException) -> Exception:
    if not isinstance(error, Exception):
        raise error
    return error


def default_flow(delivery: Delivery) -> Flow:
    """The flow of a delivery whose transport named none: webhooks share one flow; the others
    (reconciliation's `api`, tests) are unary calls, a flow per source."""
    if delivery.source == "webhook":
        return Flow(Lane.WEBHOOK, "webhook")
    return Flow(Lane.UNARY, delivery.source)


class Ingestor:
    """Queues deliveries and commits them in groups; each caller is answered after its commit.

    Every transport calls `ingest` (gRPC, webhooks, reconcile); each delivery is counted (and,
    with `log_events`, logged) here, once, whichever way it came. Call `start()` before use and
    `stop()` to drain: deliveries already queued are committed and answered, later ones are
    refused with IngestorStopped.

    The queue is bounded (`queue_limit` deliveries, `queue_bytes` of bodies) and shared fairly
    (see `admission.py`). A delivery that finds its share full is refused with Overloaded, or,
    if its caller asked to `wait` (a stream), waits for room. A delivery whose caller's deadline
    passes, or whose caller goes away, before it is taken into a batch is dropped: never
    committed, never acknowledged.
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
        queue_limit: int = DEFAULT_QUEUE_LIMIT,
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        log_events: bool = False,
    ) -> None:
        self._metrics = metrics if metrics is not None else Metrics()
        self._commits = commits
        self._max_batch = max_batch
        self._limits = limits or StateLimits()
        self._clock = clock
        # Whether completions mark combined results to fetch (Junction's API is configured).
        self._want_results = want_results
        # One log line per event (setting log_events): off by default, it cost more than the
        # event's decoding (docs/performance.md); the metrics count every event either way.
        self._log_events = log_events
        self._queue: AdmissionQueue[_Pending] = AdmissionQueue(queue_limit, queue_bytes)
        # Deliveries waiting for room in their flow's share, oldest first per flow.
        self._waiters: collections.OrderedDict[
            Flow, collections.deque[tuple[Ticket[_Pending], asyncio.Future[None]]]
        ] = collections.OrderedDict()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._interactive_at = float("-inf")
        self._drops: collections.Counter[str] = collections.Counter()
        self._drop_log: asyncio.TimerHandle | None = None
        self._metrics.count_ingest_queue(lambda lane: self._queue.depth(Lane(lane)))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ingestor")

    async def stop(self) -> None:
        self._stopping = True
        for waiters in self._waiters.values():
            for _, room in waiters:
                if not room.done():
                    room.set_exception(IngestorStopped())
        self._waiters.clear()
        if self._task is not None:
            self._arrived.set()
            await self._task
            self._task = None
        if self._drop_log is not None:
            self._drop_log.cancel()
            self._log_drops()

    @property
    def queued(self) -> int:
        """Deliveries waiting for a commit now."""
        return len(self._queue)

    async def ingest(
        self,
        delivery: Delivery,
        *,
        flow: Flow | None = None,
        time_remaining: float | None = None,
        wait: bool | None = None,
    ) -> IngestResult:
        """Ingest a decoded delivery; answered after the commit that holds it. Counted under
        the delivery's `source` (and logged, one line per delivery, with `log_events`). Traced,
        when tracing is on, as an `ingest` span whose trace its change carries (see tracing.py).

        `flow` is who it waits for (default: by source, see `default_flow`); `time_remaining`,
        the seconds its caller still waits (gRPC's time remaining, Svix's 15 s): if they pass before
        it is taken into a batch, it is dropped and DeadlinePassed raised. `wait`: when its
        flow's share is full, wait for room rather than be refused with Overloaded (default:
        only for reconciliation's own ingests, source `api`).
        """
        if not tracing.enabled:
            return await self._ingest(delivery, None, flow, time_remaining, wait)
        attributes = {"transaction_service.source": delivery.source}
        if delivery.event_id:
            attributes["transaction_service.event_id"] = delivery.event_id
        with tracing.span("ingest", attributes) as span:
            trace_id, span_id = tracing.ids(span)
            delivery = dataclasses.replace(delivery, trace_id=trace_id, span_id=span_id)
            result = await self._ingest(delivery, span, flow, time_remaining, wait)
            if span is not None:
                span.set_attribute("transaction_service.outcome", result.outcome.value)
            return result

    async def _ingest(
        self,
        delivery: Delivery,
        span: Span | None,
        flow: Flow | None,
        time_remaining: float | None,
        wait: bool | None,
    ) -> IngestResult:
        source = delivery.source
        started = time.perf_counter()
        if flow is None:
            flow = default_flow(delivery)
        if wait is None:
            wait = source == "api"
        try:
            result = await self._enqueue(delivery, flow, time_remaining, wait, span)
        except Exception as exc:
            self._refused(source, exc)
            raise
        self._answered(delivery, result, time.perf_counter() - started)
        return result

    def _refused(self, source: str, exc: Exception) -> None:
        """Count a delivery refused by the ingestor (not by the plan's checks)."""
        if isinstance(exc, AlreadyExists):
            self._metrics.ingest_refused(source, "conflict")
        elif isinstance(exc, Unavailable):
            self._metrics.ingest_refused(source, "unavailable")
        elif isinstance(exc, Overloaded):
            self._metrics.ingest_refused(source, "overloaded")
        elif isinstance(exc, DeadlinePassed):
            self._metrics.ingest_refused(source, "dropped")

    def _answered(self, delivery: Delivery, result: IngestResult, seconds: float) -> None:
        """Count (and with `log_events`, log) a delivery answered after its commit."""
        self._metrics.ingested(delivery.source, result.outcome.value, seconds)
        if self._log_events:
            self._log_event(delivery, result, seconds)

    def _log_event(self, delivery: Delivery, result: IngestResult, seconds: float) -> None:
        source = delivery.source
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

    async def ingest_many(
        self,
        deliveries: Sequence[Delivery],
        *,
        flow: Flow,
        time_remaining: float | None = None,
        wait: bool = False,
    ) -> list[IngestResult | Exception]:
        """`ingest` for each delivery, all queued at once (so they share group commits); each
        delivery's result or the error refusing it, in order. One refused delivery does not
        fail the others.

        Each delivery is queued, waits, is dropped at the deadline or when the caller goes away,
        and is counted (and logged) exactly as by `ingest`, but all of them by this one
        coroutine: a task and a timeout per delivery cost more than its plan (docs/
        performance.md). Traced deliveries go through `ingest` one by one, each in its span."""
        if tracing.enabled:
            results = await asyncio.gather(
                *(
                    self.ingest(d, flow=flow, time_remaining=time_remaining, wait=wait)
                    for d in deliveries
                ),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, BaseException) and not isinstance(result, Exception):
                    raise result
            return results  # type: ignore[return-value]
        started = time.perf_counter()
        answers: list[IngestResult | Exception | None] = [None] * len(deliveries)
        entries = self._enqueue_many(deliveries, flow, time_remaining, wait, answers)
        if entries:
            self._arrived.set()
            await self._committed_many(entries, answers)
        seconds = time.perf_counter() - started
        done: list[IngestResult | Exception] = []
        # Counted together: a metric's label lookup per delivery cost as much as its lock.
        outcomes: collections.Counter[tuple[str, str]] = collections.Counter()
        for delivery, answer in zip(deliveries, answers, strict=True):
            assert answer is not None
            if isinstance(answer, IngestResult):
                outcomes[delivery.source, answer.outcome.value] += 1
                if self._log_events:
                    self._log_event(delivery, answer, seconds)
            else:
                self._refused(delivery.source, answer)
            done.append(answer)
        self._metrics.ingested_together(outcomes, seconds)
        return done

    def _enqueue_many(
        self,
        deliveries: Sequence[Delivery],
        flow: Flow,
        time_remaining: float | None,
        wait: bool,
        answers: list[IngestResult | Exception | None],
    ) -> list[_Entry]:
        """`_enqueue`'s admission for each delivery in order, without waiting: queued, or
        waiting for room in its flow's share (with `wait`), or refused in `answers`."""
        if self._stopping or self._task is None:
            for i in range(len(deliveries)):
                answers[i] = IngestorStopped()
            return []
        loop = asyncio.get_running_loop()
        deadline = None if time_remaining is None else loop.time() + time_remaining
        if flow.lane is not Lane.STREAM:
            self._interactive_at = loop.time()
        queue = self._queue
        entries: list[_Entry] = []
        for i, delivery in enumerate(deliveries):
            pending = _Pending(delivery, loop.create_future(), deadline)
            ticket = Ticket(pending, flow, len(delivery.body))
            room: asyncio.Future[None] | None = None
            if queue.has_room(flow, ticket.size) and flow not in self._waiters:
                queue.put(ticket)
            elif wait:
                room = loop.create_future()
                # Refused while waiting (the ingestor stops): that is its answer.
                room.add_done_callback(partial(_room_refused, pending.done))
                self._waiters.setdefault(flow, collections.deque()).append((ticket, room))
            else:
                answers[i] = self._overloaded(flow)
                continue
            entries.append(_Entry(i, ticket, room))
        return entries

    async def _committed_many(
        self, entries: list[_Entry], answers: list[IngestResult | Exception | None]
    ) -> None:
        """Wait for the answers of `_enqueue_many`'s deliveries into `answers`. As `_committed`
        (and `_wait_for_room`) for each: at the deadline, those still waiting for room or in
        the queue are dropped, those being committed are waited for; when the caller goes away,
        those in the queue are taken out and the others are not told."""
        loop = asyncio.get_running_loop()
        futures = [entry.ticket.item.done for entry in entries]
        deadline = entries[0].ticket.item.deadline
        try:
            _, late = await asyncio.wait(
                futures, timeout=None if deadline is None else max(0.0, deadline - loop.time())
            )
            if late:
                committing = []
                withdrew = False
                for entry in entries:
                    pending = entry.ticket.item
                    if pending.done.done():
                        continue
                    room = entry.room
                    if room is not None and not room.done():
                        room.cancel()
                    elif self._queue.withdraw(entry.ticket):
                        withdrew = True
                    else:
                        committing.append(pending.done)  # being committed: its outcome is near
                        continue
                    self._dropped(pending.delivery, "deadline")
                    answers[entry.place] = _deadline_passed()
                if withdrew:
                    self._admit_waiters()
                if committing:
                    await asyncio.wait(committing)
        except asyncio.CancelledError:
            withdrew = False
            for entry in entries:
                pending = entry.ticket.item
                room = entry.room
                if pending.done.done():
                    _discard_outcome(pending.done)
                elif room is not None and not room.done():
                    room.cancel()
                elif self._queue.withdraw(entry.ticket):
                    self._dropped(pending.delivery, "caller_gone")
                    withdrew = True
                else:
                    pending.done.add_done_callback(_discard_outcome)
            if withdrew:
                self._admit_waiters()
            raise
        for entry in entries:
            done = entry.ticket.item.done
            if answers[entry.place] is None:
                error = done.exception()
                answers[entry.place] = done.result() if error is None else _exception(error)

    async def _enqueue(
        self,
        delivery: Delivery,
        flow: Flow,
        time_remaining: float | None,
        wait: bool,
        span: Span | None,
    ) -> IngestResult:
        if self._stopping or self._task is None:
            raise IngestorStopped
        loop = asyncio.get_running_loop()
        deadline = None if time_remaining is None else loop.time() + time_remaining
        pending = _Pending(
            delivery, loop.create_future(), deadline, span, time.time_ns() if span else 0
        )
        ticket = Ticket(pending, flow, len(delivery.body))
        if flow.lane is not Lane.STREAM:
            self._interactive_at = loop.time()
        if self._queue.has_room(flow, ticket.size) and flow not in self._waiters:
            self._queue.put(ticket)
        elif wait:
            await self._wait_for_room(ticket)
        else:
            raise self._overloaded(flow)
        self._arrived.set()
        return await self._committed(ticket)

    def _overloaded(self, flow: Flow) -> Overloaded:
        return Overloaded(
            f"too many deliveries are waiting for a commit (the {flow.lane.value} share of the "
            f"ingest queue, or this caller's part of it, is full); nothing was stored: retry in "
            f"{RETRY_AFTER_SECONDS:g} s",
            reason=Reason.INGEST_QUEUE_FULL,
            metadata={"lane": flow.lane.value},
            retry_after=RETRY_AFTER_SECONDS,
        )

    async def _wait_for_room(self, ticket: Ticket[_Pending]) -> None:
        """Wait until `_admit_waiters` queued `ticket`; DeadlinePassed if the caller's deadline
        passes first."""
        room: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(ticket.flow, collections.deque()).append((ticket, room))
        deadline = ticket.item.deadline
        try:
            async with asyncio.timeout_at(deadline):
                await room
        except TimeoutError:
            self._dropped(ticket.item.delivery, "deadline")
            raise _deadline_passed() from None
        except asyncio.CancelledError:
            # Queued just before the caller went away: take it out again.
            if room.done() and not room.cancelled() and self._queue.withdraw(ticket):
                self._dropped(ticket.item.delivery, "caller_gone")
                self._admit_waiters()
            raise

    def _admit_waiters(self) -> None:
        """Queue waiting deliveries, oldest first in each flow, while their flows have room."""
        for flow in list(self._waiters):
            waiters = self._waiters[flow]
            while waiters:
                ticket, room = waiters[0]
                if room.done():  # its caller gave up
                    waiters.popleft()
                    continue
                if not self._queue.has_room(flow, ticket.size):
                    break
                waiters.popleft()
                self._queue.put(ticket)
                room.set_result(None)
                self._arrived.set()
            if not waiters:
                del self._waiters[flow]

    async def _committed(self, ticket: Ticket[_Pending]) -> IngestResult:
        """The delivery's answer once committed. Shielded: a caller that goes away once its
        delivery is in the batch being written does not stop it from being committed; it is
        simply not told. Before that, its delivery is dropped."""
        pending = ticket.item
        done = pending.done
        try:
            try:
                async with asyncio.timeout_at(pending.deadline):
                    return await asyncio.shield(done)
            except TimeoutError:
                if self._queue.withdraw(ticket):
                    self._dropped(pending.delivery, "deadline")
                    self._admit_waiters()
                    raise _deadline_passed() from None
                return await asyncio.shield(done)  # being committed: its outcome is near
        except asyncio.CancelledError:
            if self._queue.withdraw(ticket):
                self._dropped(pending.delivery, "caller_gone")
                self._admit_waiters()
            else:
                done.add_done_callback(_discard_outcome)
            raise

    def _dropped(self, delivery: Delivery, reason: str) -> None:
        """Count a delivery dropped before its commit; log the drops once per few seconds."""
        self._metrics.ingest_dropped(delivery.source, reason)
        self._drops[reason] += 1
        if self._drop_log is None:
            self._drop_log = asyncio.get_running_loop().call_later(
                DROP_LOG_SECONDS, self._log_drops
            )

    def _log_drops(self) -> None:
        self._drop_log = None
        if not self._drops:
            return
        log.warning(
            "dropped %d deliveries before their commit in the last %gs (none acknowledged, "
            "nothing stored): deadline passed %d, caller went away %d",
            sum(self._drops.values()),
            DROP_LOG_SECONDS,
            self._drops["deadline"],
            self._drops["caller_gone"],
        )
        self._drops.clear()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not len(self._queue):
                if self._stopping:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            interactive = loop.time() - self._interactive_at < INTERACTIVE_SECONDS
            most_bulk = BULK_SLICE if interactive else None
            tickets = self._queue.take(self._max_batch, most_bulk)
            self._admit_waiters()
            now = loop.time()
            batch = []
            for ticket in tickets:
                pending = ticket.item
                if pending.deadline is not None and pending.deadline <= now:
                    # Its caller stopped waiting: committing it would only delay the others.
                    self._dropped(pending.delivery, "deadline")
                    if not pending.done.done():
                        pending.done.set_exception(_deadline_passed())
                else:
                    batch.append(pending)
            if batch:
                await self._commit(batch)

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

        def keys_of(deliveries: Sequence[Delivery]) -> BatchKeys:
            return batch_keys(list(deliveries))

        def plan_of(deliveries: Sequence[Delivery]) -> Planner[Sequence[Planned | ServiceError]]:
            chosen = list(deliveries)
            return lambda state: plan_batch(
                chosen, state, now, self._limits, want_results=self._want_results
            )

        results = await self._commits.commit_each([p.delivery for p in batch], keys_of, plan_of)
        committed = sum(isinstance(result, Committed) for result in results)
        if committed:
            self._metrics.batch_committed(committed)
        failures: dict[int, ServiceError] = {}
        for pending, result in zip(batch, results, strict=True):
            if pending.done.done():
                continue
            if isinstance(result, Committed):
                answer = result.answer
                if isinstance(answer, ServiceError):
                    pending.done.set_exception(answer)
                else:
                    pending.done.set_result(answer.resolve(result.applied))
                continue
            # One error object per failed part: refusals built (and logged) once each.
            refusal = failures.get(id(result))
            if refusal is None:
                refusal = failures[id(result)] = _refusal(result, pending.delivery)
            pending.done.set_exception(refusal)


def _refusal(exc: Exception, delivery: Delivery) -> ServiceError:
    """What the callers of a part of a batch that did not commit are told."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, KeysBusy):
        return Unavailable(
            "the transaction is locked by another database session; nothing was stored: "
            f"retry in {RETRY_AFTER_SECONDS:g} s",
            reason=Reason.TRANSACTION_LOCKED,
            retry_after=RETRY_AFTER_SECONDS,
        )
    if isinstance(exc, StoreDataRefused):
        # Validation should have refused it: say so loudly, once, without the data.
        log.error(
            "the store refused the data of event %s (%s); it alone was not stored",
            echo(delivery.event_id),
            exc.what,
        )
        return InvalidArgument(
            [
                FieldViolation(
                    "", f"the store cannot hold this delivery's data ({exc.what}); nothing stored"
                )
            ]
        )
    return _unexpected(exc)


def _deadline_passed() -> DeadlinePassed:
    return DeadlinePassed(
        "the caller's deadline passed before the delivery could be committed; it was dropped "
        "and nothing was stored: send it again",
        reason=Reason.DEADLINE_PASSED,
        retry_after=RETRY_AFTER_SECONDS,
    )


def _unexpected(exc: Exception) -> StoreUnavailable:
    # A bug or a fault the store did not classify: log it once with its traceback; the callers
    # are told only that nothing was stored.
    log.error("commit failed; none of its deliveries acknowledged", exc_info=exc)
    return StoreUnavailable("the event was not stored: the store could not commit. Retry later.")
