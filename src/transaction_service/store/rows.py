"""Row encodings shared by the SQL stores: the same columns mean the same thing in SQLite and
PostgreSQL."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from transaction_service.domain.diff import diff_from_json
from transaction_service.domain.state import (
    ChangeKind,
    knowledge_from_json,
    view_from_json,
)
from transaction_service.store.base import (
    BatchPlan,
    ChangeLogPage,
    ChangeRecord,
    EventWrite,
    HistoryEvent,
    ListFilter,
    PendingResults,
    StoredEventBody,
    StoredResults,
    StoredTransaction,
    TransactionSnapshot,
)


def iso(value: datetime | None) -> str | None:
    """UTC ISO 8601 with fixed width, so text order is time order."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def encode_kinds(kinds: tuple[ChangeKind, ...]) -> str:
    return ",".join(kinds)


def decode_kinds(text: str) -> tuple[ChangeKind, ...]:
    return tuple(ChangeKind(k) for k in text.split(",") if k)


def encode_merged(merged: tuple[tuple[str, frozenset[ChangeKind]], ...]) -> str | None:
    if not merged:
        return None
    return json.dumps({standin: sorted(kinds) for standin, kinds in merged})


def decode_merged(text: str | None) -> tuple[tuple[str, frozenset[ChangeKind]], ...]:
    if not text:
        return ()
    return tuple(
        (standin, frozenset(ChangeKind(k) for k in kinds))
        for standin, kinds in json.loads(text).items()
    )


def stored_transaction(
    knowledge: str | bytes, view: str | bytes, revision: int
) -> StoredTransaction:
    return StoredTransaction(knowledge_from_json(knowledge), view_from_json(view), revision)


def _time(value: str | datetime) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


def pending_results(
    transaction_id: str,
    requested_revision: int,
    requested_at: str | datetime,
    attempts: int,
    due_at: str | datetime,
    last_failure: str,
) -> PendingResults:
    return PendingResults(
        transaction_id=transaction_id,
        requested_revision=requested_revision,
        requested_at=_time(requested_at),
        attempts=attempts,
        due_at=_time(due_at),
        last_failure=last_failure,
    )


def stored_results(
    transaction_id: str,
    status: str,
    digest: str,
    body: bytes | None,
    fetched_at: str | datetime,
    revision: int,
) -> StoredResults:
    return StoredResults(
        transaction_id=transaction_id,
        status=status,
        digest=digest,
        body=bytes(body) if body is not None else None,
        fetched_at=_time(fetched_at),
        revision=revision,
    )


# What `results_row` decodes: a transaction's results (`r`) and results marker (`p`), both
# left-joined, so either may be missing.
RESULTS_ROW_COLUMNS = (
    "r.status, r.digest, r.body, r.fetched_at, r.revision,"
    " p.requested_revision, p.requested_at, p.attempts, p.due_at, p.last_failure"
)


def results_row(
    transaction_id: str, row: Sequence[Any]
) -> tuple[StoredResults | None, PendingResults | None]:
    """A row of RESULTS_ROW_COLUMNS: the stored results and the marker, each if there is one."""
    results = stored_results(transaction_id, *row[:5]) if row[0] is not None else None
    pending = pending_results(transaction_id, *row[5:]) if row[5] is not None else None
    return results, pending


def snapshot(view: str | bytes, revision: int) -> TransactionSnapshot:
    return TransactionSnapshot(revision=revision, view_json=view)


# Change rows never change, and watchers replaying the log read the same rows; decoding the
# stored view is most of the cost of a replay, so decoded changes are shared.
# The columns of an event row `plan_rows` writes, in its order.
EVENT_COLUMNS = (
    "event_id, event_type, source, body_format, body, digest, order_id, transaction_id, outcome,"
    " revision, received_at, reason, provider_time, claimed_status, claimed_transaction_status"
)
# The columns `change_record` decodes, in its order.
CHANGE_COLUMNS = (
    "revision, transaction_id, event_id, order_id, kinds, view, recorded_at, merged, trace_id,"
    " span_id, diff"
)


