"""The one use case that writes: ingest one webhook delivery.

`decode_delivery` checks and parses a body (no I/O; bad input never reaches the store).
`apply_delivery` is the unit of work: dedupe, merge, persist, record the change, all inside one
store transaction. `Ingestor` queues deliveries and commits them in groups: a delivery is
acknowledged only after the commit that holds it, and all deliveries waiting at that moment share
one commit, which is what makes durable (fsync-per-commit) ingest fast.

The gRPC servicer calls this; so will an HTTP webhook receiver. Neither re-implements any of it.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

from transaction_service.domain.payload import (
    FieldViolation,
    OrderEvent,
    ParsedEvent,
    PayloadError,
    body_digest,
    canonical_json,
    decode_json_body,
    normalise_numbers,
    parse_event,
)
from transaction_service.domain.state import (
    ChangeKind,
    Knowledge,
    join,
    knowledge_from_event,
    view,
)
from transaction_service.domain.state import change_kinds as diff_kinds
from transaction_service.errors import AlreadyExists, Unavailable, echo
from transaction_service.metrics import Metrics
from transaction_service.store.base import (
    ChangeRecord,
    EventRecord,
    Store,
    StoredTransaction,
    TransactionSnapshot,
    UnitOfWork,
)

log = logging.getLogger(__name__)

MAX_EVENT_ID_LENGTH = 256


class Outcome(enum.StrEnum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    STALE = "stale"
    IGNORED = "ignored"


@dataclass(frozen=True)
class Delivery:
    """A checked, parsed delivery, ready for the store."""

    event_id: str
    event: ParsedEvent
    body_format: str  # "json": raw bytes kept as sent; "struct": canonical JSON
    body: bytes


@dataclass(frozen=True)
class IngestResult:
    outcome: Outcome
    event_id: str
    transaction: TransactionSnapshot | None = None
    change: ChangeRecord | None = None

    @property
    def revision(self) -> int:
        return self.change.revision if self.change else 0


class EventIdConflict(AlreadyExists):
    """The event id was ingested before with a different body."""

    def __init__(self, event_id: str) -> None:
        super().__init__(
            f"event_id {echo(event_id)} was already ingested with a different body; "
            "event ids must identify one delivery"
        )
        self.event_id = event_id


class StoreUnavailable(Unavailable):
    """The store could not commit; nothing of the delivery was stored."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="STORE_UNAVAILABLE")


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
) -> Delivery:
    """Check and parse one delivery. Raises PayloadError naming each field at fault.

    Field names in violations are those of the request: `event_id`, `payload_json`, or
    `payload.<path>` / `payload_json.<path>` for a field inside the body.
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
            event = parse_event(body, digest)
        except PayloadError as exc:
            raise _rooted(exc, root) from None
    else:
        assert payload is not None
        root, body, body_format = "payload", normalise_numbers(payload), "struct"
        # Proto strings are valid UTF-8, so the canonical form always encodes.
        raw = canonical_json(body).encode()
        if len(raw) > max_body_bytes:
            raise _too_large(root, len(raw), max_body_bytes)
        digest = hashlib.sha256(raw).hexdigest()
        try:
            event = parse_event(body, digest)
        except PayloadError as exc:
            raise _rooted(exc, root) from None
    return Delivery(
        event_id=event_id or f"sha256:{digest}",
        event=event,
        body_format=body_format,
        body=raw,
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


def apply_delivery(uow: UnitOfWork, delivery: Delivery, now: datetime) -> IngestResult:
    """Dedupe, merge and persist one delivery inside the caller's transaction."""
    event = delivery.event
    seen = uow.find_event(delivery.event_id)
    if seen is not None:
        if seen.digest != event.digest:
            raise EventIdConflict(delivery.event_id)
        current = uow.load(seen.transaction_id) if seen.transaction_id else None
        return IngestResult(Outcome.DUPLICATE, delivery.event_id, _snapshot(current))

    if not isinstance(event, OrderEvent):
        _record(uow, delivery, Outcome.IGNORED, now)
        return IngestResult(Outcome.IGNORED, delivery.event_id)

    incoming = knowledge_from_event(event)
    order_id = event.order.id
    target_id = incoming.id
    if incoming.legacy:
        # No transaction block: if the order already belongs to a transaction, it stays there.
        target_id = uow.transaction_id_for_order(order_id) or order_id
    stored = uow.load(target_id)
    knowledge = join(stored.knowledge if stored else _empty(target_id, incoming), incoming)

    # A payload with a block may name orders that so far stood in legacy transactions of their own:
    # fold those in, so the order lives in one transaction whatever the delivery order was.
    folded: list[str] = []
    if not incoming.legacy:
        for known_order in incoming.orders:
            other_id = uow.transaction_id_for_order(known_order)
            if other_id is None or other_id == target_id or other_id in folded:
                continue
            other = uow.load(other_id)
            if other is not None and other.knowledge.legacy:
                knowledge = join(knowledge, other.knowledge)
                folded.append(other_id)
            elif other is not None:
                log.warning(
                    "order %s moves from transaction %s to %s: the provider changed its mind",
                    known_order,
                    other_id,
                    target_id,
                )

    before = stored.view if stored else None
    after = view(knowledge)
    kinds = diff_kinds(before, after)
    if folded:
        kinds.append(ChangeKind.LEGACY_MERGED)

    if not kinds:
        if stored is not None and knowledge != stored.knowledge:
            # Nothing visible changed, but keep the join complete so later merges stay
            # independent of delivery order.
            uow.save(StoredTransaction(knowledge, after, stored.revision))
        _record(uow, delivery, Outcome.STALE, now, transaction_id=target_id)
        return IngestResult(Outcome.STALE, delivery.event_id, _snapshot(stored))

    change = uow.append_change(target_id, delivery.event_id, order_id, kinds, after, now)
    for other_id in folded:
        uow.delete(other_id)
    uow.save(StoredTransaction(knowledge, after, change.revision))
    _record(uow, delivery, Outcome.APPLIED, now, transaction_id=target_id, change=change)
    return IngestResult(
        Outcome.APPLIED,
        delivery.event_id,
        TransactionSnapshot(after, change.revision),
        change,
    )


