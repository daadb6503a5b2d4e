"""What is known about an order transaction, how one more event adds to it, and what it means.

The merge rule is the heart of the service. Webhooks arrive duplicated and in any order, so the
state must be a function of the *set* of events seen. `Knowledge` is built so that adding an event
is a join: every piece of knowledge keeps the greatest observation under a total order that depends
only on content (provider times, then at the same instant how final a status is, provider event
ids, then a digest of the body as the last tie-breaker). A join is commutative, associative and
idempotent, so any delivery order, with any duplicates, ends in the same knowledge. `view()`
derives what callers see from knowledge alone, and `change_kinds()` says what a change meant.

Nothing here does I/O.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import TypeVar

import msgspec

from transaction_service.domain.payload import OrderEvent, TransactionBlock

# Sorts before every real time, so a missing time never wins.
NEVER = datetime.min.replace(tzinfo=UTC)
# Sorts after every real time: orders of unknown creation time come last.
_LAST = datetime.max.replace(tzinfo=UTC)


# Knowledge and views are frozen msgspec Structs: they are built many times per event, and a
# Struct is built in C, without validation: about 5x cheaper than a frozen dataclass (whose
# __init__ sets each field through object.__setattr__; 10% of a bulk ingest's samples went to
# those), and compared field by field in C too. msgspec (de)serialises them for the store, to the
# same JSON as the dataclasses they were (see the end of this module).


# --------------------------------------------------------------------------------------------------
# Knowledge: greatest observations, merged by join.
# --------------------------------------------------------------------------------------------------


class StatusObservation(msgspec.Struct, frozen=True, kw_only=True):
    """An order's low-level status at a time, from its own events or from a transaction block."""

    reached_at: datetime = NEVER
    # The provider's order event id; None when learned from a transaction block (which has none).
    event_id: int | None = None
    low: str
    high: str = ""
    method: str = ""

    def key(self) -> tuple[datetime, int, bool, int, str, str]:
        # At the same time the more final status wins, as between transaction blocks: an order's
        # own older event must not beat a block that already lists it at a more final status (a
        # `partial_results` and a `redraw_available` of the same instant, the latter's webhook
        # lost). At the same time and finality an order's own event beats a block entry: it also
        # knows the high level.
        return (
            self.reached_at,
            order_finality(self.low),
            self.event_id is not None,
            self.event_id or 0,
            self.low,
            self.high,
        )


# How final an order's low-level status is, for the tie-break between observations of the same
# instant. Lab work done (`redraw_available` is final for the initial order); `corrected` always
# follows `completed`; ended without lab work (`cancelled` can be reinstated, failures may be
# retried); everything else, unknown statuses included, is in progress.
_ORDER_FINALITY = {
    "completed": 2,
    "redraw_available": 2,
    "corrected": 3,
    "cancelled": 1,
    "do_not_process": 1,
    "lost": 1,
    "sample_error": 1,
    "failure_to_deliver_to_lab": 1,
    "failure_to_deliver_to_customer": 1,
}


def order_finality(low: str) -> int:
    """The tie-break rank of an order's low-level status among observations of one instant."""
    return _ORDER_FINALITY.get(low, 0)


class OrderSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """Fields that only an order's own webhook carries, from the newest such webhook."""

    updated_at: datetime = NEVER
    newest_event: tuple[datetime, int] = (NEVER, -1)
    digest: str
    origin: str = ""
    parent_id: str = ""
    user_id: str = ""
    team_id: str = ""
    created_at: datetime | None = None
    collection_method: str = ""
    sample_id: str = ""
    lab: str = ""
    lab_test_name: str = ""
    has_missing_results: bool | None = None
    interpretation: str = ""

    def key(self) -> tuple[datetime, tuple[datetime, int], str]:
        return (self.updated_at, self.newest_event, self.digest)


class ClientUserObservation(msgspec.Struct, frozen=True, kw_only=True):
    """The envelope's `client_user_id`, from the newest webhook of the order that carried one.

    Kept apart from OrderSnapshot: a newer webhook sent without its envelope must not erase it.
    """

    updated_at: datetime = NEVER
    digest: str
    client_user_id: str

    def key(self) -> tuple[datetime, str, str]:
        return (self.updated_at, self.digest, self.client_user_id)


