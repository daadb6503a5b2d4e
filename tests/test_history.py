"""Why is a transaction in its state: the delivery history (ListTransactionEvents), as-of reads
(GetTransaction with a revision) and the diff of every change, in process on both stores; the
`history` command against a real server; and an existing database upgraded in place."""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from tests.conftest import SCENARIOS, database
from tests.harness import Running, error_info, ingest, loopback_settings, violated_fields
from tests.scenario_tools import with_fresh_ids
from tests.test_watch import read_until
from transaction_service.app import open_store
from transaction_service.config import Settings
from transaction_service.domain.diff import ORDER_FIELDS, TRANSACTION_FIELDS, diff_views
from transaction_service.domain.explain import MAX_REASON_LENGTH, applied_reason
from transaction_service.domain.state import OrderView, TransactionStatus, TransactionView
from transaction_service.server import TransactionService
from transaction_service.store import postgres as postgres_store
from transaction_service.store import sqlite as sqlite_store
from transaction_service.store.base import HistoryEvent, Store
from transaction_service.store.memory import MemoryStore
from transaction_service.store.sqlite import SqliteStore, migrations
from transaction_service.usecases.commit import CommitPath
from transaction_service.usecases.history import Lookup, state_at
from transaction_service.usecases.ingest import Ingestor, decode_delivery
from transactions.v1 import transactions_pb2 as pb
from transactions.v1 import transactions_pb2_grpc as pb_grpc

REDRAW = next(s for s in SCENARIOS if s["scenario"] == "redraw_completed")
INGEST_TOKEN = "ingest-token-0123456789"
READ_TOKEN = "read-token-0123456789"
ROOT = Path(__file__).resolve().parent.parent


async def history(
    stub: pb_grpc.TransactionServiceStub,
    metadata: Sequence[tuple[str, str]] = (),
    **request: Any,
) -> list[pb.ListTransactionEventsResponse]:
    """Every page of a transaction's history."""
    pages = []
    token = ""
    while True:
        page = await stub.ListTransactionEvents(
            pb.ListTransactionEventsRequest(page_token=token, **request), metadata=metadata
        )
        pages.append(page)
        token = page.next_page_token
        if not token:
            return pages


def entries(pages: Sequence[pb.ListTransactionEventsResponse]) -> list[pb.TransactionEvent]:
    return [event for page in pages for event in page.events]


# -- the history ---------------------------------------------------------------------------------


