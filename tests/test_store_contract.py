"""The store contract (`store/base.py`), role by role, against the in-memory, SQLite and
PostgreSQL stores alike: each test runs on all three and expects the same answers.

Plans are written by hand here (not by the planner), so each test says exactly what is stored and
checks only what the store does with it: revisions, what a batch loads for its planner, reads and
their head revision, the change log and its compaction, erasure, results markers, reconcile
candidates and job locks.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tests.conftest import database
from transaction_service.domain.state import (
    ChangeKind,
    Knowledge,
    OrderView,
    TransactionStatus,
    TransactionView,
    knowledge_to_json,
    view_to_json,
)
from transaction_service.store.base import (
    AppliedBatch,
    BatchKeys,
    BatchPlan,
    BatchState,
    ChangeWrite,
    DuplicateWrite,
    EventWrite,
    ListFilter,
    PendingResults,
    PendingResultsWrite,
    ResultsWrite,
    Store,
    StoreUnavailable,
    TransactionSnapshot,
    TransactionWrite,
)
from transaction_service.store.memory import MemoryStore
from transaction_service.store.postgres import PostgresStore
from transaction_service.store.sqlite import SqliteStore

T0 = datetime(2026, 11, 1, 12, tzinfo=UTC)
MINUTE = timedelta(minutes=1)
HOUR = timedelta(hours=1)
ACTIVE, COMPLETED, CANCELLED = (
    TransactionStatus.ACTIVE,
    TransactionStatus.COMPLETED,
    TransactionStatus.CANCELLED,
)
NO_KEYS = BatchKeys(frozenset(), frozenset(), frozenset())
# Generous: a deadline for a call that must answer, never a measure of speed.
DEADLINE = 30


@contextmanager
def _database(kind: str, tmp_path: Path) -> Iterator[str]:
    if kind == "memory":
        yield ""
    else:
        with database(kind, tmp_path) as db:
            yield db


def _new_store(kind: str, db: str) -> Store:
    if kind == "memory":
        return MemoryStore()
    if kind == "postgres":
        return PostgresStore(db, pool_size=4)
    return SqliteStore(db, synchronous="NORMAL")


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    with _database(request.param, tmp_path) as db:
        opened = _new_store(request.param, db)
        await opened.open()
        try:
            yield opened
        finally:
            await opened.close()


# -- writing by hand ------------------------------------------------------------------------------


def view(
    txn_id: str,
    *orders: str,
    status: TransactionStatus = ACTIVE,
    team_id: str = "",
    user_id: str = "",
    updated_at: datetime | None = None,
) -> TransactionView:
    return TransactionView(
        id=txn_id,
        status=status,
        orders=[OrderView(id=o) for o in orders],
        team_id=team_id,
        user_id=user_id,
        updated_at=updated_at,
    )


def digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


class Plan:
    """A hand-written batch: each `change` writes a transaction, its change and the event that
    made it."""

    def __init__(self, at: datetime = T0) -> None:
        self.plan = BatchPlan()
        self.at = at

    def change(
        self,
        txn: TransactionView,
        event_id: str,
        *,
        order_id: str | None = None,
        kinds: tuple[ChangeKind, ...] = (ChangeKind.DETAILS_CHANGED,),
        merged: tuple[tuple[str, frozenset[ChangeKind]], ...] = (),
        recorded_at: datetime | None = None,
        received_at: datetime | None = None,
        body: bytes | None = None,
    ) -> int:
        index = len(self.plan.changes)
        view_json = view_to_json(txn)
        knowledge = Knowledge(id=txn.id)
        self.plan.changes.append(
            ChangeWrite(
                transaction_id=txn.id,
                event_id=event_id,
                order_id=order_id,
                kinds=kinds,
                view=txn,
                recorded_at=recorded_at or self.at,
                merged=merged,
                view_json=view_json,
            )
        )
        self.plan.transactions[txn.id] = TransactionWrite(
            knowledge=knowledge,
            view=txn,
            change=index,
            revision=0,
            knowledge_json=knowledge_to_json(knowledge),
            view_json=view_json,
        )
        for order in txn.orders:
            self.plan.order_index[order.id] = txn.id
        self.event(event_id, order_id, txn.id, index, received_at=received_at, body=body)
        return index

    def event(
        self,
        event_id: str,
        order_id: str | None,
        txn_id: str | None,
        change: int | None,
        *,
        received_at: datetime | None = None,
        body: bytes | None = None,
    ) -> None:
        body = body if body is not None else f'{{"id": "{event_id}"}}'.encode()
        self.plan.events.append(
            EventWrite(
                event_id=event_id,
                event_type="labtest.order.updated",
                source="webhook",
                body_format="json",
                body=body,
                digest=digest(body),
                order_id=order_id,
                transaction_id=txn_id,
                outcome="applied" if change is not None else "duplicate",
                change=change,
                received_at=received_at or self.at,
            )
        )

    def results(
        self, txn_id: str, change: int, *, status: str = "final", at: datetime = T0
    ) -> None:
        body = f'{{"results": "{txn_id}"}}'.encode()
        self.plan.results.append(
            ResultsWrite(txn_id, status, digest(body), body, fetched_at=at, change=change)
        )

    def marker(
        self,
        txn_id: str,
        *,
        change: int | None = None,
        requested_revision: int = 0,
        due_at: datetime = T0,
        attempts: int = 0,
        last_failure: str = "",
    ) -> None:
        self.plan.results_pending[txn_id] = PendingResultsWrite(
            transaction_id=txn_id,
            change=change,
            requested_revision=requested_revision,
            requested_at=T0,
            attempts=attempts,
            due_at=due_at,
            last_failure=last_failure,
        )


async def commit(
    store: Store, plan: Plan, keys: BatchKeys = NO_KEYS
) -> tuple[AppliedBatch, list[BatchState]]:
    """Write the plan; the batch, and each state the store handed the planner."""
    seen: list[BatchState] = []

    def planner(state: BatchState) -> tuple[BatchPlan, None]:
        seen.append(state)
        return plan.plan, None

    applied, _ = await store.write(keys, planner)
    return applied, seen


async def put(store: Store, *txns: TransactionView, at: datetime = T0) -> AppliedBatch:
    """One batch changing each transaction once (event `e-<id>-<revision>`-like ids)."""
    plan = Plan(at)
    head = await store.head_revision()
    for i, txn in enumerate(txns):
        plan.change(
            txn, f"e-{txn.id}-{head + i + 1}", order_id=txn.orders[0].id if txn.orders else None
        )
    applied, _ = await commit(store, plan)
    return applied


def keys(
    events: tuple[str, ...] = (),
    orders: tuple[str, ...] = (),
    txns: tuple[str, ...] = (),
    *,
    replay: tuple[str, ...] = (),
    results_of: tuple[str, ...] = (),
) -> BatchKeys:
    return BatchKeys(
        frozenset(events),
        frozenset(orders),
        frozenset(txns) | frozenset(replay) | frozenset(results_of),
        replay=frozenset(replay),
        results_of=frozenset(results_of),
    )


def ids_of(found: list[Any]) -> list[str]:
    return [s.view.id for s in found]


# -- an empty store -------------------------------------------------------------------------------


async def test_an_empty_store_answers_every_read_with_nothing_at_revision_zero(
    store: Store,
) -> None:
    assert await store.get("t") == (None, 0)
    assert await store.get_by_order("o") == (None, 0)
    assert await store.list_transactions(ListFilter(), 0, 10) == ([], 0)
    assert await store.get_many(["t"], ["o"]) == ({}, {}, 0)
    assert await store.transaction_ids("", 10) == []
    assert await store.count_transactions() == 0
    assert await store.replay_events(["t"]) == {}
    assert await store.head_revision() == 0
    page = await store.changes_after(0, 10)
    assert (page.changes, page.compacted_revision, page.head_revision) == ([], 0, 0)
    assert await store.get_results("t") == (None, None)
    assert await store.results_due(T0 + HOUR, 10) == []
    assert await store.reconcile_candidates(T0, 10) == []
    assert await store.trim_changes(T0 + HOUR) == 0
    assert await store.erase_bodies(T0 + HOUR) == 0
    assert await store.erase_results(T0 + HOUR) == 0
    assert store.description
    assert store.health.healthy


# -- BatchWriter ----------------------------------------------------------------------------------


async def test_revisions_are_contiguous_in_commit_order_and_a_batch_without_changes_takes_none(
    store: Store,
) -> None:
    first = await put(store, view("t1", "o1"), view("t2", "o2"))
    assert first.base_revision == 0
    assert [c.revision for c in first.changes] == [1, 2]
    assert [c.transaction_id for c in first.changes] == ["t1", "t2"]
    assert first.revision_of(1) == 2
    assert first.revision_of(None, otherwise=7) == 7

    nothing, _ = await commit(store, Plan())
    assert (nothing.base_revision, nothing.changes) == (0, [])
    assert await store.head_revision() == 2

    third = await put(store, view("t3"), view("t1", "o1", status=COMPLETED))
    assert third.base_revision == 2
    assert [c.revision for c in third.changes] == [3, 4]
    assert await store.head_revision() == 4
    t1, head = await store.get("t1")
    assert t1 is not None
    assert (t1.revision, t1.view.status, head) == (4, COMPLETED, 4)


async def test_write_returns_the_planners_answer_and_a_failing_planner_writes_nothing(
    store: Store,
) -> None:
    plan = Plan()
    plan.change(view("t1", "o1"), "e1", order_id="o1")
    applied, answer = await store.write(NO_KEYS, lambda state: (plan.plan, "the answer"))
    assert (answer, applied.plan) == ("the answer", plan.plan)

    class PlannerBug(Exception):
        pass

    def broken(state: BatchState) -> tuple[BatchPlan, None]:
        raise PlannerBug

    with pytest.raises(PlannerBug):
        await store.write(keys(("e2",), ("o2",)), broken)
    assert await store.head_revision() == 1
    assert await store.count_transactions() == 1
    assert store.health.healthy


async def test_the_planner_sees_what_the_keys_name_as_stored(store: Store) -> None:
    plan = Plan()
    first = plan.change(view("t1", "o1", "o2"), "e1", order_id="o1")
    plan.change(view("t2", "o3"), "e2", order_id="o3")
    plan.event("e3", None, None, None)  # an event of no order
    plan.results("t1", first)
    plan.marker("t1", change=first, due_at=T0 + HOUR, attempts=2, last_failure="503")
    await commit(store, plan)

    # o2's transaction is loaded through the order index, though the keys do not name t1.
    _, (state,) = await commit(
        store,
        Plan(),
        keys(("e1", "e3", "e-unknown"), ("o2", "o-unknown"), ("t2", "t-unknown")),
    )
    assert set(state.events) == {"e1", "e3"}
    e1 = state.events["e1"]
    assert (e1.event_id, e1.order_id, e1.digest) == ("e1", "o1", digest(b'{"id": "e1"}'))
    assert e1.current is not None
    assert (e1.current.revision, e1.current.view) == (1, view("t1", "o1", "o2"))
    assert (state.events["e3"].order_id, state.events["e3"].current) == (None, None)
    assert state.order_index == {"o2": "t1"}
    assert state.transaction_ids_needed() == {"t1"}
    assert set(state.transactions) == {"t1", "t2"}
    assert state.transactions["t2"].view == view("t2", "o3")
    assert state.transactions["t2"].revision == 2
    assert state.transactions["t2"].knowledge == Knowledge(id="t2")
    # Nothing of replays and results unless asked for.
    assert (state.replay_events, state.results_kept, state.results_pending) == ({}, {}, {})

    _, (state,) = await commit(store, Plan(), keys(replay=("t1",), results_of=("t1", "t2")))
    assert [e.event_id for e in state.replay_events["t1"]] == ["e1"]
    assert list(state.replay_events) == ["t1"]
    assert list(state.results_kept) == ["t1"]
    assert state.results_pending == {
        "t1": PendingResults("t1", 1, T0, attempts=2, due_at=T0 + HOUR, last_failure="503")
    }


async def test_knowledge_alone_keeps_the_revision_and_a_folded_stand_in_is_gone(
    store: Store,
) -> None:
    await put(store, view("o9", "o9"), view("t1", "o1"))  # o9: a legacy order's stand-in
    plan = Plan()
    # Only the knowledge grew: no change, the revision stays.
    knowledge = Knowledge(id="t1", legacy=False)
    plan.plan.transactions["t1"] = TransactionWrite(
        knowledge=knowledge,
        view=view("t1", "o1"),
        change=None,
        revision=2,
        knowledge_json=knowledge_to_json(knowledge),
        view_json=view_to_json(view("t1", "o1")),
    )
    plan.plan.deleted.add("o9")
    plan.change(
        view("t2", "o2", "o9"),
        "e-fold",
        order_id="o9",
        kinds=(ChangeKind.LEGACY_MERGED,),
        merged=(("o9", frozenset({ChangeKind.TRANSACTION_CREATED})),),
    )
    applied, _ = await commit(store, plan)
    assert [c.revision for c in applied.changes] == [3]
    assert (await store.get("o9"))[0] is None
    by_order, head = await store.get_by_order("o9")
    assert by_order is not None
    assert (by_order.view.id, by_order.revision, head) == ("t2", 3, 3)
    t1, _ = await store.get("t1")
    assert t1 is not None
    assert t1.revision == 2
    assert await store.transaction_ids("", 10) == ["t1", "t2"]


async def test_reads_made_before_a_write_never_hide_it(store: Store) -> None:
    """Whatever a store keeps of what it read (SQLite keeps the latest states read,
    store/latest.py) is forgotten by the writes that change it: a change, a fold, an order that
    moves to another transaction."""
    await put(store, view("o9", "o9"), view("t1", "o1"), view("t5", "o5", "o6"))
    for _ in range(2):  # read twice: the second may be answered from what the first kept
        assert (await store.get("t1"))[0] is not None
        assert (await store.get("o9"))[0] is not None
        assert (await store.get_by_order("o9"))[0] is not None
        assert (await store.get_by_order("o5"))[0] is not None
    plan = Plan()
    plan.plan.deleted.add("o9")
    plan.change(
        view("t2", "o2", "o9", "o5"),
        "e-fold",
        order_id="o9",
        kinds=(ChangeKind.LEGACY_MERGED,),
        merged=(("o9", frozenset({ChangeKind.TRANSACTION_CREATED})),),
    )
    plan.change(view("t1", "o1", status=COMPLETED), "e-done", order_id="o1")
    plan.change(view("t5", "o6"), "e-moved", order_id="o6")  # o5 went to t2; t5 stays
    await commit(store, plan)
    assert await store.get("o9") == (None, 6)
    t5, head = await store.get("t5")  # kept again, perhaps, before o5 is asked for
    assert t5 is not None
    assert (t5.view, t5.revision, head) == (view("t5", "o6"), 6, 6)
    for order_id in ("o9", "o5"):
        by_order, head = await store.get_by_order(order_id)
        assert by_order is not None
        assert (by_order.view.id, by_order.revision, head) == ("t2", 4, 6)
    t1, head = await store.get("t1")
    assert t1 is not None
    assert (t1.view.status, t1.revision, head) == (COMPLETED, 5, 6)
    # And read again, now perhaps from what these reads kept.
    assert (await store.get("t1"))[0] == t1
    assert (await store.get_by_order("o5"))[0] == (await store.get("t2"))[0]


def _commit_then(conn: Any, after_commit: Callable[[], Awaitable[None]]) -> Callable[..., Any]:
    """Wrap an aiosqlite connection's `execute` so that `after_commit` runs once SQLite has
    committed, before the store learns that it did."""
    execute = conn.execute

    async def wrapped(sql: str, *args: Any) -> Any:
        result = await execute(sql, *args)
        if sql == "COMMIT":
            await after_commit()
        return result

    return wrapped


async def test_sqlite_reads_between_a_commit_and_its_acknowledgement_pair_a_state_with_its_head(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite has committed; the store has not yet learnt it. Reads then answer what SQLite
    holds, the new states with their head, never a kept state from before (which, after a read
    that saw the commit, would take the caller back in time), and nothing read in that window
    is kept past it."""
    store = SqliteStore(tmp_path / "t.db", synchronous="NORMAL")
    await store.open()
    try:
        await put(store, view("t1", "o1"), view("t2", "o2"))
        assert (await store.get("t1"))[0] is not None  # kept
        seen: list[tuple[str, int, int]] = []

        async def read_all() -> None:
            for _ in range(2):
                for found, head in (
                    await store.get("t1"),
                    await store.get("t2"),
                    await store.get_by_order("o2"),
                ):
                    assert found is not None
                    seen.append((found.view.id, found.revision, head))

        assert store._writer is not None
        monkeypatch.setattr(store._writer, "execute", _commit_then(store._writer, read_all))
        await put(store, view("t1", "o1", status=COMPLETED), view("t2", "o2", status=COMPLETED))
        monkeypatch.undo()
        assert seen == [("t1", 3, 4), ("t2", 4, 4), ("t2", 4, 4)] * 2
        # Once the write returned, every read answers its states.
        assert [(s.view.id, s.revision, h) for s, h in [await store.get("t1")] if s] == [
            ("t1", 3, 4)
        ]
        assert [(s.view.id, s.revision, h) for s, h in [await store.get("t2")] if s] == [
            ("t2", 4, 4)
        ]
        assert [(s.view.id, s.revision, h) for s, h in [await store.get_by_order("o2")] if s] == [
            ("t2", 4, 4)
        ]
    finally:
        await store.close()


