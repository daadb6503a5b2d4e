"""Why a delivery did what it did, in words an engineer can act on, decided when the delivery is
planned from the knowledge the plan had then (never reconstructed later, when that knowledge has
moved on).

A stale delivery is explained by what made the join change nothing visible: an older status than
the one known ("older than order 2f1c0a9e…'s `completed` at 2026-03-12T10:42:07Z"), a body
already taken in under another id, a transaction block older than the one known. An applied one
by what it changed. Every reason is cut to `MAX_REASON_LENGTH` characters.

Nothing here does I/O.
"""

from __future__ import annotations

from datetime import UTC, datetime

from transaction_service.domain.diff import ViewDiff
from transaction_service.domain.payload import OrderEvent
from transaction_service.domain.state import (
    NEVER,
    Knowledge,
    OrderKnowledge,
    StatusObservation,
    TransactionView,
    order_finality,
)

MAX_REASON_LENGTH = 300
# Ids in reasons are cut to this many characters (the history names the order in full).
_SHORT_ID = 8


def bounded(text: str) -> str:
    return text if len(text) <= MAX_REASON_LENGTH else text[: MAX_REASON_LENGTH - 1] + "…"


def short(identifier: str) -> str:
    return identifier if len(identifier) <= _SHORT_ID + 4 else identifier[:_SHORT_ID] + "…"


def when(moment: datetime | None) -> str:
    """A provider time as ISO 8601 UTC, to the second unless it has a fraction."""
    if moment is None or moment == NEVER:
        return "an unknown time"
    moment = moment.astimezone(UTC)
    spec = "seconds" if not moment.microsecond else "milliseconds"
    return moment.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


def _status(order_id: str, status: StatusObservation) -> str:
    source = "" if status.event_id is not None else " (from a transaction block)"
    return f"order {short(order_id)}'s `{status.low}` at {when(status.reached_at)}{source}"


def ignored_reason(event_type: str) -> str:
    return bounded(f"`{event_type}` events do not change order state")


def stale_reason(event: OrderEvent, incoming: Knowledge, known: Knowledge, *, grew: bool) -> str:
    """Why `event` (whose knowledge is `incoming`) changed nothing a caller sees of a transaction
    that knew `known` (before the event's join). `grew`: the join kept something new anyway."""
    order_id = event.order.id
    mine = incoming.orders.get(order_id) or OrderKnowledge(id=order_id)
    theirs = known.orders.get(order_id) or OrderKnowledge(id=order_id)
    parts: list[str] = []
    if mine.snapshot and theirs.snapshot and mine.snapshot.digest == theirs.snapshot.digest:
        # The newest update known of the order came in a body identical to this one.
        parts.append("a re-send: the same body was taken in before, under another event id")
        if theirs.status is not None:
            parts.append(f"the newest known is {_status(order_id, theirs.status)}")
        return bounded("; ".join(parts))
    new, current = mine.own_status, theirs.status
    if new is not None and current is not None and new.key() < current.key():
        # The usual case, and the whole story: a late delivery of an old update.
        if new.reached_at == current.reached_at and order_finality(new.low) < order_finality(
            current.low
        ):
            parts.append(f"of the same instant as the more final {_status(order_id, current)}")
        else:
            parts.append(f"older than {_status(order_id, current)}")
        if grew:
            parts.append("what else it adds is kept for later merges but shows nowhere")
        return bounded("; ".join(parts))
    if new is None:
        parts.append("it carries no status event")
    elif current is None or new.key() > current.key():
        parts.append(f"its `{new.low}` at {when(new.reached_at)} adds nothing a caller sees")
    else:
        parts.append(f"{_status(order_id, current)} is already known")
    if (
        mine.snapshot is not None
        and theirs.snapshot is not None
        and mine.snapshot.key() < theirs.snapshot.key()
        and mine.snapshot.updated_at != theirs.snapshot.updated_at
    ):
        parts.append(
            f"its update at {when(mine.snapshot.updated_at)} is older than the one known, "
            f"at {when(theirs.snapshot.updated_at)}"
        )
    block, newest = incoming.block, known.block
    if (
        block is not None
        and newest is not None
        and block.key() < newest.key()
        and block.status != newest.status
    ):
        parts.append(
            f"its transaction block (`{block.status}` as of {when(block.as_of)}) is older "
            f"than the one known (`{newest.status}` as of {when(newest.as_of)})"
        )
    if grew:
        parts.append("what it adds is kept for later merges but shows nowhere")
    return bounded("; ".join(parts))


def applied_reason(diff: ViewDiff, after: TransactionView) -> str:
    """What an applied change changed, from its diff."""
    orders = {o.id: o for o in after.orders}
    parts: list[str] = []
    if diff.created:
        parts.append(f"new transaction {short(after.id)}")
    for order in diff.orders:
        now = orders.get(order.id)
        if order.added and now is not None:
            origin = f" ({now.origin.value})" if now.origin.value else ""
            status = f" `{now.low_level_status}`" if now.low_level_status else ""
            parts.append(f"order {short(order.id)}{origin}{status} added")
        elif order.removed:
            parts.append(f"order {short(order.id)} moved out")
        elif now is not None and (previous := diff.order_before(order.id)) is not None:
            others = ", ".join(f for f in order.fields if f not in _FOLLOWS_STATUS)
            if "low_level_status" in order.fields:
                also = f" (and {others})" if others else ""
                parts.append(
                    f"order {short(order.id)} `{previous.low_level_status or '?'}` → "
                    f"`{now.low_level_status}`{also}"
                )
            elif "status_reached_at" in order.fields and now.low_level_status:
                # The same status reached again by a newer event (a second correction).
                also = f" (and {others})" if others else ""
                parts.append(
                    f"order {short(order.id)} `{now.low_level_status}` again at "
                    f"{when(now.status_reached_at)}{also}"
                )
            elif others:
                parts.append(f"order {short(order.id)}: {others}")
    before = diff.before
    if before is not None:
        if "status" in diff.fields:
            parts.append(
                f"transaction {before.status.value.upper()} → {after.status.value.upper()}"
            )
        if "current_order_id" in diff.fields:
            parts.append(f"current order → {short(after.current_order_id) or 'none'}")
        if "redraw_available" in diff.fields and after.redraw_available:
            parts.append("redraw available")
        rest = [f for f in diff.fields if f not in _TOLD_APART]
        if rest:
            parts.append(f"changed: {', '.join(rest)}")
    return bounded("; ".join(parts) or "nothing a caller sees changed")


# Fields that move with the status and are not worth naming again.
_FOLLOWS_STATUS = frozenset(
    {"low_level_status", "high_level_status", "status_reached_at", "updated_at"}
)
_TOLD_APART = frozenset(
    {"status", "current_order_id", "redraw_available", "orders", "updated_at", "redraw_order_id"}
)