def _empty(transaction_id: str, incoming: Knowledge) -> Knowledge:
    return Knowledge(id=transaction_id, legacy=incoming.legacy)


def _snapshot(stored: StoredTransaction | None) -> TransactionSnapshot | None:
    return TransactionSnapshot(stored.view, stored.revision) if stored else None


def _record(
    uow: UnitOfWork,
    delivery: Delivery,
    outcome: Outcome,
    now: datetime,
    *,
    transaction_id: str | None = None,
    change: ChangeRecord | None = None,
) -> None:
    event = delivery.event
    uow.record_event(
        EventRecord(
            event_id=delivery.event_id,
            event_type=event.event_type,
            body_format=delivery.body_format,
            body=delivery.body,
            digest=event.digest,
            order_id=event.order.id if isinstance(event, OrderEvent) else None,
            transaction_id=transaction_id,
            outcome=outcome.value,
            revision=change.revision if change else None,
            received_at=now,
        )
    )


def _discard_outcome(done: asyncio.Future[IngestResult]) -> None:
    # Nobody waits any more; retrieve the exception so asyncio does not report it as lost.
    if not done.cancelled():
        done.exception()


ChangeListener = Callable[[Sequence[ChangeRecord]], None]


@dataclass
class _Pending:
    delivery: Delivery
    done: asyncio.Future[IngestResult] = field(repr=False)


class Ingestor:
    """Queues deliveries and commits them in groups; each caller is answered after its commit.

    Call `start()` before use and `stop()` to drain: deliveries already queued are committed and
    answered, later ones are refused with IngestorStopped.
    """

    def __init__(
        self,
        store: Store,
        *,
        max_batch: int = 256,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_changes: ChangeListener | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics if metrics is not None else Metrics()
        self._store = store
        self._max_batch = max_batch
        self._clock = clock
        self._on_changes = on_changes
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
        if self._stopping or self._task is None:
            raise IngestorStopped
        done: asyncio.Future[IngestResult] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(delivery, done))
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
        now = self._clock()
        work = [partial(apply_delivery, delivery=p.delivery, now=now) for p in batch]
        try:
            results = await self._store.run_batch(work)
        except Exception:
            log.exception("commit of %d deliveries failed; none acknowledged", len(batch))
            refusal = StoreUnavailable(
                "the event was not stored: the database could not commit. Retry later."
            )
            for pending in batch:
                if not pending.done.done():
                    pending.done.set_exception(refusal)
            return
        self._metrics.batch_committed(len(batch))
        changes = []
        for pending, result in zip(batch, results, strict=True):
            if isinstance(result, IngestResult) and result.change is not None:
                changes.append(result.change)
            if pending.done.done():
                continue
            if isinstance(result, Exception):
                pending.done.set_exception(result)
            else:
                pending.done.set_result(result)
        if changes and self._on_changes is not None:
            try:
                self._on_changes(changes)
            except Exception:
                log.exception("change listener failed")