async def test_the_history_explains_each_delivery_in_arrival_order(api: Running) -> None:
    """The redraw fixture out of order, a provider re-send under a new id (STALE) and a Svix
    retry (DUPLICATE): every delivery is listed once, in arrival order, with what it claimed,
    its outcome, the reason in words and its revision; the retry is counted on its delivery."""
    d = REDRAW["deliveries"]
    expect = REDRAW["expect"]
    arrivals = [d[0], d[2], d[1], d[3], d[5], d[4]]
    answers = [await ingest(api, x["svix_id"], x["body"]) for x in arrivals]
    resent = await ingest(api, "msg_provider_resend", d[5]["body"])
    retry = await ingest(api, d[2]["svix_id"], d[2]["body"])
    assert (resent.outcome, retry.outcome) == (pb.INGEST_OUTCOME_STALE, pb.INGEST_OUTCOME_DUPLICATE)

    pages = await history(api.stub, order_id=expect["redraw_order_id"])
    events = entries(pages)
    assert pages[0].transaction_id == expect["transaction_id"]
    assert [e.event_id for e in events] == [x["svix_id"] for x in arrivals] + [
        "msg_provider_resend"
    ]
    assert [e.outcome for e in events] == [a.outcome for a in answers] + [resent.outcome]
    assert [e.revision for e in events] == [a.revision for a in answers] + [0]
    times = [e.received_at.ToDatetime() for e in events]
    assert times == sorted(times)
    by_id = {e.event_id: e for e in events}

    first = by_id[d[0]["svix_id"]]
    assert first.source == pb.EVENT_SOURCE_GRPC
    assert first.event_type == "labtest.order.created"
    assert first.order_id == expect["initial_order_id"]
    assert first.claimed_status == "received.walk_in_test.ordered"
    assert first.claimed_transaction_status == "active"
    assert first.provider_time.ToJsonString() == "2026-03-01T10:00:00Z"
    assert first.reason.startswith("new transaction")
    assert list(first.kinds) == [pb.CHANGE_KIND_TRANSACTION_CREATED]
    assert first.digest
    assert not first.body_json
    assert not first.body_erased

    # The late `requisition_created` of the initial order: older than what was known then.
    late = by_id[d[1]["svix_id"]]
    assert late.outcome == pb.INGEST_OUTCOME_STALE
    assert late.reason == (
        f"older than order {expect['initial_order_id'][:8]}…'s `redraw_available` at "
        "2026-03-06T15:00:00Z"
    )
    assert not late.kinds
    assert not late.HasField("diff")
    assert "older than" in by_id[d[4]["svix_id"]].reason

    resend = by_id["msg_provider_resend"]
    assert resend.reason.startswith("a re-send: the same body was taken in before")
    assert "`completed` at 2026-03-12T09:00:00Z" in resend.reason

    # The Svix retry is no entry of its own: a count and a time on the delivery it repeats.
    redraw_available = by_id[d[2]["svix_id"]]
    assert redraw_available.duplicate_count == 1
    assert redraw_available.last_duplicate_at.ToDatetime() >= times[-1]
    assert "`ordered` → `redraw_available`" in redraw_available.reason
    assert "redraw available" in redraw_available.reason
    assert all(e.duplicate_count == 0 for e in events if e is not redraw_available)

    completing = by_id[d[5]["svix_id"]]
    assert "transaction ACTIVE → COMPLETED" in completing.reason
    assert pb.CHANGE_KIND_TRANSACTION_COMPLETED in completing.kinds
    assert "status" in completing.diff.changed_fields.paths
    assert completing.diff.previous.status == pb.TRANSACTION_STATUS_ACTIVE

    # The same history by the transaction's own id; every reason within its bound.
    same = entries(await history(api.stub, transaction_id=expect["transaction_id"]))
    assert same == events
    assert all(0 < len(e.reason) <= MAX_REASON_LENGTH for e in events)