async def test_sqlite_a_commit_whose_outcome_is_unknown_leaves_no_stale_state_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """COMMIT reported an I/O error, yet the rows are in the file (what `fsync` failing after
    the WAL's write can leave): the write is refused, and reads answer what the file holds,
    not what was kept from before."""
    import sqlite3

    store = SqliteStore(tmp_path / "t.db", synchronous="NORMAL")
    await store.open()
    try:
        await put(store, view("t1", "o1"))
        for _ in range(2):
            assert (await store.get("t1"))[0] is not None
            assert (await store.get_by_order("o1"))[0] is not None

        async def fail() -> None:
            raise sqlite3.OperationalError("disk I/O error")

        assert store._writer is not None
        monkeypatch.setattr(store._writer, "execute", _commit_then(store._writer, fail))
        with pytest.raises(StoreUnavailable):
            await put(store, view("t1", "o1", status=CANCELLED))
        monkeypatch.undo()
        for found, head in (await store.get("t1"), await store.get_by_order("o1")):
            assert found is not None
            assert (found.view.status, found.revision, head) == (CANCELLED, 2, 2)
    finally:
        await store.close()


@pytest.mark.parametrize("cancels", ["once", "twice"])
async def test_sqlite_a_write_cancelled_before_its_commit_ran_leaves_no_stale_state_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cancels: str
) -> None:
    """A write is cancelled while its COMMIT still waits for, or runs on, aiosqlite's thread,
    and leaves the write lock before that COMMIT ends: once, when SQLite already says "no
    transaction" (it does so as its COMMIT begins, before the commit is written), or twice (the
    second cancel stops the wait for the ROLLBACK queued behind the COMMIT). Reads made before
    the COMMIT ends answer the old state; once it has ended, every read answers what the file
    holds, and a later write's head is never paired with the old state."""
    import threading

    import aiosqlite

    store = SqliteStore(tmp_path / "t.db", synchronous="NORMAL")
    await store.open()
    hold = threading.Event()
    try:
        await put(store, view("t1", "o1"))
        for _ in range(2):
            assert (await store.get("t1"))[0] is not None
            assert (await store.get_by_order("o1"))[0] is not None
        conn = store._writer
        assert conn is not None
        execute = conn.execute
        at_commit, at_rollback = asyncio.Event(), asyncio.Event()

        async def slow_commit(sql: str, *args: Any) -> Any:
            if sql == "COMMIT":  # the thread is busy until `hold` is set, then commits
                at_commit.set()
                return await conn._execute(lambda: (hold.wait(), conn._conn.execute("COMMIT")))
            if sql == "ROLLBACK":
                at_rollback.set()
            return await execute(sql, *args)

        monkeypatch.setattr(conn, "execute", slow_commit)
        if cancels == "once":
            monkeypatch.setattr(aiosqlite.Connection, "in_transaction", property(lambda _: False))
        write = asyncio.ensure_future(put(store, view("t1", "o1", status=COMPLETED)))
        await asyncio.wait_for(at_commit.wait(), DEADLINE)
        write.cancel()
        if cancels == "twice":
            await asyncio.wait_for(at_rollback.wait(), DEADLINE)
            write.cancel()
        with pytest.raises(asyncio.CancelledError):
            await write
        monkeypatch.undo()
        # The COMMIT has not run yet: the old state, with the head of that moment.
        for found, head in (await store.get("t1"), await store.get_by_order("o1")):
            assert found is not None
            assert (found.view.status, found.revision, head) == (ACTIVE, 1, 1)
        hold.set()
        await conn.execute("SELECT 1")  # after the COMMIT (and the ROLLBACK, refused)
        for found, head in (await store.get("t1"), await store.get_by_order("o1")):
            assert found is not None
            assert (found.view.status, found.revision, head) == (COMPLETED, 2, 2)
        await put(store, view("t2", "o2"))
        for found, head in (await store.get("t1"), await store.get_by_order("o1")):
            assert found is not None
            assert (found.view.status, found.revision, head) == (COMPLETED, 2, 3)
    finally:
        hold.set()
        await store.close()


