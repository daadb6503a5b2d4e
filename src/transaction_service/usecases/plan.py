"""Planning a batch of deliveries: dedupe, merge, legacy fold, change kinds, limits. Pure.

`batch_keys` says what a batch touches, before anything is read; the store locks and loads it
(`BatchState`); `plan_batch` decides every write from that state alone, in delivery order, as if
the deliveries had been applied one after the other; the store then applies the plan. Nothing
here does I/O, so the same plan comes out whichever store ran it, and a store that must retry a
batch can simply plan it again.

`plan_rebuild` plans the other kind of batch, a rebuild: transactions re-derived from their
stored events after a merge-rule change (see `rebuild.py`).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from datetime import datetime

import msgspec

from transaction_service.domain.diff import diff_to_json, diff_views
from transaction_service.domain.explain import (
    applied_reason,
    bounded,
    ignored_reason,
    stale_reason,
)
from transaction_service.domain.limits import DEFAULT_LIMITS, StateLimits
from transaction_service.domain.payload import (
    OrderEvent,
    ParsedEvent,
    PayloadError,
    decode_json_body,
    parse_event,
)
from transaction_service.domain.state import (
    ChangeKind,
    Knowledge,
    TransactionStatus,
    TransactionView,
    join,
    knowledge_from_event,
    knowledge_to_json,
    view,
    view_to_json,
)
from transaction_service.domain.state import change_kinds as diff_kinds
from transaction_service.errors import (
    AlreadyExists,
    FieldViolation,
    InvalidArgument,
    ServiceError,
    echo,
)
from transaction_service.store.base import (
    AppliedBatch,
    BatchKeys,
    BatchPlan,
    BatchState,
    ChangeRecord,
    ChangeWrite,
    DuplicateWrite,
    EventWrite,
    PendingResultsWrite,
    StoredEventBody,
    TransactionSnapshot,
    TransactionWrite,
)

log = logging.getLogger(__name__)


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
    # Where it came from: "grpc", "webhook" or "api" (reconciliation); kept with the event.
    source: str = "grpc"
    # The trace of its delivery (W3C ids in hex; see tracing.py), handed on to the change it
    # makes; empty when it was not traced.
    trace_id: str = ""
    span_id: str = ""


class IngestResult(msgspec.Struct, frozen=True):
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


# The kinds a subscriber is told once per transaction.
ONCE_KINDS = {
    ChangeKind.REDRAW_AVAILABLE,
    ChangeKind.TRANSACTION_COMPLETED,
    ChangeKind.TRANSACTION_CANCELLED,
}


def reported_once_kinds(view: TransactionView) -> frozenset[ChangeKind]:
    """The "reported once" kinds a transaction in this state has already reported."""
    kinds = set()
    if view.redraw_available:
        kinds.add(ChangeKind.REDRAW_AVAILABLE)
    if view.status == TransactionStatus.COMPLETED:
        kinds.add(ChangeKind.TRANSACTION_COMPLETED)
    elif view.status == TransactionStatus.CANCELLED:
        kinds.add(ChangeKind.TRANSACTION_CANCELLED)
    return frozenset(kinds)


# The kinds after which a transaction's combined results are (re)fetched from Junction.
RESULTS_KINDS = {ChangeKind.TRANSACTION_COMPLETED, ChangeKind.RESULTS_CORRECTED}


def batch_keys(deliveries: list[Delivery]) -> BatchKeys:
    """Every key a batch reads or may write, from the deliveries alone."""
    event_ids, order_ids, transaction_ids = set(), set(), set()
    for delivery in deliveries:
        event_ids.add(delivery.event_id)
        event = delivery.event
        if not isinstance(event, OrderEvent):
            continue
        order = event.order
        order_ids.add(order.id)
        # The order's legacy stand-in, if it has one, has the order's id.
        transaction_ids.add(order.id)
        block = order.order_transaction
        if block is not None:
            transaction_ids.add(block.id)
            for entry in block.orders:
                order_ids.add(entry.id)
                transaction_ids.add(entry.id)
    return BatchKeys(frozenset(event_ids), frozenset(order_ids), frozenset(transaction_ids))


@dataclass
class _Current:
    """A transaction in the working copy: what is stored, or what this batch made of it."""

    knowledge: Knowledge
    view: TransactionView
    revision: int
    change: int | None = None
    knowledge_json: str | None = None
    view_json: str | None = None


class Planned(msgspec.Struct, frozen=True):
    """One delivery's answer, with revisions still relative to the batch."""

    outcome: Outcome
    event_id: str
    transaction: _Current | None
    snapshot: TransactionSnapshot | None = None
    change: int | None = None

    def resolve(self, applied: AppliedBatch) -> IngestResult:
        snapshot = self.snapshot
        if self.transaction is not None:
            current = self.transaction
            snapshot = TransactionSnapshot(
                current.view, applied.revision_of(current.change, current.revision)
            )
        return IngestResult(
            self.outcome,
            self.event_id,
            snapshot,
            applied.changes[self.change] if self.change is not None else None,
        )