async def test_history_errors(api: Running) -> None:
    d = REDRAW["deliveries"][0]
    await ingest(api, d["svix_id"], d["body"])
    order_id = REDRAW["expect"]["initial_order_id"]
    cases: list[tuple[pb.ListTransactionEventsRequest, grpc.StatusCode, str]] = [
        (pb.ListTransactionEventsRequest(), grpc.StatusCode.INVALID_ARGUMENT, "lookup"),
        (
            pb.ListTransactionEventsRequest(order_id=" "),
            grpc.StatusCode.INVALID_ARGUMENT,
            "order_id",
        ),
        (
            pb.ListTransactionEventsRequest(order_id=order_id, page_size=1001),
            grpc.StatusCode.INVALID_ARGUMENT,
            "page_size",
        ),
        (
            pb.ListTransactionEventsRequest(order_id=order_id, page_token="nonsense"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "page_token",
        ),
        (pb.ListTransactionEventsRequest(order_id="unknown"), grpc.StatusCode.NOT_FOUND, ""),
    ]
    for request, code, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await api.stub.ListTransactionEvents(request)
        assert caught.value.code() == code, request
        if field:
            assert violated_fields(caught.value) == [field]


async def test_a_transaction_with_thousands_of_deliveries_pages(api: Running) -> None:
    """2,400 deliveries of one order: pages of at most page_size (1,000 at most, docs/limits.md)
    list every one once, in arrival order; with bodies, pages end early to fit a message; a
    token is bound to its lookup."""
    run = with_fresh_ids(REDRAW)
    order_id = run["expect"]["initial_order_id"]
    base = run["deliveries"][0]["body"]
    count = 2400
    deliveries = []
    for i in range(count):
        body = copy.deepcopy(base)
        # Distinct bodies: each a later update (applied) or, every other one, a lab detail.
        body["data"]["updated_at"] = (
            datetime(2026, 3, 1, 10, tzinfo=UTC) + timedelta(seconds=i)
        ).isoformat()
        body["data"]["sample_id"] = f"s{i // 2}"
        body["data"]["padding"] = "x" * 2000
        deliveries.append(decode_delivery(f"msg_{i}", payload=body, max_body_bytes=1 << 20))
    ingestor = api.service.ingestor
    for start in range(0, count, 200):
        await asyncio.gather(*(ingestor.ingest(d) for d in deliveries[start : start + 200]))

    pages = await history(api.stub, order_id=order_id, page_size=1000)
    assert [len(p.events) for p in pages] == [1000, 1000, 400]
    assert [e.event_id for e in entries(pages)] == [f"msg_{i}" for i in range(count)]
    default = await history(api.stub, order_id=order_id)
    assert len(default) == 24
    assert all(len(p.events) == 100 for p in default)

    bodies = await history(api.stub, order_id=order_id, page_size=1000, include_bodies=True)
    # 2,400 bodies of about 3 kB do not fit one message (half of 4 MiB): more, smaller pages.
    assert len(bodies) > 3
    assert all(len(p.events) < 1000 for p in bodies[:-1])
    listed = entries(bodies)
    assert [e.event_id for e in listed] == [f"msg_{i}" for i in range(count)]
    assert json.loads(listed[7].body_json)["data"]["sample_id"] == "s3"

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.stub.ListTransactionEvents(
            pb.ListTransactionEventsRequest(
                transaction_id=run["expect"]["transaction_id"], page_token=pages[0].next_page_token
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "other lookup" in caught.value.details()


async def test_after_the_body_retention_the_history_keeps_every_row_but_no_body(
    api: Running,
) -> None:
    run = with_fresh_ids(REDRAW)
    for d in run["deliveries"]:
        await ingest(api, d["svix_id"], d["body"])
    order_id = run["expect"]["redraw_order_id"]
    before = entries(await history(api.stub, order_id=order_id, include_bodies=True))
    assert all(json.loads(e.body_json)["data"]["id"] for e in before)

    erased = await api.service.store.erase_bodies(datetime.now(UTC) + timedelta(hours=1))
    assert erased == len(before)

    after = entries(await history(api.stub, order_id=order_id, include_bodies=True))
    assert [e.event_id for e in after] == [e.event_id for e in before]
    for old, new in zip(before, after, strict=True):
        assert new.body_erased
        assert not new.body_json
        old.ClearField("body_json")
        new.ClearField("body_erased")
        assert new == old  # outcome, reason, claims, revision, digest, diff: all kept


@pytest.fixture
async def guarded(tmp_path: Path) -> AsyncIterator[pb_grpc.TransactionServiceStub]:
    """A server that needs tokens: INGEST_TOKEN and READ_TOKEN."""
    settings = loopback_settings(
        str(tmp_path / "guarded.db"), ingest_tokens=[INGEST_TOKEN], read_tokens=[READ_TOKEN]
    )
    service = TransactionService(settings)
    port = await service.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield pb_grpc.TransactionServiceStub(channel)
    await service.stop()


async def test_a_read_token_gets_no_body(guarded: pb_grpc.TransactionServiceStub) -> None:
    """A read token reads the history, but bodies (patient data) only go to an ingest token."""
    d = REDRAW["deliveries"][0]
    ingest_token = [("authorization", f"Bearer {INGEST_TOKEN}")]
    read_token = [("authorization", f"Bearer {READ_TOKEN}")]
    request = pb.IngestEventRequest(event_id=d["svix_id"], payload_json=json.dumps(d["body"]))
    await guarded.IngestEvent(request, metadata=ingest_token)
    order_id = REDRAW["expect"]["initial_order_id"]

    (read,) = entries(await history(guarded, read_token, order_id=order_id))
    assert read.reason
    assert read.claimed_status
    assert not read.body_json
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await guarded.ListTransactionEvents(
            pb.ListTransactionEventsRequest(order_id=order_id, include_bodies=True),
            metadata=read_token,
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert READ_TOKEN not in caught.value.details()

    (full,) = entries(await history(guarded, ingest_token, order_id=order_id, include_bodies=True))
    assert json.loads(full.body_json) == d["body"]


# -- as-of reads ---------------------------------------------------------------------------------


async def test_as_of_reads_at_every_revision_equal_what_the_watch_replay_gave(
    api: Running,
) -> None:
    """Two transactions interleaved, one of them a legacy order folded into its real
    transaction later: GetTransaction at every revision, by transaction id and by order id,
    gives the state of the last change at or below it that the watch replay gave, and NOT_FOUND
    before the transaction existed."""
    redraw, cancelled = with_fresh_ids(REDRAW), with_fresh_ids(SCENARIOS[0])
    legacy = copy.deepcopy(redraw["deliveries"][0])
    del legacy["body"]["data"]["order_transaction"]
    legacy["svix_id"] += "-legacy"
    deliveries = [legacy, *redraw["deliveries"]]
    mixed = [x for pair in zip(deliveries, cancelled["deliveries"], strict=False) for x in pair]
    mixed += deliveries[len(cancelled["deliveries"]) :]
    for d in mixed:
        await ingest(api, d["svix_id"], d["body"])
    head = await api.service.store.head_revision()

    for lookup in (
        {"transaction_id": redraw["expect"]["transaction_id"]},
        {"order_id": redraw["expect"]["initial_order_id"]},
        {"order_id": redraw["expect"]["redraw_order_id"]},
        {"transaction_id": cancelled["expect"]["transaction_id"]},
    ):
        replay = await replayed(api, lookup)
        assert replay, lookup
        for revision in range(1, head + 1):
            request = pb.GetTransactionRequest(revision=revision, **lookup)
            known = [c for c in replay if c.revision <= revision]
            if not known:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await api.stub.GetTransaction(request)
                assert caught.value.code() == grpc.StatusCode.NOT_FOUND, (lookup, revision)
                continue
            answer = await api.stub.GetTransaction(request)
            assert answer.transaction == known[-1].transaction, (lookup, revision)
            assert answer.revision == head


async def replayed(api: Running, lookup: dict[str, str]) -> list[pb.TransactionChange]:
    """Every change a watch of `lookup` replays from the start of the log (up to the current
    state's revision)."""
    last = (await api.stub.GetTransaction(pb.GetTransactionRequest(**lookup))).transaction.revision
    call = api.stub.WatchTransaction(
        pb.WatchTransactionRequest(start_revision=0, batch_changes=False, **lookup)
    )
    messages = await read_until(
        call, lambda ms: ms[-1].WhichOneof("event") == "change" and ms[-1].change.revision >= last
    )
    return [m.change for m in messages if m.WhichOneof("event") == "change"]


async def test_as_of_reads_outside_the_change_log_are_refused_as_watches_are(
    api: Running,
) -> None:
    run = with_fresh_ids(REDRAW)
    for d in run["deliveries"]:
        await ingest(api, d["svix_id"], d["body"])
    transaction_id = run["expect"]["transaction_id"]
    current = await api.stub.GetTransaction(pb.GetTransactionRequest(transaction_id=transaction_id))
    last = current.transaction.revision
    compacted = await api.service.store.trim_changes(datetime.now(UTC) + timedelta(hours=1))
    assert compacted == last

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.stub.GetTransaction(
            pb.GetTransactionRequest(transaction_id=transaction_id, revision=last - 1)
        )
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
    info = error_info(caught.value)
    assert info.reason == "REVISION_COMPACTED"
    assert info.metadata["compacted_revision"] == str(compacted)
    # A state unchanged since is still known, whatever the log keeps.
    same = await api.stub.GetTransaction(
        pb.GetTransactionRequest(order_id=run["expect"]["redraw_order_id"], revision=last)
    )
    assert same.transaction == current.transaction

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.stub.GetTransaction(
            pb.GetTransactionRequest(transaction_id=transaction_id, revision=last + 1)
        )
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert error_info(caught.value).reason == "REVISION_IN_FUTURE"
    assert error_info(caught.value).metadata["head_revision"] == str(last)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.stub.GetTransaction(
            pb.GetTransactionRequest(transaction_id=transaction_id, revision=-1)
        )
    assert violated_fields(caught.value) == ["revision"]
    as_of = pb.GetTransactionRequest(transaction_id=transaction_id, revision=1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.stub.BatchGetTransactions(pb.BatchGetTransactionsRequest(lookups=[as_of]))
    assert violated_fields(caught.value) == ["lookups[0].revision"]


# -- diffs ---------------------------------------------------------------------------------------


def test_diff_field_names_are_the_protos() -> None:
    """A diff names fields as the proto does, so a FieldMask of them is valid."""
    assert set(TRANSACTION_FIELDS) <= set(pb.Transaction.DESCRIPTOR.fields_by_name)
    assert set(ORDER_FIELDS) <= set(pb.Order.DESCRIPTOR.fields_by_name)
    assert FieldMask(paths=list(TRANSACTION_FIELDS)).IsValidForDescriptor(pb.Transaction.DESCRIPTOR)
    assert FieldMask(paths=list(ORDER_FIELDS)).IsValidForDescriptor(pb.Order.DESCRIPTOR)


def previous_state(change: pb.TransactionChange, before: pb.Transaction) -> pb.Transaction:
    """`before` rebuilt from `change` alone: its transaction, with every changed field (and
    order) taken back to its previous value."""
    rebuilt = pb.Transaction()
    rebuilt.CopyFrom(change.transaction)
    diff = change.diff
    scalars = [p for p in diff.changed_fields.paths if p != "orders"]
    for name in scalars:
        rebuilt.ClearField(name)
    FieldMask(paths=scalars).MergeMessage(diff.previous, rebuilt, replace_message_field=True)
    orders = {o.id: o for o in rebuilt.orders}
    for entry in diff.orders:
        if entry.added:
            del orders[entry.order_id]
        elif entry.removed:
            orders[entry.order_id] = entry.previous
        else:
            order = orders[entry.order_id]
            for name in entry.changed_fields.paths:
                order.ClearField(name)
            entry.changed_fields.MergeMessage(entry.previous, order, replace_message_field=True)
    rebuilt.ClearField("orders")
    rebuilt.orders.extend(
        sorted(orders.values(), key=lambda o: [x.id for x in before.orders].index(o.id))
    )
    rebuilt.revision = before.revision
    return rebuilt


async def test_every_change_says_what_changed_live_and_replayed_alike(api: Running) -> None:
    """Each change's diff takes its transaction back to the previous change's, exactly; the
    first lists what the new transaction has set; the live stream and a replay from the log
    send the same diff; a watcher reacts to `current_order_id` without comparing states."""
    run = with_fresh_ids(REDRAW)
    transaction_id = run["expect"]["transaction_id"]
    call = api.stub.WatchTransaction(pb.WatchTransactionRequest(transaction_id=transaction_id))
    assert (await call.read()).WhichOneof("event") == "progress"
    applied = 0
    for d in [run["deliveries"][i] for i in (0, 2, 1, 3, 5, 4)]:
        answer = await ingest(api, d["svix_id"], d["body"])
        applied += answer.outcome == pb.INGEST_OUTCOME_APPLIED
    live: list[pb.TransactionChange] = []
    while len(live) < applied:
        live.append((await call.read()).change)
    call.cancel()
    replay = await replayed(api, {"transaction_id": transaction_id})
    assert replay == live

    first = live[0].diff
    assert not first.HasField("previous")
    assert {"id", "status", "orders", "initial_order_id", "current_order_id"} <= set(
        first.changed_fields.paths
    )
    assert [(o.order_id, o.added) for o in first.orders] == [
        (run["expect"]["initial_order_id"], True)
    ]
    for before, change in itertools.pairwise(live):
        assert previous_state(change, before.transaction) == before.transaction
    switched = [c for c in live[1:] if "current_order_id" in c.diff.changed_fields.paths]
    assert [c.diff.previous.current_order_id for c in switched] == [
        run["expect"]["initial_order_id"]
    ]
    assert [c.transaction.current_order_id for c in switched] == [run["expect"]["redraw_order_id"]]


# -- an existing database, upgraded in place -----------------------------------------------------


def without_history(real: Callable[[str], list[tuple[int, str, str]]]) -> Any:
    """`migrations` as they were before the history's: the schema existing databases have."""
    return lambda dialect: [m for m in real(dialect) if "history" not in m[1]]


async def filled(db: str, deliveries: Sequence[dict[str, Any]]) -> None:
    """`db` at the current schema, with what ingesting the deliveries writes."""
    store = open_store(Settings(db=db, sqlite_synchronous="NORMAL"))
    await store.open()
    ingestor = Ingestor(CommitPath(store))
    ingestor.start()
    for d in deliveries:
        await ingestor.ingest(
            decode_delivery(d["svix_id"], payload=d["body"], max_body_bytes=1 << 20)
        )
    await ingestor.stop()
    await store.close()


async def table_columns(db: str, table: str) -> list[str]:
    if db.startswith("postgresql://"):
        conn = await asyncpg.connect(db)
        try:
            rows = await conn.fetch(
                "SELECT column_name FROM information_schema.columns WHERE"
                " table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
                table,
            )
        finally:
            await conn.close()
        return [r[0] for r in rows]
    with sqlite3.connect(db) as conn:
        found = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
    conn.close()
    return found


async def copy_rows(source: str, target: str) -> None:
    """The rows of `source` into `target`, in the columns `target` has (its older schema)."""
    tables = ("events", "changes", "transactions", "order_transactions")
    columns = {t: ", ".join(await table_columns(target, t)) for t in tables}
    if source.startswith("postgresql://"):
        schema = parse_qs(urlsplit(source).query)["search_path"][0]
        conn = await asyncpg.connect(target)
        try:
            for table in tables:
                await conn.execute(
                    f"INSERT INTO {table} ({columns[table]}) SELECT {columns[table]}"
                    f" FROM {schema}.{table}"
                )
            await conn.execute(
                f"UPDATE meta SET value = s.value FROM {schema}.meta s WHERE s.key = meta.key"
            )
            await conn.execute("SELECT setval('events_seq_seq', (SELECT max(seq) FROM events))")
        finally:
            await conn.close()
        return
    with sqlite3.connect(target) as conn:
        conn.execute("ATTACH DATABASE ? AS source", (source,))
        for table in tables:
            conn.execute(
                f"INSERT INTO main.{table} ({columns[table]}) SELECT {columns[table]}"
                f" FROM source.{table}"
            )
        conn.execute(
            "UPDATE main.meta SET value = (SELECT value FROM source.meta s WHERE s.key = meta.key)"
        )
    conn.close()


async def test_an_existing_database_upgrades_in_place(
    tmp_path: Path, store_kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database of the schema before the history, with deliveries in it, is migrated when
    the service starts: its deliveries are listed (with outcome and revision, no reason), a
    retry of one is counted on it, later deliveries are explained, its changes replay without
    a diff and later ones with, and as-of reads reach its old states."""
    run = with_fresh_ids(REDRAW)
    d = run["deliveries"]
    with database(store_kind, tmp_path / "new") as new, database(store_kind, tmp_path) as old:
        await filled(new, d[:4])
        real = migrations
        monkeypatch.setattr(sqlite_store, "migrations", without_history(real))
        monkeypatch.setattr(postgres_store, "migrations", without_history(real))
        before = open_store(Settings(db=old))
        await before.open()
        await before.close()
        assert "reason" not in await table_columns(old, "events")
        await copy_rows(new, old)
        monkeypatch.undo()

        service = TransactionService(loopback_settings(old))
        port = await service.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                api = Running(service, pb_grpc.TransactionServiceStub(channel), old)
                await upgraded_database_works(api, run)
        finally:
            await service.stop()


async def upgraded_database_works(api: Running, run: dict[str, Any]) -> None:
    d = run["deliveries"]
    order_id = run["expect"]["initial_order_id"]
    kept = entries(await history(api.stub, order_id=order_id))
    assert [e.event_id for e in kept] == [x["svix_id"] for x in d[:4]]
    assert [e.revision for e in kept] == [1, 2, 3, 4]
    assert all(e.outcome == pb.INGEST_OUTCOME_APPLIED for e in kept)
    assert not any(e.reason or e.claimed_status or e.HasField("diff") for e in kept)

    retry = await ingest(api, d[2]["svix_id"], d[2]["body"])
    assert retry.outcome == pb.INGEST_OUTCOME_DUPLICATE
    for x in d[4:]:
        await ingest(api, x["svix_id"], x["body"])
    listed = entries(await history(api.stub, order_id=order_id))
    assert [e.event_id for e in listed] == [x["svix_id"] for x in d]
    assert [e.duplicate_count for e in listed] == [0, 0, 1, 0, 0, 0]
    assert all(e.reason and e.claimed_status for e in listed[4:])

    replay = await replayed(api, {"order_id": order_id})
    assert [c.HasField("diff") for c in replay] == [False] * 4 + [True] * (len(replay) - 4)
    for change in replay:
        at = await api.stub.GetTransaction(
            pb.GetTransactionRequest(order_id=order_id, revision=change.revision)
        )
        assert at.transaction == change.transaction


async def test_the_memory_store_keeps_the_same_history_as_sqlite(tmp_path: Path) -> None:
    """The in-memory double answers the history and as-of reads as the real store does."""
    d = REDRAW["deliveries"]
    sends = [d[3], d[0], d[5], d[1], d[5], d[2], d[4]]
    sends.append({"svix_id": "msg_resend", "body": d[2]["body"]})
    stores: list[Store] = [MemoryStore(), SqliteStore(tmp_path / "h.db", synchronous="NORMAL")]
    found = []
    for store in stores:
        await store.open()
        ingestor = Ingestor(CommitPath(store), clock=lambda: datetime(2026, 11, 1, tzinfo=UTC))
        ingestor.start()
        for x in sends:
            await ingestor.ingest(
                decode_delivery(x["svix_id"], payload=x["body"], max_body_bytes=1 << 20)
            )
        await ingestor.stop()
        events = await store.transaction_events(
            REDRAW["expect"]["transaction_id"], 0, 100, bodies=True
        )
        lookup = Lookup(REDRAW["expect"]["initial_order_id"], by_order=True)
        states = [await state_at(store, lookup, r) for r in range(1, store_head(events) + 1)]
        found.append((events, states))
        await store.close()
    assert found[0] == found[1]


def store_head(events: Sequence[HistoryEvent]) -> int:
    return max(e.revision or 0 for e in events)


def test_a_reason_is_cut_to_its_bound() -> None:
    """Fifty orders joining at once make a long story: the reason stops at 300 characters."""
    orders = [
        OrderView(id=f"order-{i:04d}-{'x' * 30}", low_level_status="ordered") for i in range(50)
    ]
    after = TransactionView(id="t", status=TransactionStatus.ACTIVE, orders=orders)
    reason = applied_reason(diff_views(None, after), after)
    assert len(reason) == MAX_REASON_LENGTH
    assert reason.endswith("…")
    assert reason.startswith("new transaction t; order order-00… `ordered` added; ")