@pytest.mark.parametrize("cancelled", ["write", "record_reconcile_checks", "trim_changes"])
async def test_sqlite_a_write_cancelled_while_its_begin_waits_leaves_the_writer_usable(
    tmp_path: Path, cancelled: str
) -> None:
    """Cancelled while its BEGIN waits for aiosqlite's thread, a write leaves: the BEGIN still
    runs there. The writes after it still commit (rather than fail, all of them, because a
    transaction is already open)."""
    import threading

    store = SqliteStore(tmp_path / "t.db", synchronous="NORMAL")
    await store.open()
    hold, holding = threading.Event(), threading.Event()
    try:
        await put(store, view("t1", "o1"))
        conn = store._writer
        assert conn is not None
        # The writer's thread is busy until `hold` is set.
        busy = asyncio.ensure_future(conn._execute(lambda: (holding.set(), hold.wait())))
        while not holding.is_set():
            await asyncio.sleep(0.001)
        calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "write": lambda: put(store, view("t1", "o1", status=COMPLETED)),
            "record_reconcile_checks": lambda: store.record_reconcile_checks(["t1"], T0),
            "trim_changes": lambda: store.trim_changes(T0 + HOUR),
        }
        call = asyncio.ensure_future(calls[cancelled]())
        while not conn._tx.qsize():  # its BEGIN is queued behind `hold`
            await asyncio.sleep(0.001)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        hold.set()
        await busy
        await put(store, view("t2", "o2"))
        await store.record_reconcile_checks(["t2"], T0)
        assert await store.head_revision() == 2
        t1, head = await store.get("t1")
        assert t1 is not None
        assert (t1.view.status, t1.revision, head) == (ACTIVE, 1, 2)
    finally:
        hold.set()
        await store.close()