@functools.lru_cache(maxsize=4096)
def change_record(
    revision: int,
    transaction_id: str,
    event_id: str,
    order_id: str | None,
    kinds: str,
    view: str,
    recorded_at: str | datetime,
    merged: str | None,
    trace_id: str | None = None,
    span_id: str | None = None,
    diff: str | None = None,
) -> ChangeRecord:
    return ChangeRecord(
        revision=revision,
        transaction_id=transaction_id,
        event_id=event_id,
        order_id=order_id,
        kinds=decode_kinds(kinds),
        view=view_from_json(view),
        recorded_at=_time(recorded_at),
        merged=decode_merged(merged),
        trace_id=trace_id or "",
        span_id=span_id or "",
        diff=diff_from_json(diff) if diff else None,
    )


def change_log_page(rows: Sequence[Sequence[Any]]) -> ChangeLogPage:
    """Rows of (compacted revision, head revision, CHANGE_COLUMNS...), the change columns NULL
    on the one row that only carries the bounds when no change matched."""
    changes = [change_record(*row[2:]) for row in rows if row[2] is not None]
    return ChangeLogPage(changes=changes, compacted_revision=rows[0][0], head_revision=rows[0][1])


# The columns `history_event` decodes: an event (`e`) and its change (`c`, left-joined). The
# body's column is chosen by the caller (NULL when bodies are not asked for).
HISTORY_COLUMNS = (
    "e.seq, e.event_id, e.event_type, e.source, e.order_id, e.received_at, e.provider_time,"
    " e.claimed_status, e.claimed_transaction_status, e.outcome, e.reason, e.revision,"
    " e.duplicates, e.last_duplicate_at, e.digest, e.body IS NULL, c.kinds, c.diff"
)
# Sources of rows the service writes itself: they never had a body.
OWN_SOURCES = frozenset({"results", "rebuild"})


def history_event(row: Sequence[Any], body: bytes | None) -> HistoryEvent:
    """A row of HISTORY_COLUMNS, with the body selected beside it."""
    (
        seq,
        event_id,
        event_type,
        source,
        order_id,
        received_at,
        provider_time,
        claimed,
        block_status,
        outcome,
        reason,
        revision,
        duplicates,
        last_duplicate_at,
        digest,
        no_body,
        kinds,
        diff,
    ) = row
    return HistoryEvent(
        seq=seq,
        event_id=event_id,
        event_type=event_type,
        source=source,
        order_id=order_id,
        received_at=_time(received_at),
        provider_time=_time(provider_time) if provider_time is not None else None,
        claimed_status=claimed or "",
        claimed_transaction_status=block_status or "",
        outcome=outcome,
        reason=reason or "",
        revision=revision,
        duplicates=duplicates,
        last_duplicate_at=_time(last_duplicate_at) if last_duplicate_at is not None else None,
        digest=digest,
        body_erased=bool(no_body) and source not in OWN_SOURCES,
        body=bytes(body) if body is not None else None,
        kinds=decode_kinds(kinds) if kinds is not None else None,
        diff=diff_from_json(diff) if diff else None,
    )


def plan_rows(
    batch: BatchPlan, base: int, time: Callable[[datetime], Any]
) -> dict[str, list[tuple[Any, ...]]]:
    """The rows each statement of a plan writes, with revisions resolved from `base` and times
    encoded by `time` (ISO text for SQLite, datetimes for PostgreSQL)."""
    # Most rows of a batch carry the batch's one time (recorded, received): encoded once.
    encoded: dict[datetime, Any] = {}

    def at(value: datetime) -> Any:
        found = encoded.get(value)
        if found is None:
            found = encoded[value] = time(value)
        return found

    changes = [
        (
            base + i + 1,
            c.transaction_id,
            c.event_id,
            c.order_id,
            encode_kinds(c.kinds),
            c.view_json,
            at(c.recorded_at),
            encode_merged(c.merged),
            c.trace_id or None,
            c.span_id or None,
            c.diff_json,
        )
        for i, c in enumerate(batch.changes)
    ]
    transactions = [
        (
            transaction_id,
            base + t.change + 1 if t.change is not None else t.revision,
            t.view.status.value,
            t.view.team_id,
            t.view.user_id,
            at(t.view.updated_at) if t.view.updated_at else None,
            t.knowledge_json,
            t.view_json,
        )
        for transaction_id, t in batch.transactions.items()
    ]

    def event_row(e: EventWrite) -> tuple[Any, ...]:
        return (
            e.event_id,
            e.event_type,
            e.source,
            e.body_format,
            e.body,
            e.digest,
            e.order_id,
            e.transaction_id,
            e.outcome,
            base + e.change + 1 if e.change is not None else None,
            at(e.received_at),
            e.reason,
            at(e.provider_time) if e.provider_time is not None else None,
            e.claimed_status,
            e.claimed_transaction_status,
        )

    results = [
        (
            r.transaction_id,
            r.status,
            r.digest,
            r.body,
            at(r.fetched_at),
            base + r.change + 1,
        )
        for r in batch.results
    ]
    results_pending = [
        (
            p.transaction_id,
            base + p.change + 1 if p.change is not None else p.requested_revision,
            at(p.requested_at),
            p.attempts,
            at(p.due_at),
            p.last_failure,
        )
        for p in batch.results_pending.values()
    ]
    return {
        "results": results,
        "results_pending": results_pending,
        "results_done": [(t,) for t in sorted(batch.results_done)],
        "changes": changes,
        "transactions": transactions,
        "deleted": [(d,) for d in sorted(batch.deleted)],
        "orders": sorted(batch.order_index.items()),
        "events": [event_row(e) for e in batch.events],
        # After "events": a retry may count on a row the same batch inserts.
        "duplicates": [(d.count, at(d.seen_at), d.event_id) for d in batch.duplicates.values()],
        "history": [event_row(e) for e in batch.history],
    }


