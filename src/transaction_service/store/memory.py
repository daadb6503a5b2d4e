"""An in-memory store: the contract of `store/base.py` with dictionaries, nothing durable.

It proves the interface is one (tests/test_store_contract.py runs against it, SQLite and
PostgreSQL alike) and makes use-case tests fast. Not for production: everything is gone at exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Sequence
from datetime import datetime

import msgspec

from transaction_service.domain.diff import diff_from_json
from transaction_service.domain.state import (
    TransactionStatus,
    knowledge_from_json,
    view_from_json,
    view_to_json,
)
from transaction_service.store.base import (
    Answer,
    AppliedBatch,
    BatchKeys,
    BatchState,
    ChangeLogPage,
    ChangeRecord,
    EventWrite,
    HistoryEvent,
    ListFilter,
    PendingResults,
    Planner,
    StoredEvent,
    StoredEventBody,
    StoredResults,
    StoredTransaction,
    StoreUnavailable,
    TransactionSnapshot,
)
from transaction_service.store.health import WriteHealth
from transaction_service.store.rows import OWN_SOURCES


class MemoryStore:
    def __init__(self) -> None:
        self.description = "memory"
        self.health = WriteHealth(self.description)
        self.shared = False
        # Nothing to open: usable from the start (tests write without `open`), refused once
        # closed, like the other stores.
        self._closed = False
        self._lock = asyncio.Lock()
        self.head = 0
        self.compacted = 0
        # event id -> (digest, order id, body or None)
        self.events: dict[str, tuple[str, str | None, bytes | None, datetime]] = {}
        self.transactions: dict[str, StoredTransaction] = {}
        self.order_index: dict[str, str] = {}
        self.changes: list[ChangeRecord] = []
        # Everything else stored of each event, in arrival order; `change` holds its revision.
        self.event_writes: dict[str, EventWrite] = {}
        # Retries counted on an event: (count, last seen).
        self.duplicates: dict[str, tuple[int, datetime]] = {}
        self.results: dict[str, StoredResults] = {}
        self.results_pending: dict[str, PendingResults] = {}
        self.reconcile_checks: dict[str, datetime] = {}

    async def open(self) -> None:
        self._closed = False

    async def close(self) -> None:
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable("the store is closed")

    async def probe(self) -> None:
        self.health.succeeded()

    def _snapshot(self, transaction_id: str | None) -> TransactionSnapshot | None:
        stored = self.transactions.get(transaction_id) if transaction_id else None
        return TransactionSnapshot(stored.view, stored.revision) if stored else None

    async def write(self, keys: BatchKeys, plan: Planner[Answer]) -> tuple[AppliedBatch, Answer]:
        self._check_open()
        async with self._lock:
            state = BatchState()
            for event_id in keys.event_ids:
                if event_id in self.events:
                    digest, order_id, _, _ = self.events[event_id]
                    current = self._snapshot(self.order_index.get(order_id or ""))
                    state.events[event_id] = StoredEvent(event_id, digest, order_id, current)
            for order_id in keys.order_ids:
                if order_id in self.order_index:
                    txn_id = self.order_index[order_id]
                    state.order_index[order_id] = txn_id
                    state.transactions[txn_id] = self.transactions[txn_id]
            for txn_id in keys.transaction_ids:
                if txn_id in self.transactions:
                    state.transactions[txn_id] = self.transactions[txn_id]
            if keys.replay:
                state.replay_events = self._replay_events(keys.replay)
            for txn_id in keys.results_of:
                kept = self.results.get(txn_id)
                if kept is not None and kept.body is not None:
                    state.results_kept[txn_id] = kept.digest
                if txn_id in self.results_pending:
                    state.results_pending[txn_id] = self.results_pending[txn_id]
            batch, answer = plan(state)
            # As the SQL stores: a batch without changes reads no revision.
            base = self.head if batch.changes else 0
            self.head += len(batch.changes)
            records = [c.record(base + i + 1) for i, c in enumerate(batch.changes)]
            # The log holds what a real store reads back (the diff through its JSON).
            self.changes.extend(
                msgspec.structs.replace(r, diff=diff_from_json(c.diff_json)) if c.diff_json else r
                for r, c in zip(records, batch.changes, strict=True)
            )
            for txn_id, write in batch.transactions.items():
                # Round-trip through JSON, as a real store does, so tests see what it would.
                self.transactions[txn_id] = StoredTransaction(
                    knowledge_from_json(write.knowledge_json),
                    view_from_json(write.view_json),
                    base + write.change + 1 if write.change is not None else write.revision,
                )
            for txn_id in batch.deleted:
                self.transactions.pop(txn_id, None)
            self.order_index.update(batch.order_index)
            for e in batch.events:
                self.events[e.event_id] = (e.digest, e.order_id, e.body, e.received_at)
                self.event_writes[e.event_id] = msgspec.structs.replace(
                    e, change=base + e.change + 1 if e.change is not None else None
                )
            for d in batch.duplicates.values():
                count, _ = self.duplicates.get(d.event_id, (0, d.seen_at))
                self.duplicates[d.event_id] = (count + d.count, d.seen_at)
            for e in batch.history:
                if e.event_id in self.event_writes:
                    count, _ = self.duplicates.get(e.event_id, (0, e.received_at))
                    self.duplicates[e.event_id] = (count + 1, e.received_at)
                    continue
                self.events[e.event_id] = (e.digest, e.order_id, e.body, e.received_at)
                self.event_writes[e.event_id] = msgspec.structs.replace(
                    e, change=base + e.change + 1 if e.change is not None else None
                )
            for r in batch.results:
                self.results[r.transaction_id] = StoredResults(
                    r.transaction_id, r.status, r.digest, r.body, r.fetched_at, base + r.change + 1
                )
            for txn_id in batch.results_done:
                self.results_pending.pop(txn_id, None)
            for p in batch.results_pending.values():
                revision = base + p.change + 1 if p.change is not None else p.requested_revision
                self.results_pending[p.transaction_id] = PendingResults(
                    p.transaction_id,
                    revision,
                    p.requested_at,
                    p.attempts,
                    p.due_at,
                    p.last_failure,
                )
        # Like the real stores: a write that commits is news for health (after a stall).
        self.health.succeeded()
        return AppliedBatch(batch, base, records), answer

    async def get(self, transaction_id: str) -> tuple[TransactionSnapshot | None, int]:
        self._check_open()
        return self._snapshot(transaction_id), self.head

    async def get_by_order(self, order_id: str) -> tuple[TransactionSnapshot | None, int]:
        self._check_open()
        return self._snapshot(self.order_index.get(order_id)), self.head

    async def list_transactions(
        self, where: ListFilter, after_revision: int, limit: int
    ) -> tuple[list[TransactionSnapshot], int]:
        self._check_open()
        found = [
            TransactionSnapshot(t.view, t.revision)
            for t in self.transactions.values()
            if t.revision > after_revision and where.matches(t.view)
        ]
        found.sort(key=lambda s: s.revision)
        return found[:limit], self.head

    async def head_revision(self) -> int:
        self._check_open()
        return self.head

    async def get_many(
        self,
        transaction_ids: Sequence[str],
        order_ids: Sequence[str],
        *,
        chunk_bytes: int | None = None,
        on_chunk: Callable[[Sequence[TransactionSnapshot]], None] | None = None,
    ) -> tuple[dict[str, TransactionSnapshot], dict[str, TransactionSnapshot], int]:
        self._check_open()
        found: dict[str, TransactionSnapshot] = {}
        for txn_id in [*transaction_ids, *(self.order_index.get(o) for o in order_ids)]:
            one = self._snapshot(txn_id) if txn_id not in found else None
            if txn_id is not None and one is not None:
                found[txn_id] = one
        if on_chunk is not None:
            chunk: list[TransactionSnapshot] = []
            size = 0
            for one in found.values():
                view_bytes = len(view_to_json(one.view).encode())
                if chunk and chunk_bytes is not None and size + view_bytes > chunk_bytes:
                    on_chunk(chunk)
                    chunk, size = [], 0
                chunk.append(one)
                size += view_bytes
            if chunk:
                on_chunk(chunk)
        by_id = {t: found[t] for t in transaction_ids if t in found}
        by_order = {o: found[t] for o in order_ids if (t := self.order_index.get(o)) in found}
        return by_id, by_order, self.head

    async def transaction_ids(self, after_id: str, limit: int) -> list[str]:
        self._check_open()
        return sorted(t for t in self.transactions if t > after_id)[:limit]

    async def count_transactions(self) -> int:
        self._check_open()
        return len(self.transactions)

    async def replay_events(
        self, transaction_ids: Sequence[str]
    ) -> dict[str, list[StoredEventBody]]:
        self._check_open()
        return self._replay_events(transaction_ids)

    def _replay_events(self, transaction_ids: Iterable[str]) -> dict[str, list[StoredEventBody]]:
        wanted = set(transaction_ids)
        found: dict[str, list[StoredEventBody]] = {}
        # Dicts keep insertion order: the events in arrival order.
        for event_id, (digest, order_id, body, _) in self.events.items():
            txn_id = self.order_index.get(order_id) if order_id else None
            if txn_id not in wanted:
                continue
            written = self.event_writes[event_id]
            found.setdefault(txn_id, []).append(
                StoredEventBody(
                    event_id=event_id,
                    event_type=written.event_type,
                    source=written.source,
                    body_format=written.body_format,
                    body=body,
                    digest=digest,
                    order_id=order_id,
                )
            )
        return found

    async def changes_after(
        self, after_revision: int, limit: int, transaction_ids: Sequence[str] = ()
    ) -> ChangeLogPage:
        self._check_open()
        wanted = set(transaction_ids)
        found = [
            c
            for c in self.changes
            if c.revision > after_revision and (not wanted or c.transaction_id in wanted)
        ]
        return ChangeLogPage(found[:limit], self.compacted, self.head)

    async def changes_through(
        self, revision: int, limit: int, transaction_ids: Sequence[str]
    ) -> ChangeLogPage:
        self._check_open()
        wanted = set(transaction_ids)
        found = [
            c
            for c in reversed(self.changes)
            if c.revision <= revision and c.transaction_id in wanted
        ]
        return ChangeLogPage(found[:limit], self.compacted, self.head)

    async def transaction_events(
        self, transaction_id: str, after_seq: int, limit: int, *, bodies: bool
    ) -> Sequence[HistoryEvent]:
        self._check_open()
        changes = {c.revision: c for c in self.changes}
        found: list[HistoryEvent] = []
        for seq, (event_id, e) in enumerate(self.event_writes.items(), start=1):
            if seq <= after_seq:
                continue
            if e.order_id is not None:
                if self.order_index.get(e.order_id) != transaction_id:
                    continue
            elif e.transaction_id != transaction_id:
                continue
            _, _, body, _ = self.events[event_id]
            count, last = self.duplicates.get(event_id, (0, None))
            change = changes.get(e.change) if e.change is not None else None
            found.append(
                HistoryEvent(
                    seq=seq,
                    event_id=event_id,
                    event_type=e.event_type,
                    source=e.source,
                    order_id=e.order_id,
                    received_at=e.received_at,
                    provider_time=e.provider_time,
                    claimed_status=e.claimed_status,
                    claimed_transaction_status=e.claimed_transaction_status,
                    outcome=e.outcome,
                    reason=e.reason,
                    revision=e.change,
                    duplicates=count,
                    last_duplicate_at=last,
                    digest=e.digest,
                    body_erased=body is None and e.source not in OWN_SOURCES,
                    body=body if bodies else None,
                    kinds=change.kinds if change else None,
                    diff=change.diff if change else None,
                )
            )
            if len(found) == limit:
                break
        return found

    async def trim_changes(self, recorded_before: datetime) -> int:
        self._check_open()
        through = max(
            (c.revision for c in self.changes if c.recorded_at < recorded_before), default=0
        )
        self.changes = [c for c in self.changes if c.revision > through]
        self.compacted = self.changes[0].revision - 1 if self.changes else self.head
        return self.compacted

    async def erase_bodies(self, received_before: datetime) -> int:
        self._check_open()
        erased = 0
        for event_id, (digest, order_id, body, received_at) in self.events.items():
            if body is not None and received_at < received_before:
                self.events[event_id] = (digest, order_id, None, received_at)
                erased += 1
        return erased

    async def change_notifications(self) -> AsyncGenerator[None]:
        await asyncio.Event().wait()
        yield

    async def get_results(
        self, transaction_id: str
    ) -> tuple[StoredResults | None, PendingResults | None]:
        self._check_open()
        return self.results.get(transaction_id), self.results_pending.get(transaction_id)

    async def results_due(self, now: datetime, limit: int) -> list[PendingResults]:
        self._check_open()
        due = sorted(
            (p for p in self.results_pending.values() if p.due_at <= now), key=lambda p: p.due_at
        )
        return due[:limit]

    async def erase_results(self, fetched_before: datetime) -> int:
        self._check_open()
        erased = 0
        for txn_id, stored in self.results.items():
            if stored.body is not None and stored.fetched_at < fetched_before:
                self.results[txn_id] = dataclasses.replace(stored, body=None)
                erased += 1
        return erased

    async def reconcile_candidates(self, silent_before: datetime, limit: int) -> list[str]:
        self._check_open()

        def silent(txn_id: str, stored: StoredTransaction) -> bool:
            updated = stored.view.updated_at
            checked = self.reconcile_checks.get(txn_id)
            return (
                stored.view.status == TransactionStatus.ACTIVE
                and (updated is None or updated < silent_before)
                and (checked is None or checked < silent_before)
            )

        found = [(t.view.updated_at, i) for i, t in self.transactions.items() if silent(i, t)]
        found.sort(key=lambda pair: (pair[0] is not None, pair[0] or silent_before, pair[1]))
        return [txn_id for _, txn_id in found[:limit]]

    async def record_reconcile_checks(
        self, transaction_ids: Sequence[str], checked_at: datetime
    ) -> None:
        self._check_open()
        for txn_id in transaction_ids:
            self.reconcile_checks[txn_id] = checked_at

    @contextlib.asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[bool]:
        self._check_open()
        yield True