class _Batch:
    def __init__(
        self, state: BatchState, now: datetime, limits: StateLimits, want_results: bool
    ) -> None:
        self.plan = BatchPlan()
        self.now = now
        self.limits = limits
        self.want_results = want_results
        self.events = {k: (e.digest, e.order_id) for k, e in state.events.items()}
        self.stored_events = state.events
        self.order_index = dict(state.order_index)
        self.transactions: dict[str, _Current] = {
            k: _Current(t.knowledge, t.view, t.revision) for k, t in state.transactions.items()
        }
        self.dirty: set[str] = set()

    def finish(self) -> BatchPlan:
        for transaction_id in self.dirty:
            current = self.transactions.get(transaction_id)
            if current is None:
                continue  # folded away later in the batch
            self.plan.transactions[transaction_id] = TransactionWrite(
                knowledge=current.knowledge,
                view=current.view,
                change=current.change,
                revision=current.revision,
                knowledge_json=current.knowledge_json or knowledge_to_json(current.knowledge),
                view_json=current.view_json or view_to_json(current.view),
            )
        return self.plan

    def current_of_order(self, order_id: str | None) -> _Current | None:
        if order_id is None:
            return None
        transaction_id = self.order_index.get(order_id)
        return self.transactions.get(transaction_id) if transaction_id else None

    def add(self, delivery: Delivery) -> Planned:
        event = delivery.event
        seen = self.events.get(delivery.event_id)
        if seen is not None:
            digest, order_id = seen
            if digest != event.digest:
                raise EventIdConflict(delivery.event_id)
            # Counted on the original's row: a retry leaves a trace of bounded size.
            counted = self.plan.duplicates.get(delivery.event_id)
            self.plan.duplicates[delivery.event_id] = DuplicateWrite(
                delivery.event_id, (counted.count if counted else 0) + 1, self.now
            )
            # The current state of the transaction the event's order belongs to now (it may
            # have moved there from a legacy stand-in since).
            current = self.current_of_order(order_id)
            recorded = self.stored_events.get(delivery.event_id)
            if current is None and recorded is not None:
                return Planned(Outcome.DUPLICATE, delivery.event_id, None, recorded.current)
            return Planned(Outcome.DUPLICATE, delivery.event_id, current)

        if not isinstance(event, OrderEvent):
            self.record(delivery, Outcome.IGNORED, ignored_reason(event.event_type))
            return Planned(Outcome.IGNORED, delivery.event_id, None)

        incoming = knowledge_from_event(event)
        order_id = event.order.id
        target_id = incoming.id
        if incoming.legacy:
            # No transaction block: if the order already belongs to a transaction, it stays there.
            target_id = self.order_index.get(order_id) or order_id
        stored = self.transactions.get(target_id)
        knowledge = join(
            stored.knowledge if stored else Knowledge(id=target_id, legacy=incoming.legacy),
            incoming,
        )

        # A payload with a block may name orders that so far stood in legacy transactions of their
        # own: fold those in, so each order lives in one transaction whatever the delivery order.
        folded: list[tuple[str, _Current]] = []
        if not incoming.legacy:
            for known_order in incoming.orders:
                other_id = self.order_index.get(known_order)
                if other_id is None or other_id == target_id:
                    continue
                if any(other_id == f for f, _ in folded):
                    continue
                other = self.transactions.get(other_id)
                if other is not None and other.knowledge.legacy:
                    knowledge = join(knowledge, other.knowledge)
                    folded.append((other_id, other))
                elif other is not None:
                    log.warning(
                        "order %s moves from transaction %s to %s: the provider changed its mind",
                        echo(known_order),
                        echo(other_id),
                        echo(target_id),
                    )

        before = stored.view if stored else None
        after = view(knowledge)
        kinds = diff_kinds(before, after)
        if folded and ChangeKind.LEGACY_MERGED not in kinds:
            kinds.append(ChangeKind.LEGACY_MERGED)
        view_json = view_to_json(after)
        self.check_limits(after, view_json)

        if not kinds:
            assert stored is not None  # a transaction not known before always changes
            grew = knowledge != stored.knowledge
            # Explained from the knowledge as it was before this join: why it changed nothing.
            reason = stale_reason(event, incoming, stored.knowledge, grew=grew)
            if grew:
                # Nothing visible changed, but keep the join complete so later merges stay
                # independent of delivery order.
                stored.knowledge, stored.knowledge_json = knowledge, None
                self.dirty.add(target_id)
            self.record(delivery, Outcome.STALE, reason, transaction_id=target_id)
            return Planned(Outcome.STALE, delivery.event_id, stored)

        diff = diff_views(before, after)
        index = len(self.plan.changes)
        self.plan.changes.append(
            ChangeWrite(
                transaction_id=target_id,
                event_id=delivery.event_id,
                order_id=order_id,
                kinds=tuple(kinds),
                view=after,
                recorded_at=self.now,
                merged=tuple((f, reported_once_kinds(t.view)) for f, t in folded),
                view_json=view_json,
                trace_id=delivery.trace_id,
                span_id=delivery.span_id,
                diff=diff,
                diff_json=diff_to_json(diff),
            )
        )
        current = _Current(
            knowledge,
            after,
            revision=stored.revision if stored else 0,
            change=index,
            view_json=view_json,
        )
        self.transactions[target_id] = current
        self.dirty.add(target_id)
        for folded_id, _ in folded:
            del self.transactions[folded_id]
            self.plan.deleted.add(folded_id)
        for known_order in incoming.orders:
            if self.order_index.get(known_order) != target_id:
                self.order_index[known_order] = target_id
                self.plan.order_index[known_order] = target_id
        if self.want_results and not after.legacy and RESULTS_KINDS.intersection(kinds):
            # In the same commit as the change, so a restart still knows to fetch them; the
            # results use case clears it once it has stored them. Legacy orders have no
            # transaction at Junction to ask about.
            self.plan.results_pending[target_id] = PendingResultsWrite(
                transaction_id=target_id,
                change=index,
                requested_revision=0,
                requested_at=self.now,
                attempts=0,
                due_at=self.now,
            )
        self.record(
            delivery,
            Outcome.APPLIED,
            applied_reason(diff, after),
            transaction_id=target_id,
            change=index,
        )
        return Planned(Outcome.APPLIED, delivery.event_id, current, change=index)

    def check_limits(self, after: TransactionView, view_json: str) -> None:
        limits = self.limits
        violations = []
        if len(after.orders) > limits.max_orders_per_transaction:
            violations.append(
                FieldViolation(
                    "data.order_transaction.orders",
                    f"the transaction would have {len(after.orders)} orders; the limit is "
                    f"{limits.max_orders_per_transaction} (max_orders_per_transaction)",
                )
            )
        size = len(view_json.encode())
        if size > limits.max_view_bytes:
            violations.append(
                FieldViolation(
                    "data",
                    f"the transaction's state would be {size} bytes; the limit is "
                    f"{limits.max_view_bytes} (max_view_bytes)",
                )
            )
        if violations:
            raise InvalidArgument(violations)

    def record(
        self,
        delivery: Delivery,
        outcome: Outcome,
        reason: str,
        *,
        transaction_id: str | None = None,
        change: int | None = None,
    ) -> None:
        event = delivery.event
        order_id = claimed = block_status = None
        provider_time = None
        if isinstance(event, OrderEvent):
            order = event.order
            order_id = order.id
            claimed, provider_time = claimed_status(event)
            if order.order_transaction is not None:
                block_status = order.order_transaction.status
        self.events[delivery.event_id] = (event.digest, order_id)
        self.plan.events.append(
            EventWrite(
                event_id=delivery.event_id,
                event_type=event.event_type,
                source=delivery.source,
                body_format=delivery.body_format,
                body=delivery.body,
                digest=event.digest,
                order_id=order_id,
                transaction_id=transaction_id,
                outcome=outcome.value,
                change=change,
                received_at=self.now,
                reason=reason,
                provider_time=provider_time,
                claimed_status=claimed or "",
                claimed_transaction_status=block_status or "",
            )
        )


