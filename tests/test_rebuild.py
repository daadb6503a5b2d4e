"""Rebuild: re-deriving transactions from their stored events after a merge-rule change.

A merge-rule change is simulated by overwriting a transaction's stored knowledge and view with
what an "old rule" made of it (here: the state before its last webhook, as if the old rule had
ignored that one). The planner runs on the in-memory store; the whole rebuild on SQLite and
PostgreSQL, with watchers; the command on a real SQLite file.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec

from tests.conftest import SCENARIOS, database
from tests.pg import run_sync
from tests.scenario_tools import expected_summary, view_summary, with_fresh_ids
from tests.test_plan import commit, delivery, legacy_variant
from transaction_service.domain.state import ChangeKind, knowledge_to_json, view, view_to_json
from transaction_service.store.base import Store, StoredTransaction
from transaction_service.store.memory import MemoryStore
from transaction_service.store.postgres import PostgresStore
from transaction_service.store.sqlite import SqliteStore
from transaction_service.usecases.commit import CommitPath
from transaction_service.usecases.ingest import Ingestor, decode_delivery
from transaction_service.usecases.plan import REBUILD_EVENT_PREFIX, RebuildOutcome
from transaction_service.usecases.rebuild import rebuild
from transaction_service.usecases.watch import ChangeFeed, ChangeHub, WatchFilter

REDRAW = next(s for s in SCENARIOS if s["scenario"] == "redraw_completed")
LIMIT = 1 << 20


async def old_rule_state(deliveries: list[dict[str, Any]]) -> StoredTransaction:
    """What an "old rule" that ignored the last webhook made of a transaction."""
    store = MemoryStore()
    for d in deliveries[:-1]:
        await commit(store, [delivery(d["svix_id"], d["body"])])
    (stored,) = store.transactions.values()
    return stored


# -- the planner, on the in-memory store ----------------------------------------------------------


def test_rebuild_after_ordinary_ingest_changes_nothing() -> None:
    """Every scenario, with retries and legacy copies folded in: the stored knowledge is what
    replaying the events gives, so a rebuild with the same rule writes nothing."""

    async def go() -> tuple[MemoryStore, Any, int]:
        store = MemoryStore()
        for s in SCENARIOS:
            run = with_fresh_ids(s)
            sends = [(d["svix_id"], d["body"]) for d in run["deliveries"]]
            sends += [sends[0], (f"legacy-{run['scenario']}", legacy_variant(sends[-1][1]))]
            for event_id, body in reversed(sends):
                await commit(store, [delivery(event_id, body)])
        head = store.head
        return store, await rebuild(store, CommitPath(store), batch_size=2), head

    store, report, head = asyncio.run(go())
    assert report.examined == len(store.transactions)
    assert report.count(RebuildOutcome.UNCHANGED) == report.examined
    assert store.head == head


def test_rebuild_replaces_stale_knowledge_and_reports_the_change_kinds() -> None:
    """The stored state is an old rule's (the redraw order's completion ignored): the rebuild
    writes one ordinary change with the kinds of the difference, and the expected state."""
    run = with_fresh_ids(REDRAW)
    txn_id = run["expect"]["transaction_id"]

    async def go() -> tuple[MemoryStore, Any]:
        store = MemoryStore()
        for d in run["deliveries"]:
            await commit(store, [delivery(d["svix_id"], d["body"])])
        store.transactions[txn_id] = StoredTransaction(
            (await old_rule_state(run["deliveries"])).knowledge,
            (await old_rule_state(run["deliveries"])).view,
            store.transactions[txn_id].revision,
        )
        return store, await rebuild(store, CommitPath(store))

    store, report = asyncio.run(go())
    assert report.count(RebuildOutcome.CHANGED) == 1
    change = store.changes[-1]
    assert change.revision == report.first_revision == report.last_revision == store.head
    assert change.event_id.startswith(REBUILD_EVENT_PREFIX)
    assert change.order_id is None
    assert ChangeKind.TRANSACTION_COMPLETED in change.kinds
    assert view_summary(store.transactions[txn_id].view) == expected_summary(run)
    assert store.transactions[txn_id].revision == change.revision


def test_a_rebuild_puts_right_an_order_the_old_same_instant_tie_break_left_behind() -> None:
    """Issue 16, item 8: under the old rule an initial order whose `partial_results` and
    `redraw_available` shared a timestamp stayed at `partial_results` (its own event beat the
    blocks). Transactions stored so are put right by a rebuild, as an ordinary change."""
    scenario = next(
        s
        for s in SCENARIOS
        if s["scenario"] == "redraw_available_lost_at_the_instant_of_partial_results"
    )
    run = with_fresh_ids(scenario)
    txn_id = run["expect"]["transaction_id"]
    initial_id = run["expect"]["initial_order_id"]

    async def go() -> tuple[MemoryStore, Any]:
        store = MemoryStore()
        for d in run["deliveries"]:
            await commit(store, [delivery(d["svix_id"], d["body"])])
        stored = store.transactions[txn_id]
        # What the old rule stored: the order's own `partial_results` won the tie.
        order = stored.knowledge.orders[initial_id]
        orders = dict(stored.knowledge.orders)
        orders[initial_id] = msgspec.structs.replace(order, status=order.own_status)
        old = msgspec.structs.replace(stored.knowledge, orders=orders)
        old_view = view(old)
        assert {o.id: o.low_level_status for o in old_view.orders}[initial_id] == "partial_results"
        store.transactions[txn_id] = StoredTransaction(old, old_view, stored.revision)
        return store, await rebuild(store, CommitPath(store))

    store, report = asyncio.run(go())
    assert report.count(RebuildOutcome.CHANGED) == 1
    change = store.changes[-1]
    assert change.event_id.startswith(REBUILD_EVENT_PREFIX)
    assert ChangeKind.ORDER_STATUS_CHANGED in change.kinds
    assert view_summary(store.transactions[txn_id].view) == expected_summary(run)


def test_erased_bodies_keep_the_state_and_are_counted() -> None:
    run = with_fresh_ids(REDRAW)
    txn_id = run["expect"]["transaction_id"]

    async def go() -> tuple[MemoryStore, Any, StoredTransaction]:
        store = MemoryStore()
        for d in run["deliveries"]:
            await commit(store, [delivery(d["svix_id"], d["body"])])
        old = await old_rule_state(run["deliveries"])
        stale = StoredTransaction(old.knowledge, old.view, store.transactions[txn_id].revision)
        store.transactions[txn_id] = stale
        await store.erase_bodies(datetime.now(UTC) + timedelta(days=1))
        return store, await rebuild(store, CommitPath(store)), stale

    store, report, stale = asyncio.run(go())
    assert report.count(RebuildOutcome.INCOMPLETE) == 1
    assert report.count(RebuildOutcome.CHANGED) == 0
    assert store.transactions[txn_id] == stale


# -- on SQLite and PostgreSQL, with a watcher ------------------------------------------------------


def open_store(db: str) -> Store:
    if db.startswith("postgresql://"):
        return PostgresStore(db, pool_size=2)
    return SqliteStore(db, synchronous="NORMAL")


async def overwrite(store: Store, db: str, txn_id: str, old: StoredTransaction) -> None:
    """Write an old rule's knowledge and view into the stored row, as that rule had."""
    sql = "UPDATE transactions SET knowledge = {0}, view = {1}, status = {2} WHERE id = {3}"
    values = (
        knowledge_to_json(old.knowledge),
        view_to_json(old.view),
        old.view.status.value,
        txn_id,
    )
    if db.startswith("postgresql://"):
        import asyncpg

        conn = await asyncpg.connect(db)
        try:
            await conn.execute(sql.format("$1", "$2", "$3", "$4"), *values)
        finally:
            await conn.close()
    else:
        with sqlite3.connect(db) as conn:
            conn.execute(sql.format("?", "?", "?", "?"), values)