class _BusyPoint:
    """The store's loop-thread reader, found busy now and then (seeded): the read goes to the
    readers' pool, an await during which writes start and end."""

    def __init__(self, point: Any, rng: Any) -> None:
        self._point, self._rng = point, rng

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        import sqlite3

        if self._rng.random() < 0.3:
            raise sqlite3.OperationalError("database is locked")
        return self._point.execute(sql, params)

    def close(self) -> None:
        self._point.close()


@pytest.mark.parametrize("seed", range(4))
async def test_sqlite_reads_interleaved_with_writes_answer_a_state_of_one_moment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """Seeded writes (changes, orders moving between transactions, legacy stand-ins created and
    folded, knowledge-only writes), some cancelled once or twice at random awaits, interleaved
    with reads by id and by order, some sent to the readers' pool. Each answer is checked against
    the change log: the state of its transaction (or of the order's transaction) at the head it
    came with, a head no older than any acknowledged, or answered to a read, before the read
    began; once the writes are over,
    every read answers the last state."""
    import random
    import time

    rng = random.Random(seed)
    store = SqliteStore(tmp_path / "t.db", synchronous="NORMAL")
    await store.open()
    assert store._point is not None
    monkeypatch.setattr(store, "_point", _BusyPoint(store._point, random.Random(seed + 1000)))
    # A write is cancelled at the statements of it that `cancel_at` numbers (each an await of
    # it: BEGIN, a load, a write, COMMIT, the ROLLBACK after a cancel). A COMMIT is slow now and
    # then (a slow disk): a write cancelled while it waits leaves it queued on the writer's thread.
    writer_conn = store._writer
    assert writer_conn is not None
    slow = random.Random(seed + 2000)
    # By write: [statements so far], the numbers of those to cancel at; 0 stands for its COMMIT,
    # -1 for the statement after it (the ROLLBACK after a cancel).
    cancel_at: dict[asyncio.Task[Any], tuple[list[int], set[int]]] = {}

    def statement(sql: str) -> None:
        task = asyncio.current_task()
        if task is None or task not in cancel_at:
            return
        count, marks = cancel_at[task]
        count[0] += 1
        if sql == "COMMIT" and -1 in marks:
            marks.add(count[0] + 1)
        if count[0] in marks or (sql == "COMMIT" and 0 in marks):
            task.cancel()

    def counted(call: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def run(sql: str, *args: Any) -> Any:
            statement(sql)
            if sql == "COMMIT" and slow.random() < 0.3:
                return await writer_conn._execute(
                    lambda: (time.sleep(0.001), writer_conn._conn.execute(sql))
                )
            return await call(sql, *args)

        return run

    for name in ("execute", "execute_fetchall", "executemany"):
        monkeypatch.setattr(writer_conn, name, counted(getattr(writer_conn, name)))
    real = [f"t{i}" for i in range(5)]
    orders = [f"o{i}" for i in range(10)]
    standins = [f"L{i}" for i in range(12)]
    all_keys = BatchKeys(frozenset(), frozenset(orders + standins), frozenset(real + standins))
    acked = 0
    reads: list[tuple[str, str, TransactionSnapshot | None, int, int]] = []
    writes = 0

    def planner(n: int) -> Callable[[BatchState], tuple[BatchPlan, None]]:
        def plan_from(state: BatchState) -> tuple[BatchPlan, None]:
            pick = random.Random(seed * 100_000 + n)
            plan = Plan()
            owned = {o: t for o, t in state.order_index.items()}

            def orders_of(txn: str) -> list[str]:
                return sorted(o for o, t in owned.items() if t == txn)

            def look() -> dict[str, Any]:
                return {
                    "status": pick.choice([ACTIVE, COMPLETED, CANCELLED]),
                    "team_id": pick.choice(["a", "b", "c"]),
                }

            kind = pick.choice(["change", "change", "move", "standin", "fold", "knowledge"])
            existing = [t for t in real if t in state.transactions]
            alive = [s for s in standins if s in state.transactions]
            if kind == "knowledge" and existing:
                txn = pick.choice(existing)
                stored = state.transactions[txn]
                plan.plan.transactions[txn] = TransactionWrite(
                    knowledge=stored.knowledge,
                    view=stored.view,
                    change=None,
                    revision=stored.revision,
                    knowledge_json=knowledge_to_json(stored.knowledge),
                    view_json=view_to_json(stored.view),
                )
            elif kind == "standin" and len(alive) < 4:
                fresh = [s for s in standins if s not in owned]
                if fresh:
                    s = fresh[0]
                    plan.change(view(s, s, **look()), f"w{n}-{s}", order_id=s)
            elif kind == "fold" and alive and existing:
                s, txn = pick.choice(alive), pick.choice(existing)
                plan.plan.deleted.add(s)
                plan.change(
                    view(txn, *orders_of(txn), s, **look()),
                    f"w{n}-{txn}",
                    order_id=s,
                    kinds=(ChangeKind.LEGACY_MERGED,),
                    merged=((s, frozenset()),),
                )
            elif kind == "move" and len(existing) >= 2:
                txn, other = pick.sample(existing, 2)
                theirs = orders_of(other)
                if len(theirs) >= 2:
                    moved = pick.choice(theirs)
                    plan.change(view(txn, *orders_of(txn), moved, **look()), f"w{n}-{txn}")
                    rest = [o for o in theirs if o != moved]
                    plan.change(view(other, *rest, **look()), f"w{n}-{other}")
            else:
                txn = pick.choice(real)
                mine = orders_of(txn)
                free = [o for o in orders if o not in owned]
                if free and (not mine or pick.random() < 0.3):
                    mine.append(pick.choice(free))
                if mine:
                    plan.change(view(txn, *mine, **look()), f"w{n}-{txn}", order_id=mine[0])
            return plan.plan, None

        return plan_from

    async def writer(count: int) -> None:
        nonlocal acked, writes
        for _ in range(count):
            writes += 1
            task = asyncio.ensure_future(store.write(all_keys, planner(writes)))
            at = rng.randint(1, 10)
            cancel_at[task] = ([0], rng.choice([set(), set(), {at}, {at, at + 1}, {0}, {0, -1}]))
            try:
                applied, _ = await task
            except asyncio.CancelledError:
                pass
            else:
                if applied.changes:
                    acked = max(acked, applied.changes[-1].revision)
            finally:
                del cancel_at[task]
            # Now and then no write is under way for a while: reads then may tell the head.
            await asyncio.sleep(rng.choice([0, 0, 0.002]))

    writing = asyncio.Event()

    seen = 0  # the highest head a read answered so far

    async def reader() -> None:
        nonlocal seen
        while not writing.is_set():
            # Monotonic: no older than what was acknowledged, nor than any head a read answered
            # before this one began (a caller that saw a commit never sees what was before it).
            before = max(acked, seen)
            if rng.random() < 0.5:
                key = rng.choice(real + standins[:4] + ["nobody"])
                found, head = await store.get(key)
                reads.append(("id", key, found, head, before))
            else:
                key = rng.choice(orders + standins[:4])
                found, head = await store.get_by_order(key)
                reads.append(("order", key, found, head, before))
            seen = max(seen, head)
            for _ in range(rng.randint(0, 3)):
                await asyncio.sleep(0)

    try:
        async with asyncio.timeout(DEADLINE):
            readers = [asyncio.ensure_future(reader()) for _ in range(3)]
            try:
                await asyncio.gather(writer(60), writer(60))
            finally:
                writing.set()
                await asyncio.gather(*readers)
            assert store._writer is not None
            await writer_conn.execute("SELECT 1")  # any COMMIT left behind by a cancel ran
            final = await store.head_revision()
            for key in real + standins:
                reads.append(("id", key, *(await store.get(key)), final))
            for key in orders + standins:
                reads.append(("order", key, *(await store.get_by_order(key)), final))
        log = (await store.changes_after(0, 10**6)).changes
    finally:
        await store.close()

    # The state at each head, from the change log.
    states: dict[int, dict[str, tuple[TransactionView, int]]] = {0: {}}
    current: dict[str, tuple[TransactionView, int]] = {}
    for change in log:
        for folded, _ in change.merged:
            current.pop(folded, None)
        current[change.transaction_id] = (change.view, change.revision)
        states[change.revision] = dict(current)
    assert final == (log[-1].revision if log else 0)
    assert {k for k, *_ in reads} == {"id", "order"}
    for kind, key, found, head, before in reads:
        assert before <= head <= final, (kind, key, head, before)
        at = states[head]
        if kind == "order":
            owners = [t for t, (v, _) in at.items() if key in {o.id for o in v.orders}]
            assert len(owners) <= 1
            key = owners[0] if owners else ""
        expected = at.get(key)
        got = (found.view, found.revision) if found is not None else None
        assert got == expected, (kind, key, head, got and got[1], expected and expected[1])


# -- TransactionReads -----------------------------------------------------------------------------


async def test_reads_find_by_id_and_order_with_the_head_revision_of_their_snapshot(
    store: Store,
) -> None:
    await put(store, view("t1", "o1", "o2"), view("t2", "o3"))
    await put(store, view("t3", "o4"))
    t1, head = await store.get("t1")
    assert t1 is not None
    assert (t1.revision, t1.view, head) == (1, view("t1", "o1", "o2"), 3)
    by_order, head = await store.get_by_order("o2")
    assert (by_order, head) == (t1, 3)
    assert await store.get("o1") == (None, 3)
    assert await store.get_by_order("t1") == (None, 3)

    by_id, by_order_ids, head = await store.get_many(["t1", "t3", "t1", "nope"], ["o3", "o1", "x"])
    assert head == 3
    assert {k: (s.view.id, s.revision) for k, s in by_id.items()} == {
        "t1": ("t1", 1),
        "t3": ("t3", 3),
    }
    assert {k: (s.view.id, s.revision) for k, s in by_order_ids.items()} == {
        "o3": ("t2", 2),
        "o1": ("t1", 1),
    }
    assert await store.get_many([], []) == ({}, {}, 3)


async def test_get_many_reads_each_transaction_once_in_chunks_and_stops_when_told(
    store: Store,
) -> None:
    await put(store, view("t1", "o1", "o2"), view("t2", "o3"), view("t3", "o4"))
    size = len(view_to_json(view("t1", "o1", "o2")).encode())
    chunks: list[list[str]] = []

    def collect(chunk: Sequence[TransactionSnapshot]) -> None:
        chunks.append(sorted(s.view.id for s in chunk))

    by_id, by_order, head = await store.get_many(
        ["t1", "t1", "t3"], ["o1", "o2", "o1", "o3"], chunk_bytes=size, on_chunk=collect
    )
    # One snapshot object answers every lookup of the same transaction, read once.
    assert by_id["t1"] is by_order["o1"] is by_order["o2"]
    assert (set(by_id), set(by_order), head) == ({"t1", "t3"}, {"o1", "o2", "o3"}, 3)
    # A chunk holds about chunk_bytes of stored state: here one transaction each.
    assert sorted(i for chunk in chunks for i in chunk) == ["t1", "t2", "t3"]
    assert all(len(chunk) == 1 for chunk in chunks)

    class Enough(Exception):
        pass

    seen: list[int] = []

    def stop(chunk: Sequence[TransactionSnapshot]) -> None:
        seen.append(len(chunk))
        raise Enough

    with pytest.raises(Enough):
        await store.get_many(["t1", "t2", "t3"], [], chunk_bytes=size, on_chunk=stop)
    assert seen == [1]  # the read ended at the first chunk
    # Without chunk_bytes: everything in one chunk.
    chunks.clear()
    await store.get_many(["t1", "t2"], ["o4"], on_chunk=collect)
    assert chunks == [["t1", "t2", "t3"]]
    assert await store.get_many(["nope"], ["x"], on_chunk=collect) == ({}, {}, 3)


async def test_list_filters_pages_by_revision_and_reports_the_head(store: Store) -> None:
    await put(
        store,
        view("t1", status=ACTIVE, team_id="a", user_id="u", updated_at=T0),
        view("t2", status=COMPLETED, team_id="a", user_id="v", updated_at=T0 + HOUR),
        view("t3", status=ACTIVE, team_id="b", user_id="u"),
        view("t4", status=CANCELLED, team_id="b", user_id="v", updated_at=T0 - HOUR),
    )

    async def listed(where: ListFilter, after: int = 0, limit: int = 10) -> list[str]:
        found, head = await store.list_transactions(where, after, limit)
        assert head == await store.head_revision()
        assert [s.revision for s in found] == sorted(s.revision for s in found)
        return ids_of(found)

    assert await listed(ListFilter()) == ["t1", "t2", "t3", "t4"]
    assert await listed(ListFilter(status=ACTIVE)) == ["t1", "t3"]
    assert await listed(ListFilter(team_id="a")) == ["t1", "t2"]
    assert await listed(ListFilter(user_id="u")) == ["t1", "t3"]
    # A transaction with no provider time is not "updated since" any time.
    assert await listed(ListFilter(updated_since=T0)) == ["t1", "t2"]
    assert await listed(ListFilter(status=ACTIVE, team_id="b", user_id="u")) == ["t3"]
    assert await listed(ListFilter(team_id="nobody")) == []
    assert await listed(ListFilter(), limit=2) == ["t1", "t2"]
    assert await listed(ListFilter(), after=2, limit=2) == ["t3", "t4"]
    assert await listed(ListFilter(status=CANCELLED), after=3) == ["t4"]

    # A change moves a transaction to the end: paging by revision sees it again.
    await put(store, view("t1", status=ACTIVE, team_id="a", user_id="u", updated_at=T0 + MINUTE))
    assert await listed(ListFilter(), after=4) == ["t1"]
    assert await listed(ListFilter(status=ACTIVE)) == ["t3", "t1"]


async def test_transaction_ids_walk_every_transaction_in_id_order(store: Store) -> None:
    await put(store, view("t3"), view("t1"), view("t2"))
    await put(store, view("t0"))
    assert await store.count_transactions() == 4
    assert await store.transaction_ids("", 3) == ["t0", "t1", "t2"]
    assert await store.transaction_ids("t2", 3) == ["t3"]
    assert await store.transaction_ids("t1x", 1) == ["t2"]
    assert await store.transaction_ids("t3", 3) == []


async def test_replay_events_are_each_transactions_events_oldest_first(store: Store) -> None:
    plan = Plan()
    plan.change(view("t1", "o1", "o2"), "e1", order_id="o1", body=b'{"n": 1}')
    plan.change(view("t2", "o3"), "e2", order_id="o3")
    await commit(store, plan)
    later = Plan(T0 + HOUR)
    later.change(view("t1", "o1", "o2"), "e3", order_id="o2", body=b'{"n": 3}')
    later.event("e4", "o1", "t1", None, body=b'{"n": 4}')  # a duplicate: stored, no change
    await commit(store, later)

    found = await store.replay_events(["t1", "t-unknown"])
    assert list(found) == ["t1"]
    assert [(e.event_id, e.order_id, e.body) for e in found["t1"]] == [
        ("e1", "o1", b'{"n": 1}'),
        ("e3", "o2", b'{"n": 3}'),
        ("e4", "o1", b'{"n": 4}'),
    ]
    first = found["t1"][0]
    assert (first.event_type, first.source, first.body_format, first.digest) == (
        "labtest.order.updated",
        "webhook",
        "json",
        digest(b'{"n": 1}'),
    )
    assert set(await store.replay_events(["t1", "t2"])) == {"t1", "t2"}


# -- ChangeLog ------------------------------------------------------------------------------------


async def test_the_change_log_pages_and_filters_and_keeps_every_field(store: Store) -> None:
    plan = Plan()
    merged = (("o9", frozenset({ChangeKind.TRANSACTION_CREATED, ChangeKind.ORDER_ADDED})),)
    plan.change(
        view("t1", "o1", status=COMPLETED, updated_at=T0),
        "e1",
        order_id="o1",
        kinds=(ChangeKind.TRANSACTION_COMPLETED, ChangeKind.ORDER_STATUS_CHANGED),
        merged=merged,
        recorded_at=T0 + MINUTE,
    )
    plan.change(view("t2"), "e2")
    await commit(store, plan)
    await put(store, view("t1", "o1"), view("t3"))

    page = await store.changes_after(0, 10)
    assert (page.compacted_revision, page.head_revision) == (0, 4)
    assert [(c.revision, c.transaction_id) for c in page.changes] == [
        (1, "t1"),
        (2, "t2"),
        (3, "t1"),
        (4, "t3"),
    ]
    first = page.changes[0]
    assert (first.event_id, first.order_id, first.recorded_at) == ("e1", "o1", T0 + MINUTE)
    assert first.kinds == (ChangeKind.TRANSACTION_COMPLETED, ChangeKind.ORDER_STATUS_CHANGED)
    assert first.merged == merged
    assert first.view == view("t1", "o1", status=COMPLETED, updated_at=T0)
    assert (page.changes[1].order_id, page.changes[1].merged) == (None, ())

    assert [c.revision for c in (await store.changes_after(1, 2)).changes] == [2, 3]
    assert [c.revision for c in (await store.changes_after(0, 10, ["t1"])).changes] == [1, 3]
    assert [c.revision for c in (await store.changes_after(1, 10, ["t1", "t3"])).changes] == [3, 4]
    assert [c.revision for c in (await store.changes_after(0, 1, ["t3"])).changes] == [4]
    end = await store.changes_after(4, 10)
    assert (end.changes, end.head_revision) == ([], 4)
    assert await store.head_revision() == 4


async def test_changes_through_a_revision_come_newest_first_for_the_ids_asked(
    store: Store,
) -> None:
    await put(store, view("t1"), view("t2"))
    await put(store, view("t1"), view("t3"))
    page = await store.changes_through(3, 10, ["t1", "t3"])
    assert [(c.revision, c.transaction_id) for c in page.changes] == [(3, "t1"), (1, "t1")]
    assert (page.compacted_revision, page.head_revision) == (0, 4)
    assert [c.revision for c in (await store.changes_through(4, 1, ["t1", "t3"])).changes] == [4]
    assert (await store.changes_through(0, 10, ["t1"])).changes == []
    await store.trim_changes(T0 + HOUR)
    assert (await store.changes_through(4, 10, ["t1"])).compacted_revision == 4


# -- DeliveryHistory ------------------------------------------------------------------------------


async def test_a_transactions_history_is_its_orders_events_and_its_own_rows_in_arrival_order(
    store: Store,
) -> None:
    """Events of the transaction's orders (whichever transaction they were recorded under), the
    rows the service recorded for it, retries counted on their event, each with its change's
    kinds and diff while the log keeps it; bodies only when asked, and erased ones flagged."""
    plan = Plan()
    # o2 first stood in a transaction of its own (a legacy stand-in), then joined t1.
    plan.change(view("o2", "o2"), "e1", order_id="o2", body=b'{"b": 1}')
    plan.change(view("t9", "o9"), "e2", order_id="o9")
    plan.change(view("t1", "o1", "o2"), "e3", order_id="o1")
    plan.event("e4", "o1", "t1", None)  # stale: no change
    plan.plan.events[-1] = msgspec.structs.replace(
        plan.plan.events[-1],
        outcome="stale",
        reason="older than order o1's `completed`",
        claimed_status="received.walk_in_test.ordered",
        claimed_transaction_status="active",
        provider_time=T0 - HOUR,
    )
    await commit(store, plan)
    retries = Plan(T0 + MINUTE)
    retries.plan.duplicates["e4"] = DuplicateWrite("e4", 2, T0 + MINUTE)
    retries.plan.history.append(
        EventWrite(
            event_id="results:t1",
            event_type="results.fetched",
            source="results",
            body_format="json",
            body=None,
            digest="d",
            order_id=None,
            transaction_id="t1",
            outcome="stale",
            change=None,
            received_at=T0 + MINUTE,
            reason="the same combined results",
        )
    )
    await commit(store, retries)
    again = Plan(T0 + 2 * MINUTE)
    again.plan.history.append(msgspec.structs.replace(retries.plan.history[0], received_at=T0))
    await commit(store, again)  # the same row again: counted on it

    found = await store.transaction_events("t1", 0, 10, bodies=False)
    assert [(e.event_id, e.order_id, e.revision, e.duplicates) for e in found] == [
        ("e1", "o2", 1, 0),
        ("e3", "o1", 3, 0),
        ("e4", "o1", None, 2),
        ("results:t1", None, None, 1),
    ]
    assert [e.seq for e in found] == sorted(e.seq for e in found)
    stale = found[2]
    assert (
        stale.outcome,
        stale.reason,
        stale.claimed_status,
        stale.claimed_transaction_status,
    ) == (
        "stale",
        "older than order o1's `completed`",
        "received.walk_in_test.ordered",
        "active",
    )
    assert (stale.provider_time, stale.last_duplicate_at) == (T0 - HOUR, T0 + MINUTE)
    assert (stale.kinds, stale.diff) == (None, None)
    assert found[0].kinds == (ChangeKind.DETAILS_CHANGED,)
    assert found[3].last_duplicate_at == T0
    assert all(e.body is None for e in found)
    assert not any(e.body_erased for e in found)

    after_first = await store.transaction_events("t1", found[0].seq, 2, bodies=True)
    assert [e.event_id for e in after_first] == ["e3", "e4"]
    assert after_first[0].body == b'{"id": "e3"}'
    await store.erase_bodies(T0 + HOUR)
    await store.trim_changes(T0 + HOUR)
    kept = await store.transaction_events("t1", 0, 10, bodies=True)
    assert [e.event_id for e in kept] == [e.event_id for e in found]
    assert [e.body_erased for e in kept] == [True, True, True, False]
    assert all(e.body is None and e.kinds is None for e in kept)
    assert await store.transaction_events("t2", 0, 10, bodies=False) == []


async def test_trimming_compacts_the_oldest_changes_and_keeps_the_log_contiguous(
    store: Store,
) -> None:
    plan = Plan()
    plan.change(view("t1"), "e1", recorded_at=T0)
    plan.change(view("t2"), "e2", recorded_at=T0 + HOUR)
    # The clock stepped back: a later revision recorded earlier.
    plan.change(view("t3"), "e3", recorded_at=T0 - HOUR)
    plan.change(view("t4"), "e4", recorded_at=T0 + 2 * HOUR)
    await commit(store, plan)

    # Through the newest revision recorded before the cutoff, and everything below it.
    assert await store.trim_changes(T0 + 30 * MINUTE) == 3
    page = await store.changes_after(0, 10)
    assert ([c.revision for c in page.changes], page.compacted_revision) == ([4], 3)
    assert await store.trim_changes(T0) == 3  # nothing older is left
    assert (await store.changes_after(0, 10)).compacted_revision == 3

    assert await store.trim_changes(T0 + 3 * HOUR) == 4
    page = await store.changes_after(0, 10)
    assert (page.changes, page.compacted_revision, page.head_revision) == ([], 4, 4)
    # The transactions themselves stay.
    assert await store.count_transactions() == 4

    await put(store, view("t5"), at=T0 + 4 * HOUR)
    page = await store.changes_after(0, 10)
    assert ([c.revision for c in page.changes], page.compacted_revision) == ([5], 4)


async def test_change_notifications_come_from_a_shared_log_only(store: Store) -> None:
    notifications = store.change_notifications()
    try:
        if store.shared:
            # Once on (re)connecting, as anything may have been missed before, then per commit.
            async with asyncio.timeout(DEADLINE):
                await anext(notifications)
            await put(store, view("t1"))
            async with asyncio.timeout(DEADLINE):
                await anext(notifications)
        else:
            # One process commits everything: it publishes its own commits, nothing to hear.
            waiting = asyncio.ensure_future(anext(notifications))
            await put(store, view("t1"))
            done, _ = await asyncio.wait([waiting], timeout=0.3)
            assert not done
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
    finally:
        await notifications.aclose()


# -- Housekeeping: erasure ------------------------------------------------------------------------


async def test_erasing_bodies_keeps_what_dedupe_and_audit_need(store: Store) -> None:
    plan = Plan()
    plan.change(view("t1", "o1"), "e1", order_id="o1", received_at=T0, body=b'{"old": 1}')
    plan.change(view("t1", "o1"), "e2", order_id="o1", received_at=T0 + 2 * HOUR)
    await commit(store, plan)

    assert await store.erase_bodies(T0 + HOUR) == 1
    assert await store.erase_bodies(T0 + HOUR) == 0
    events = (await store.replay_events(["t1"]))["t1"]
    assert [(e.event_id, e.body is None, e.digest) for e in events] == [
        ("e1", True, digest(b'{"old": 1}')),
        ("e2", False, digest(b'{"id": "e2"}')),
    ]
    _, (state,) = await commit(store, Plan(), keys(("e1",)))
    assert state.events["e1"].digest == digest(b'{"old": 1}')
    assert await store.erase_bodies(T0 + 3 * HOUR) == 1


async def test_erasing_results_keeps_their_status_digest_time_and_revision(store: Store) -> None:
    plan = Plan()
    plan.results("t1", plan.change(view("t1"), "e1"), at=T0)
    plan.results("t2", plan.change(view("t2"), "e2"), status="partial", at=T0 + 2 * HOUR)
    await commit(store, plan)

    assert await store.erase_results(T0 + HOUR) == 1
    assert await store.erase_results(T0 + HOUR) == 0
    erased, _ = await store.get_results("t1")
    assert erased is not None
    assert (erased.status, erased.body, erased.fetched_at, erased.revision) == (
        "final",
        None,
        T0,
        1,
    )
    assert erased.digest == digest(b'{"results": "t1"}')
    kept, _ = await store.get_results("t2")
    assert kept is not None
    assert (kept.status, kept.body, kept.revision) == ("partial", b'{"results": "t2"}', 2)
    # A batch sees only results whose body is kept.
    _, (state,) = await commit(store, Plan(), keys(results_of=("t1", "t2")))
    assert state.results_kept == {"t2": digest(b'{"results": "t2"}')}


# -- Results --------------------------------------------------------------------------------------


async def test_results_markers_are_written_due_in_order_and_cleared(store: Store) -> None:
    plan = Plan()
    first = plan.change(view("t1"), "e1")
    plan.marker("t1", change=first, due_at=T0 + MINUTE)
    plan.marker("t2", requested_revision=7, due_at=T0 - HOUR, attempts=3, last_failure="timeout")
    plan.marker("t3", requested_revision=8, due_at=T0 + HOUR)
    await commit(store, plan)

    assert await store.get_results("t1") == (
        None,
        PendingResults("t1", 1, T0, attempts=0, due_at=T0 + MINUTE, last_failure=""),
    )
    due = await store.results_due(T0 + 2 * MINUTE, 10)
    assert [(p.transaction_id, p.requested_revision) for p in due] == [("t2", 7), ("t1", 1)]
    assert due[0] == PendingResults("t2", 7, T0, 3, T0 - HOUR, "timeout")
    assert [p.transaction_id for p in await store.results_due(T0 + 2 * MINUTE, 1)] == ["t2"]
    assert await store.results_due(T0 - 2 * HOUR, 10) == []

    # Fetched: results stored with their change, the marker cleared; another marker replaced.
    done = Plan()
    done.results("t1", done.change(view("t1"), "e-results", kinds=(ChangeKind.RESULTS_READY,)))
    done.plan.results_done.add("t1")
    done.marker("t2", requested_revision=7, due_at=T0 + HOUR, attempts=4, last_failure="503")
    await commit(store, done)
    results, marker = await store.get_results("t1")
    assert marker is None
    assert results is not None
    assert (results.transaction_id, results.status, results.revision) == ("t1", "final", 2)
    assert results.body == b'{"results": "t1"}'
    assert results.fetched_at == T0
    assert [p.transaction_id for p in await store.results_due(T0 + 2 * MINUTE, 10)] == []
    assert await store.get_results("t2") == (None, PendingResults("t2", 7, T0, 4, T0 + HOUR, "503"))


# -- ReconcileChecks ------------------------------------------------------------------------------


async def test_reconcile_candidates_are_silent_active_transactions_longest_silent_first(
    store: Store,
) -> None:
    await put(
        store,
        view("t-c", updated_at=T0 - 2 * HOUR),
        view("t-f"),
        view("t-b", updated_at=T0 - 3 * HOUR),
        view("t-d", status=COMPLETED, updated_at=T0 - 5 * HOUR),
        view("t-e", updated_at=T0 + HOUR),
        view("t-a"),
    )
    # No provider time first (by id), then the oldest; never a finished or recent one.
    assert await store.reconcile_candidates(T0, 10) == ["t-a", "t-f", "t-b", "t-c"]
    assert await store.reconcile_candidates(T0, 2) == ["t-a", "t-f"]

    await store.record_reconcile_checks(["t-a", "t-b"], T0 + MINUTE)
    await store.record_reconcile_checks([], T0)
    assert await store.reconcile_candidates(T0, 10) == ["t-f", "t-c"]
    # A check before the silence period does not count.
    assert await store.reconcile_candidates(T0 + 2 * MINUTE, 10) == ["t-a", "t-f", "t-b", "t-c"]
    await store.record_reconcile_checks(["t-a"], T0 + 5 * MINUTE)
    assert await store.reconcile_candidates(T0 + 2 * MINUTE, 10) == ["t-f", "t-b", "t-c"]


# -- Jobs -----------------------------------------------------------------------------------------


async def test_a_job_lock_has_one_holder_at_a_time_where_others_may_write(store: Store) -> None:
    async with store.exclusive("job") as first:
        assert first
        async with store.exclusive("job") as second:
            # A store with a single writer process is the only runner there is.
            assert second is (not store.shared)
        async with store.exclusive("another job") as other:
            assert other
    async with store.exclusive("job") as again:
        assert again


# -- StoreLifecycle -------------------------------------------------------------------------------


async def test_probing_a_healthy_store_keeps_it_healthy_and_writes_nothing(store: Store) -> None:
    await put(store, view("t1"))
    await store.probe()
    assert store.health.healthy
    assert await store.head_revision() == 1
    assert (await store.changes_after(0, 10)).head_revision == 1


CALLS: dict[str, Callable[[Store], Awaitable[Any]]] = {
    "write": lambda s: s.write(NO_KEYS, lambda state: (BatchPlan(), None)),
    "get": lambda s: s.get("t"),
    "get_by_order": lambda s: s.get_by_order("o"),
    "list_transactions": lambda s: s.list_transactions(ListFilter(), 0, 10),
    "get_many": lambda s: s.get_many(["t"], ["o"]),
    "transaction_ids": lambda s: s.transaction_ids("", 10),
    "count_transactions": lambda s: s.count_transactions(),
    "replay_events": lambda s: s.replay_events(["t"]),
    "head_revision": lambda s: s.head_revision(),
    "changes_after": lambda s: s.changes_after(0, 10),
    "changes_through": lambda s: s.changes_through(10, 10, ["t"]),
    "transaction_events": lambda s: s.transaction_events("t", 0, 10, bodies=False),
    "get_results": lambda s: s.get_results("t"),
    "results_due": lambda s: s.results_due(T0, 10),
    "reconcile_candidates": lambda s: s.reconcile_candidates(T0, 10),
    "record_reconcile_checks": lambda s: s.record_reconcile_checks(["t"], T0),
    "trim_changes": lambda s: s.trim_changes(T0),
    "erase_bodies": lambda s: s.erase_bodies(T0),
    "erase_results": lambda s: s.erase_results(T0),
}


async def _take_job(store: Store) -> None:
    async with store.exclusive("job"):
        pass


async def _refused(store: Store, call: Callable[[Store], Awaitable[Any]]) -> bool:
    try:
        async with asyncio.timeout(DEADLINE):
            await call(store)
    except StoreUnavailable:
        return True
    return False


async def test_a_closed_store_refuses_every_call_as_unavailable(store: Store) -> None:
    await put(store, view("t1"))
    await store.close()
    calls = [*CALLS.items(), ("exclusive", _take_job)]
    assert [name for name, call in calls if not await _refused(store, call)] == []
    # Probing never raises; it only tells `health`.
    await store.probe()


def test_sqlite_latest_states_keep_at_most_their_bytes_oldest_out_first() -> None:
    from transaction_service.store.latest import LatestStates

    latest = LatestStates(max_bytes=3 * (1000 + 200))
    latest.learn(0, 7, "t0", "x" * 1000, 1, writing=True)  # head not known while writing
    assert latest.get("t0") is None
    for i in range(5):
        latest.learn(0, 7, f"t{i}", "x" * 1000, i + 1, order_id=f"o{i}", writing=False)
    assert [i for i in range(5) if latest.get(f"t{i}")] == [2, 3, 4]
    found = latest.get_by_order("o4")
    assert found is not None
    assert (found[0].revision, found[1]) == (5, 7)
    latest.learn(0, 8, "t0", "x", 1, writing=False)  # read with another head: not kept
    assert latest.get("t0") is None
    latest.learn(latest.writes_ended - 1, 7, "t0", "x", 1, writing=False)  # a write ended since
    assert latest.get("t0") is None
    latest.unsure()
    assert latest.get("t4") is None
    assert latest.head is None
    # A read does not tell the head again (the COMMIT of a cancelled write may land after it)...
    latest.learn(latest.writes_ended, 7, "t0", "x", 1, writing=False)
    assert latest.get("t0") is None
    # ...a commit does; one that made no changes lets reads tell it again.
    latest.committed(None, (), ())
    latest.learn(latest.writes_ended, 9, "t0", "x", 1, writing=False)
    assert latest.get("t0") is not None
    latest.unsure()
    latest.committed(10, (), ())
    assert latest.head == 10


@pytest.mark.parametrize("chars", ["x", "\N{GRINNING FACE}"])
def test_sqlite_latest_states_stay_within_their_bytes_whatever_the_ids_and_text(
    chars: str,
) -> None:
    """Ids up to `max_string_length` (1,024) characters long, by transaction and by order, and
    views of text that Python keeps in 4 bytes a character: what is kept, ids and orders
    included, stays about within the bound."""
    import tracemalloc

    from transaction_service.store.latest import LatestStates

    bound = 1 << 20
    tracemalloc.start()
    try:
        latest = LatestStates(max_bytes=bound)
        for i in range(3000):
            latest.learn(
                latest.writes_ended,
                1,
                f"t{i:01023d}",
                chars * 300,
                1,
                order_id=f"o{i:01023d}",
                writing=False,
            )
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert latest.get(f"t{2999:01023d}") is not None
    assert held < 1.5 * bound, f"{held / bound:.1f} times the bound"