def claimed_status(event: OrderEvent) -> tuple[str | None, datetime | None]:
    """The status an order event claims (its newest status event, "HIGH.METHOD.LOW" as sent)
    and the time it claims to be from (the order's `updated_at`, else that status's time)."""
    order = event.order
    newest = order.last_event
    for status in order.events or ():
        if newest is None or (status.created_at, status.id) > (newest.created_at, newest.id):
            newest = status
    at = order.updated_at or (newest.created_at if newest is not None else None)
    return (newest.status if newest is not None else None), at


def plan_batch(
    deliveries: list[Delivery],
    state: BatchState,
    now: datetime,
    limits: StateLimits | None = None,
    *,
    want_results: bool = False,
) -> tuple[BatchPlan, list[Planned | ServiceError]]:
    """Every write of the batch, and each delivery's answer (or the error refusing it).

    Deliveries are applied in order, each seeing the ones before it. A refused delivery leaves
    no trace: its checks all run before it touches the working copy. With `want_results`, a
    change that completes a transaction or corrects its results also marks its combined results
    to be fetched (`BatchPlan.results_pending`).
    """
    batch = _Batch(state, now, limits or DEFAULT_LIMITS, want_results)
    answers: list[Planned | ServiceError] = []
    for delivery in deliveries:
        try:
            answers.append(batch.add(delivery))
        except ServiceError as exc:
            answers.append(exc)
    return batch.finish(), answers