async def test_rebuild_writes_ordinary_changes_that_watchers_see(
    tmp_path: Path, store_kind: str
) -> None:
    """Two transactions with an old rule's state; one of them has its bodies erased. The rebuild
    changes the other through the store's write path: a watcher that resumes from before the
    rebuild replays it from the log, and on PostgreSQL a live watcher of a server process on the
    same database (its own store and change feed) hears it as it is committed. The one with
    erased bodies is counted and keeps its state."""
    fixed, erased = with_fresh_ids(REDRAW), with_fresh_ids(REDRAW)
    with database(store_kind, tmp_path) as db:
        store = open_store(db)
        await store.open()
        ingestor = Ingestor(CommitPath(store))
        ingestor.start()
        for run in (erased, fixed):
            for d in run["deliveries"]:
                await ingestor.ingest(
                    decode_delivery(d["svix_id"], payload=d["body"], max_body_bytes=LIMIT)
                )
            if run is erased:
                await store.erase_bodies(datetime.now(UTC) + timedelta(days=1))
        await ingestor.stop()
        for run in (fixed, erased):
            txn_id = run["expect"]["transaction_id"]
            await overwrite(store, db, txn_id, await old_rule_state(run["deliveries"]))
        before = await store.head_revision()

        # A live watcher on "another replica": its own store, hub and feed on the database.
        replica = open_store(db) if store.shared else None
        live: list[Any] = []
        watching = None
        if replica is not None:
            await replica.open()
            hub = ChangeHub(replica)
            feed = ChangeFeed(replica, hub, shared=True, poll_seconds=0.2)
            await feed.start()
            feeding = asyncio.create_task(feed.run())
            opened = asyncio.Event()

            async def watch() -> None:
                where = WatchFilter(transaction_id=fixed["expect"]["transaction_id"])
                async for event in hub.watch(where, None, current=None):
                    opened.set()
                    live.append(event)

            watching = asyncio.create_task(watch())
            await opened.wait()

        report = await rebuild(store, CommitPath(store))

        assert report.count(RebuildOutcome.CHANGED) == 1
        assert report.count(RebuildOutcome.INCOMPLETE) == 1
        page = await store.changes_after(before, 100)
        (change,) = page.changes
        assert change.transaction_id == fixed["expect"]["transaction_id"]
        assert ChangeKind.TRANSACTION_COMPLETED in change.kinds
        assert view_summary(change.view) == expected_summary(fixed)
        kept, _ = await store.get(erased["expect"]["transaction_id"])
        assert kept is not None
        assert kept.view == (await old_rule_state(erased["deliveries"])).view
        # The rebuild is an entry of the transaction's history, after its deliveries, saying
        # what it changed; the one it could not re-derive has none.
        *deliveries, rebuilt = await store.transaction_events(
            change.transaction_id, 0, 100, bodies=False
        )
        assert [e.source for e in deliveries] == ["grpc"] * len(fixed["deliveries"])
        assert (rebuilt.source, rebuilt.outcome) == ("rebuild", "applied")
        assert rebuilt.revision == change.revision
        assert rebuilt.event_id == f"{change.event_id}:{change.transaction_id}"
        assert rebuilt.reason.startswith("re-derived from its stored events by a rebuild: ")
        assert "transaction ACTIVE → COMPLETED" in rebuilt.reason
        assert rebuilt.kinds == change.kinds
        assert rebuilt.diff == change.diff
        assert not rebuilt.body_erased
        untouched = await store.transaction_events(
            erased["expect"]["transaction_id"], 0, 100, bodies=False
        )
        assert {e.source for e in untouched} == {"grpc"}

        # Resuming from before the rebuild: the change comes as any other.
        hub = ChangeHub(store)
        where = WatchFilter(order_id=next(iter(fixed["expect"]["orders"])))
        replayed = hub.watch(where, before)
        assert (await anext(replayed)).revision == change.revision
        await replayed.aclose()

        if replica is not None and watching is not None:
            async with asyncio.timeout(30):
                while not any(getattr(e, "revision", 0) == change.revision for e in live[1:]):
                    await asyncio.sleep(0.02)
            watching.cancel()
            feeding.cancel()
            await asyncio.gather(watching, feeding, return_exceptions=True)
            await replica.close()
        await store.close()