def list_condition(
    where: ListFilter,
    after_revision: int,
    time: Callable[[datetime], Any],
    placeholder: Callable[[int], str],
) -> tuple[str, list[Any]]:
    """`list_transactions`'s WHERE condition on the transactions table, and its parameters.
    `placeholder(n)` spells the n-th parameter (`?` in SQLite, `$n` in PostgreSQL); `time`
    encodes a time as in `plan_rows`. `ListFilter.matches` is the same filter in Python."""
    clauses: list[str] = []
    params: list[Any] = []

    def add(column: str, operator: str, value: Any) -> None:
        params.append(value)
        clauses.append(f"{column} {operator} {placeholder(len(params))}")

    add("revision", ">", after_revision)
    if where.status is not None:
        add("status", "=", where.status.value)
    if where.team_id:
        add("team_id", "=", where.team_id)
    if where.user_id:
        add("user_id", "=", where.user_id)
    if where.updated_since is not None:
        add("updated_at", ">=", time(where.updated_since))
    return " AND ".join(clauses), params


def replay_events_from_rows(rows: Iterable[Any]) -> dict[str, list[StoredEventBody]]:
    """The rows of the replay query (a driver's row type each) by transaction, in row order."""
    found: dict[str, list[StoredEventBody]] = {}
    for txn_id, event_id, event_type, source, body_format, body, digest, order_id in rows:
        found.setdefault(txn_id, []).append(
            StoredEventBody(
                event_id=event_id,
                event_type=event_type,
                source=source,
                body_format=body_format,
                body=bytes(body) if body is not None else None,
                digest=digest,
                order_id=order_id,
            )
        )
    return found


def many_index(
    rows: Sequence[Sequence[Any]], chunk_bytes: int | None
) -> tuple[list[list[str]], int]:
    """`Store.get_many`'s first statement, (head, kind 't' or 'o', key, transaction id, view
    size) rows: the transactions found, in chunks of about `chunk_bytes` of stored state each
    (one chunk without it), and the head revision."""
    head = rows[0][0] if rows else 0
    sizes: dict[str, int] = {}
    for _, kind, _key, txn_id, size in rows:
        if kind is not None:
            sizes[txn_id] = int(size)
    chunks: list[list[str]] = []
    total = 0
    for txn_id, size in sizes.items():
        if not chunks or (chunk_bytes is not None and total + size > chunk_bytes):
            chunks.append([])
            total = 0
        chunks[-1].append(txn_id)
        total += size
    return chunks, head


def many_found(
    rows: Sequence[Sequence[Any]], snapshots: dict[str, TransactionSnapshot], head: int
) -> tuple[dict[str, TransactionSnapshot], dict[str, TransactionSnapshot], int]:
    """`Store.get_many`'s answer: which transaction each id found (the first statement's rows),
    with the snapshots read; one snapshot object per transaction."""
    by_id: dict[str, TransactionSnapshot] = {}
    by_order: dict[str, TransactionSnapshot] = {}
    for _, kind, key, txn_id, _size in rows:
        if kind is not None and (found := snapshots.get(txn_id)) is not None:
            (by_id if kind == "t" else by_order)[key] = found
    return by_id, by_order, head