# -- rebuild ------------------------------------------------------------------------------------


class RebuildOutcome(enum.StrEnum):
    """What a rebuild did to one transaction."""

    # The view changed: a new revision and a change in the log, as for any ingested change.
    CHANGED = "changed"
    # Only the knowledge behind the view changed (nothing a caller sees); no new revision.
    KNOWLEDGE_ONLY = "knowledge_only"
    UNCHANGED = "unchanged"
    # Some of its events can no longer be replayed (bodies erased by the body retention, or a
    # body the current rules cannot read): its current state is kept as it is.
    INCOMPLETE = "incomplete"
    # It no longer exists (folded into another transaction since it was listed).
    GONE = "gone"


REBUILD_EVENT_PREFIX = "rebuild:"
# How a rebuild appears in a transaction's delivery history.
REBUILD_SOURCE = "rebuild"
REBUILD_EVENT_TYPE = "transaction.rebuilt"


def replayed_knowledge(
    transaction_id: str, legacy: bool, events: list[StoredEventBody], limits: StateLimits
) -> Knowledge | None:
    """The knowledge the current merge rule derives from a transaction's stored events, or None
    if one of them cannot be replayed (its body was erased, or does not parse any more)."""
    knowledge = Knowledge(id=transaction_id, legacy=legacy)
    for stored in events:
        if stored.body is None:
            return None
        try:
            body = decode_json_body(stored.body.decode())
            event = parse_event(body, stored.digest, limits=limits)
        except (PayloadError, UnicodeDecodeError):
            return None
        if isinstance(event, OrderEvent):
            # As ingest does: the transaction's id names the result, whichever block (or none)
            # the event carried.
            knowledge = join(knowledge, knowledge_from_event(event))
    return knowledge