class BlockEntry(msgspec.Struct, frozen=True, kw_only=True):
    """An order's summary inside a transaction block, from the newest block that listed it."""

    updated_at: datetime = NEVER
    status_at: datetime = NEVER
    digest: str
    origin: str = ""
    parent_id: str = ""
    created_at: datetime | None = None

    def key(self) -> tuple[datetime, datetime, str]:
        return (self.updated_at, self.status_at, self.digest)


class OrderKnowledge(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    status: StatusObservation | None = None
    # The newest status from the order's own events; gives the high level when `status` came from
    # a block entry of the same low-level status.
    own_status: StatusObservation | None = None
    snapshot: OrderSnapshot | None = None
    entry: BlockEntry | None = None
    client_user: ClientUserObservation | None = None


class BlockStatus(msgspec.Struct, frozen=True, kw_only=True):
    """The transaction status from the newest transaction block seen.

    `as_of` is the newest time the block states itself (its entries' `updated_at` and status
    times), never the carrying order's `updated_at`: a webhook can carry a block that lags behind
    the order it comes with. A block that states no time is dated NEVER, so it decides only while
    no dated block is known; between blocks of the same date the more final status wins.
    """

    as_of: datetime
    status: str
    digest: str

    def key(self) -> tuple[datetime, int, str, str]:
        return (self.as_of, _STATUS_RANK.get(self.status, 1), self.status, self.digest)


_STATUS_RANK = {"active": 0, "cancelled": 2, "completed": 3}


class Knowledge(msgspec.Struct, frozen=True, kw_only=True):
    """Everything known about one transaction."""

    id: str
    # A legacy order (payload without a transaction block) stands in its own transaction, whose id
    # is the order id, until a payload with a block moves it into a real one.
    legacy: bool = False
    orders: dict[str, OrderKnowledge] = msgspec.field(default_factory=dict)
    block: BlockStatus | None = None


_Observed = TypeVar(
    "_Observed", StatusObservation, OrderSnapshot, BlockEntry, BlockStatus, ClientUserObservation
)


def _newest(a: _Observed | None, b: _Observed | None) -> _Observed | None:
    if a is None:
        return b
    if b is None:
        return a
    return b if b.key() > a.key() else a


def join_order(a: OrderKnowledge, b: OrderKnowledge) -> OrderKnowledge:
    return OrderKnowledge(
        id=a.id,
        status=_newest(a.status, b.status),
        own_status=_newest(a.own_status, b.own_status),
        snapshot=_newest(a.snapshot, b.snapshot),
        entry=_newest(a.entry, b.entry),
        client_user=_newest(a.client_user, b.client_user),
    )


def join(a: Knowledge, b: Knowledge) -> Knowledge:
    """The least knowledge that holds both; `a.id` names the result."""
    orders = dict(a.orders)
    for order_id, order in b.orders.items():
        orders[order_id] = join_order(orders[order_id], order) if order_id in orders else order
    return Knowledge(
        id=a.id,
        legacy=a.legacy and b.legacy,
        orders=orders,
        block=_newest(a.block, b.block),
    )


def transaction_id_of(event: OrderEvent) -> tuple[str, bool]:
    """The transaction an order event belongs to, and whether it is a legacy stand-in."""
    block = event.order.order_transaction
    if block is None:
        return event.order.id, True
    return block.id, False


def knowledge_from_event(event: OrderEvent) -> Knowledge:
    """What one order event says, as knowledge of its transaction."""
    order = event.order
    txn_id, legacy = transaction_id_of(event)
    knowledge = Knowledge(
        id=txn_id,
        legacy=legacy,
        orders={order.id: _own_order_knowledge(event)},
    )
    block = order.order_transaction
    if block is not None:
        knowledge = join(knowledge, _block_knowledge(block, event.digest))
    return knowledge


def _own_order_knowledge(event: OrderEvent) -> OrderKnowledge:
    order = event.order
    events = list(order.events or [])
    if order.last_event is not None:
        events.append(order.last_event)
    observations = [_observation_from_status(e.status, e.created_at, e.id) for e in events]
    own = max(observations, key=StatusObservation.key, default=None)
    lab_test = order.lab_test
    method = (order.details.type if order.details else None) or (
        lab_test.method if lab_test else None
    )
    snapshot = OrderSnapshot(
        updated_at=order.updated_at or NEVER,
        newest_event=(own.reached_at, own.event_id or 0) if own else (NEVER, -1),
        digest=event.digest,
        origin=order.origin or "",
        user_id=order.user_id or event.user_id or "",
        team_id=order.team_id or event.team_id or "",
        created_at=order.created_at,
        collection_method=method or (own.method if own else ""),
        sample_id=order.sample_id or "",
        lab=(lab_test.lab.slug if lab_test and lab_test.lab else None) or "",
        lab_test_name=(lab_test.name if lab_test else None) or "",
        has_missing_results=order.has_missing_results,
        interpretation=order.interpretation or "",
    )
    client_user = (
        ClientUserObservation(
            updated_at=snapshot.updated_at,
            digest=event.digest,
            client_user_id=event.client_user_id,
        )
        if event.client_user_id
        else None
    )
    return OrderKnowledge(
        id=order.id, status=own, own_status=own, snapshot=snapshot, client_user=client_user
    )


def _observation_from_status(status: str, at: datetime, event_id: int) -> StatusObservation:
    # "HIGH.METHOD.LOW": split on the first two dots only; a status without dots is the low level.
    parts = status.split(".", 2)
    if len(parts) == 3:
        high, method, low = parts
    else:
        high, method, low = "", "", status
    return StatusObservation(reached_at=at, event_id=event_id, low=low, high=high, method=method)


def _block_knowledge(block: TransactionBlock, digest: str) -> Knowledge:
    orders: dict[str, OrderKnowledge] = {}
    # The block is dated by its own times only (see BlockStatus).
    as_of = NEVER
    for item in block.orders:
        low = item.status
        status_at = item.status_created_at or NEVER
        entry = BlockEntry(
            updated_at=item.updated_at or NEVER,
            status_at=status_at,
            digest=digest,
            origin=item.origin or "",
            parent_id=item.parent_id or "",
            created_at=item.created_at,
        )
        as_of = max(as_of, entry.updated_at, status_at)
        observation = StatusObservation(reached_at=status_at, low=low) if low else None
        known = OrderKnowledge(id=item.id, status=observation, entry=entry)
        orders[item.id] = join_order(orders[item.id], known) if item.id in orders else known
    newest = BlockStatus(as_of=as_of, status=block.status, digest=digest) if block.status else None
    return Knowledge(id=block.id, orders=orders, block=newest)


# --------------------------------------------------------------------------------------------------
# View: what callers see, derived from knowledge alone.
# --------------------------------------------------------------------------------------------------


class TransactionStatus(enum.StrEnum):
    ACTIVE = "active"
    COMPLETED = "completed"
    CANCELLED = "cancelled"


class OrderOrigin(enum.StrEnum):
    UNSPECIFIED = ""
    INITIAL = "initial"
    REDRAW = "redraw"
    RECREATION = "recreation"


class OrderView(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    origin: OrderOrigin = OrderOrigin.UNSPECIFIED
    low_level_status: str = ""
    high_level_status: str = ""
    collection_method: str = ""
    status_reached_at: datetime | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    sample_id: str = ""
    lab: str = ""
    lab_test_name: str = ""
    has_missing_results: bool | None = None
    interpretation: str = ""
    parent_order_id: str = ""
    seen_own_event: bool = False


class TransactionView(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    status: TransactionStatus
    provider_status: str = ""
    legacy: bool = False
    orders: list[OrderView] = msgspec.field(default_factory=list)
    initial_order_id: str = ""
    redraw_order_id: str = ""
    current_order_id: str = ""
    redraw_available: bool = False
    user_id: str = ""
    team_id: str = ""
    client_user_id: str = ""
    created_at: datetime | None = None
    updated_at: datetime | None = None


REDRAW_AVAILABLE = "redraw_available"
CANCELLED = "cancelled"
# Low-level statuses of an order whose lab work is done.
_COMPLETED_STATUSES = frozenset({"completed", "corrected"})
# High-level status of an order that ended without its lab work done.
FAILED = "failed"


# By value: a dict lookup, where calling the enum costs several times more (once per order of
# every view built).
_ORIGINS = {origin.value: origin for origin in OrderOrigin}
_STATUSES = {status.value: status for status in TransactionStatus}


def _origin(value: str) -> OrderOrigin:
    return _ORIGINS.get(value, OrderOrigin.UNSPECIFIED)


def view_order(order: OrderKnowledge) -> OrderView:
    status, own, snap, entry = order.status, order.own_status, order.snapshot, order.entry
    high = status.high if status else ""
    if status and not high and own and own.low == status.low:
        high = own.high
    times = [
        t
        for t in (
            snap.updated_at if snap else None,
            entry.updated_at if entry else None,
            status.reached_at if status else None,
        )
        if t is not None and t != NEVER
    ]
    return OrderView(
        id=order.id,
        origin=_origin((snap.origin if snap else "") or (entry.origin if entry else "")),
        low_level_status=status.low if status else "",
        high_level_status=high,
        collection_method=snap.collection_method if snap else "",
        status_reached_at=status.reached_at if status and status.reached_at != NEVER else None,
        created_at=(snap.created_at if snap else None) or (entry.created_at if entry else None),
        updated_at=max(times, default=None),
        sample_id=snap.sample_id if snap else "",
        lab=snap.lab if snap else "",
        lab_test_name=snap.lab_test_name if snap else "",
        has_missing_results=snap.has_missing_results if snap else None,
        interpretation=snap.interpretation if snap else "",
        parent_order_id=(snap.parent_id if snap else "") or (entry.parent_id if entry else ""),
        seen_own_event=snap is not None,
    )


def view(knowledge: Knowledge) -> TransactionView:
    orders = sorted(
        (view_order(o) for o in knowledge.orders.values()),
        key=lambda o: (o.created_at or _LAST, o.id),
    )

    def newest_of(origin: OrderOrigin) -> str:
        ids = [o.id for o in orders if o.origin == origin]
        return ids[-1] if ids else ""

    # Payloads may omit `origin` (older ones always do). With no order marked initial, the order
    # that opened the transaction is the oldest one of unknown origin not derived from another.
    unknown = [o for o in orders if o.origin == OrderOrigin.UNSPECIFIED]
    initial = next((o.id for o in orders if o.origin == OrderOrigin.INITIAL), "") or next(
        (o.id for o in unknown if not o.parent_order_id), ""
    )
    if not initial and knowledge.legacy:
        initial = knowledge.id
    redraw = newest_of(OrderOrigin.REDRAW)
    # An order of unknown origin derived from another is a redraw or a recreation: either way, the
    # one to follow rather than the order it replaces.
    derived = [o.id for o in unknown if o.parent_order_id and o.id != initial]
    current = redraw or newest_of(OrderOrigin.RECREATION) or (derived[-1] if derived else initial)
    if not current and orders:
        current = orders[-1].id

    block = knowledge.block
    provider_status = block.status if block is not None else ""
    # A legacy stand-in has no transaction status from the provider: its own rule decides.
    ended = None if knowledge.legacy else _ended_by_orders(orders, initial, redraw)
    if block is not None and (ended is None or block.as_of > ended[1]):
        # A status added by the provider later: the transaction is not known to be over.
        status = _STATUSES.get(block.status, TransactionStatus.ACTIVE)
    elif ended is not None:
        status = ended[0]
    else:
        status = _legacy_status(orders)

    owner = max(
        (o.snapshot for o in knowledge.orders.values() if o.snapshot is not None),
        key=OrderSnapshot.key,
        default=None,
    )
    client = max(
        (o.client_user for o in knowledge.orders.values() if o.client_user is not None),
        key=ClientUserObservation.key,
        default=None,
    )
    created = [o.created_at for o in orders if o.created_at is not None]
    updated = [o.updated_at for o in orders if o.updated_at is not None]
    if knowledge.block is not None and knowledge.block.as_of != NEVER:
        updated.append(knowledge.block.as_of)
    return TransactionView(
        id=knowledge.id,
        status=status,
        provider_status=provider_status,
        legacy=knowledge.legacy,
        orders=orders,
        initial_order_id=initial,
        redraw_order_id=redraw,
        current_order_id=current,
        redraw_available=bool(redraw)
        or any(o.low_level_status == REDRAW_AVAILABLE for o in orders),
        user_id=owner.user_id if owner else "",
        team_id=owner.team_id if owner else "",
        client_user_id=client.client_user_id if client else "",
        created_at=min(created, default=None),
        updated_at=max(updated, default=None),
    )


def _ended_by_orders(
    orders: list[OrderView], initial: str, redraw: str
) -> tuple[TransactionStatus, datetime] | None:
    """The status the provider's documented rules give from order facts alone, and since when.

    The redraw order completed, or the initial order completed with no redraw: COMPLETED. The
    initial order cancelled with no redraw, or both cancelled: CANCELLED. Only for a transaction
    whose known orders are its initial order and at most a redraw order; with any other order
    (a recreation, an order of unknown origin) the rules say nothing. A transaction block must be
    newer than the fact to overrule it, so a block that lags behind the order does not hold the
    transaction open, while a block written later (an order reinstated by support) still wins.
    """
    by_id = {o.id: o for o in orders}
    if not by_id.keys() <= {initial, redraw}:
        return None
    first, second = by_id.get(initial), by_id.get(redraw)
    if second is not None:
        if _completed(second):
            return TransactionStatus.COMPLETED, _reached(second)
        if first is not None and _cancelled(first) and _cancelled(second):
            return TransactionStatus.CANCELLED, max(_reached(first), _reached(second))
        return None
    if first is not None and _completed(first):
        return TransactionStatus.COMPLETED, _reached(first)
    if first is not None and _cancelled(first):
        return TransactionStatus.CANCELLED, _reached(first)
    return None


def _completed(order: OrderView) -> bool:
    # `corrected` follows `completed`: the order's lab work was done.
    return order.low_level_status in _COMPLETED_STATUSES


def _cancelled(order: OrderView) -> bool:
    return order.low_level_status == CANCELLED or order.high_level_status == CANCELLED


def _reached(order: OrderView) -> datetime:
    return order.status_reached_at or NEVER


def _legacy_status(orders: list[OrderView]) -> TransactionStatus:
    """The status of a transaction Junction gave no status for (a legacy stand-in, or blocks that
    never carried one): CANCELLED once every order ended without its lab work, COMPLETED once
    every order ended, else ACTIVE."""
    ends = [_legacy_end(o) for o in orders]
    if ends and all(end == TransactionStatus.CANCELLED for end in ends):
        return TransactionStatus.CANCELLED
    if ends and all(end is not None for end in ends):
        return TransactionStatus.COMPLETED
    return TransactionStatus.ACTIVE


def _legacy_end(order: OrderView) -> TransactionStatus | None:
    if _completed(order):
        return TransactionStatus.COMPLETED
    # A failed order (lost, sample error, ...) ended without its lab work done, like a cancelled
    # one: no results are coming, so it is not COMPLETED.
    if _cancelled(order) or order.high_level_status == FAILED:
        return TransactionStatus.CANCELLED
    return None


# --------------------------------------------------------------------------------------------------
# Change kinds: what a change meant, for the change log and watchers.
# --------------------------------------------------------------------------------------------------


class ChangeKind(enum.StrEnum):
    TRANSACTION_CREATED = "transaction_created"
    ORDER_ADDED = "order_added"
    ORDER_STATUS_CHANGED = "order_status_changed"
    REDRAW_AVAILABLE = "redraw_available"
    TRANSACTION_COMPLETED = "transaction_completed"
    TRANSACTION_CANCELLED = "transaction_cancelled"
    TRANSACTION_REOPENED = "transaction_reopened"
    RESULTS_CORRECTED = "results_corrected"
    # A legacy order's stand-in transaction was folded into this one.
    LEGACY_MERGED = "legacy_merged"
    # Anything else a caller can see changed (a sample id, a timestamp, an origin).
    DETAILS_CHANGED = "details_changed"
    # `current_order_id` changed on a known transaction: subscribers must follow another order.
    CURRENT_ORDER_CHANGED = "current_order_changed"
    # The transaction's combined results were fetched from Junction's API and stored. Not a
    # change of the view: `change_kinds` never reports it; the results use case does.
    RESULTS_READY = "results_ready"


CORRECTED = "corrected"


def change_kinds(before: TransactionView | None, after: TransactionView) -> list[ChangeKind]:
    """What changed from `before` to `after`; empty when nothing a caller can see did."""
    if before == after:
        return []
    kinds: list[ChangeKind] = []
    old_orders = {o.id: o for o in before.orders} if before else {}
    if before is None:
        kinds.append(ChangeKind.TRANSACTION_CREATED)
    elif set(old_orders) - {o.id for o in after.orders}:
        kinds.append(ChangeKind.LEGACY_MERGED)
    if before is not None and any(o.id not in old_orders for o in after.orders):
        kinds.append(ChangeKind.ORDER_ADDED)
    if any(
        o.id in old_orders and old_orders[o.id].low_level_status != o.low_level_status
        for o in after.orders
    ):
        kinds.append(ChangeKind.ORDER_STATUS_CHANGED)
    if any(_newly_corrected(old_orders.get(o.id), o) for o in after.orders):
        kinds.append(ChangeKind.RESULTS_CORRECTED)
    if after.redraw_available and not (before and before.redraw_available):
        kinds.append(ChangeKind.REDRAW_AVAILABLE)
    # A new transaction carries its current order; only a later switch is news. This is how a
    # subscriber told REDRAW_AVAILABLE before the redraw order was known learns which order it is.
    if before is not None and before.current_order_id != after.current_order_id:
        kinds.append(ChangeKind.CURRENT_ORDER_CHANGED)
    old_status = before.status if before else TransactionStatus.ACTIVE
    if after.status != old_status:
        kinds.append(
            {
                TransactionStatus.COMPLETED: ChangeKind.TRANSACTION_COMPLETED,
                TransactionStatus.CANCELLED: ChangeKind.TRANSACTION_CANCELLED,
                TransactionStatus.ACTIVE: ChangeKind.TRANSACTION_REOPENED,
            }[after.status]
        )
    if not kinds:
        kinds.append(ChangeKind.DETAILS_CHANGED)
    return kinds


def _newly_corrected(before: OrderView | None, after: OrderView) -> bool:
    """Whether `after` knows a correction of the order's results that `before` did not: the order
    became `corrected`, or was `corrected` again (a newer correction event, at a later time).
    Every correction changes the results, so each one is announced and the results fetched anew."""
    if after.low_level_status != CORRECTED:
        return False
    return (
        before is None
        or before.low_level_status != CORRECTED
        or before.status_reached_at != after.status_reached_at
    )


# --------------------------------------------------------------------------------------------------
# JSON, for the store.
# --------------------------------------------------------------------------------------------------

# msgspec, not pydantic: the same JSON byte for byte (old rows load unchanged, and the stored JSON
# stays readable), 3-7x faster both ways (view decode 21 -> 3 us, knowledge encode 36 -> 10 us).
_ENCODER = msgspec.json.Encoder()
_KNOWLEDGE = msgspec.json.Decoder(Knowledge)
_VIEW = msgspec.json.Decoder(TransactionView)


def knowledge_to_json(knowledge: Knowledge) -> str:
    return _ENCODER.encode(knowledge).decode()


def knowledge_from_json(text: str | bytes) -> Knowledge:
    return _KNOWLEDGE.decode(text)


def view_to_json(transaction: TransactionView) -> str:
    return _ENCODER.encode(transaction).decode()


def view_from_json(text: str | bytes) -> TransactionView:
    return _VIEW.decode(text)