# -- the command, on a SQLite file ----------------------------------------------------------------


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "transaction_service", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_rebuild_command_reports_changed_and_incomplete_transactions(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    fixed, erased, untouched = (with_fresh_ids(REDRAW) for _ in range(3))

    async def prepare() -> None:
        store = SqliteStore(db, synchronous="NORMAL")
        await store.open()
        ingestor = Ingestor(CommitPath(store))
        ingestor.start()
        for run in (erased, fixed, untouched):
            for d in run["deliveries"]:
                await ingestor.ingest(
                    decode_delivery(d["svix_id"], payload=d["body"], max_body_bytes=LIMIT)
                )
            if run is erased:
                await store.erase_bodies(datetime.now(UTC) + timedelta(days=1))
        await ingestor.stop()
        for run in (fixed, erased):
            txn_id = run["expect"]["transaction_id"]
            await overwrite(store, str(db), txn_id, await old_rule_state(run["deliveries"]))
        await store.close()

    run_sync(prepare())
    result = cli("rebuild", "--db", str(db), "--batch-size", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("rebuilt 3 transactions: 1 changed (revisions ")
    assert lines[0].endswith("1 unchanged")
    assert lines[1].startswith("1 could not be fully re-derived")
    with sqlite3.connect(db) as conn:
        (event_id, kinds), *_ = conn.execute(
            "SELECT event_id, kinds FROM changes ORDER BY revision DESC LIMIT 1"
        )
    assert event_id.startswith(REBUILD_EVENT_PREFIX)
    assert "transaction_completed" in kinds.split(",")
    # Run again: nothing left to change.
    again = cli("rebuild", "--db", str(db), cwd=tmp_path)
    assert again.stdout.startswith("rebuilt 3 transactions: 0 changed, 0 changed only")


def test_rebuild_command_on_a_sqlite_file_in_use_says_to_stop_the_service(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    # The lock a running server holds on its SQLite file (see SqliteStore._take_lock).
    with open(f"{db}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = cli("rebuild", "--db", str(db), cwd=tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert "is in use by another transaction-service process" in line
    assert line.endswith("(on SQLite, rebuild runs with the service stopped)")


def test_stored_bodies_replay_in_both_formats() -> None:
    """Struct bodies are stored as canonical JSON and raw bodies byte for byte; both replay to
    the knowledge ingest made of them."""
    run = with_fresh_ids(REDRAW)

    async def go() -> tuple[Any, Any]:
        store = MemoryStore()
        for i, d in enumerate(run["deliveries"]):
            if i % 2:
                raw = decode_delivery(
                    d["svix_id"], payload_json=json.dumps(d["body"]), max_body_bytes=LIMIT
                )
            else:
                raw = delivery(d["svix_id"], d["body"])
            await commit(store, [raw])
        events = await store.replay_events([run["expect"]["transaction_id"]])
        return events, await rebuild(store, CommitPath(store))

    events, report = asyncio.run(go())
    formats = {e.body_format for e in next(iter(events.values()))}
    assert formats == {"json", "struct"}
    assert report.count(RebuildOutcome.UNCHANGED) == 1