def plan_rebuild(
    transaction_ids: list[str],
    state: BatchState,
    now: datetime,
    limits: StateLimits | None = None,
) -> tuple[BatchPlan, dict[str, RebuildOutcome]]:
    """Re-derive each transaction from its stored events (`state.replay_events`), replacing the
    stored knowledge rather than joining it: after a merge-rule change the stored knowledge is
    what is wrong. The change kinds come from the difference between the stored view and the
    re-derived one, exactly as for an ingested event, so watchers get ordinary changes. A
    transaction with any event that cannot be replayed keeps its state (INCOMPLETE). The
    assignment of orders to transactions is kept as stored.
    """
    limits = limits or DEFAULT_LIMITS
    plan = BatchPlan()
    outcomes: dict[str, RebuildOutcome] = {}
    event_id = REBUILD_EVENT_PREFIX + now.isoformat(timespec="seconds")
    for transaction_id in transaction_ids:
        stored = state.transactions.get(transaction_id)
        if stored is None:
            outcomes[transaction_id] = RebuildOutcome.GONE
            continue
        events = state.replay_events.get(transaction_id, [])
        knowledge = (
            replayed_knowledge(transaction_id, stored.knowledge.legacy, events, limits)
            if events
            else None
        )
        if knowledge is None:
            outcomes[transaction_id] = RebuildOutcome.INCOMPLETE
            continue
        if knowledge == stored.knowledge:
            outcomes[transaction_id] = RebuildOutcome.UNCHANGED
            continue
        after = view(knowledge)
        kinds = diff_kinds(stored.view, after)
        view_json = view_to_json(after)
        change = None
        if kinds:
            change = len(plan.changes)
            diff = diff_views(stored.view, after)
            plan.changes.append(
                ChangeWrite(
                    transaction_id=transaction_id,
                    event_id=event_id,
                    order_id=None,
                    kinds=tuple(kinds),
                    view=after,
                    recorded_at=now,
                    view_json=view_json,
                    diff=diff,
                    diff_json=diff_to_json(diff),
                )
            )
            reason = "re-derived from its stored events by a rebuild: " + applied_reason(
                diff, after
            )
        else:
            reason = (
                "re-derived from its stored events by a rebuild: what is known changed, "
                "nothing a caller sees"
            )
        # In the transaction's history, as a row of its own (an event id per transaction).
        plan.history.append(
            EventWrite(
                event_id=f"{event_id}:{transaction_id}",
                event_type=REBUILD_EVENT_TYPE,
                source=REBUILD_SOURCE,
                body_format="json",
                body=None,
                digest="",
                order_id=None,
                transaction_id=transaction_id,
                outcome=(Outcome.APPLIED if kinds else Outcome.STALE).value,
                change=change,
                received_at=now,
                reason=bounded(reason),
            )
        )
        plan.transactions[transaction_id] = TransactionWrite(
            knowledge=knowledge,
            view=after,
            change=change,
            revision=stored.revision,
            knowledge_json=knowledge_to_json(knowledge),
            view_json=view_json,
        )
        outcomes[transaction_id] = (
            RebuildOutcome.CHANGED if kinds else RebuildOutcome.KNOWLEDGE_ONLY
        )
    return plan, outcomes
