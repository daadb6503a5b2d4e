"""Watch streams: gap-free, exactly once, resumable, bounded, and clean to cancel and shut down."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import importlib.util
import random
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.conftest import SCENARIOS
from tests.harness import Running, error_info, ingest, loopback_settings, separate_channels
from tests.scenario_tools import sampled_orders, with_fresh_ids
from transaction_service.api.wire import ChangeEncoder, Once, passthrough_serializer
from transaction_service.domain.state import ChangeKind
from transaction_service.server import TransactionService
from transaction_service.store.base import ChangeRecord
from transaction_service.usecases.ingest import decode_delivery
from transaction_service.usecases.watch import (
    Batch,
    ChangeHub,
    Progress,
    SendBudget,
    WatchFilter,
)
from transactions.v1 import transactions_pb2 as pb
from transactions.v1 import transactions_pb2_grpc as pb_grpc

DEADLINE = 60.0
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
REDRAW = next(s for s in SCENARIOS if s["scenario"] == "redraw_completed")


async def ingest_direct(
    target: Running | TransactionService, deliveries: Sequence[dict[str, Any]]
) -> None:
    """Ingest through the use case (faster than gRPC when the stream is what is under test)."""
    service = target.service if isinstance(target, Running) else target
    for d in deliveries:
        delivery = decode_delivery(d["svix_id"], payload=d["body"], max_body_bytes=1 << 20)
        await service.ingestor.ingest(delivery)


async def read_until(
    call: Any, done: Callable[[list[Any]], bool], timeout: float = DEADLINE
) -> list[Any]:
    """Messages of a stream until `done(messages)`; then the call is cancelled."""
    messages: list[Any] = []
    try:
        async with asyncio.timeout(timeout):
            async for message in call:
                messages.append(message)
                if done(messages):
                    break
    finally:
        call.cancel()
    return messages


def changes(messages: Sequence[Any]) -> list[pb.TransactionChange]:
    return [m.change for m in messages if m.WhichOneof("event") == "change"]


async def log_revisions(api: Running, where: WatchFilter | None = None) -> list[int]:
    """Revisions of the change log that `where` matches (default: all), from the store."""
    page = await api.service.store.changes_after(0, 1_000_000)
    return [c.revision for c in page.changes if where is None or where.matches(c)]


async def wait_for(condition: Callable[[], bool], timeout: float = DEADLINE) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def started_service(tmp_path: Path, **overrides: Any) -> tuple[TransactionService, int]:
    values: dict[str, Any] = {"shutdown_grace_seconds": 5}
    settings = loopback_settings(tmp_path / "watch.db", **(values | overrides))
    service = TransactionService(settings)
    return service, await service.start()


@pytest.fixture
async def channel_to(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Start a service with custom settings; yields a function returning (service, stub)."""
    started: list[tuple[TransactionService, grpc.aio.Channel]] = []

    async def start(**overrides: Any) -> tuple[TransactionService, pb_grpc.TransactionServiceStub]:
        service, port = await started_service(tmp_path, **overrides)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        started.append((service, channel))
        return service, pb_grpc.TransactionServiceStub(channel)

    yield start
    for service, channel in started:
        await channel.close()
        await service.stop()


# -- opening a watch ----------------------------------------------------------------------------


async def test_watch_opens_with_the_current_state_then_sends_later_changes(api: Running) -> None:
    d = REDRAW["deliveries"]
    first = await ingest(api, d[0]["svix_id"], d[0]["body"])
    call = api.stub.WatchTransaction(
        pb.WatchTransactionRequest(transaction_id=REDRAW["expect"]["transaction_id"])
    )
    opening = await call.read()
    assert opening.WhichOneof("event") == "current"
    assert opening.current.transaction == first.transaction
    assert opening.current.progress_revision == first.revision
    applied = await ingest(api, d[2]["svix_id"], d[2]["body"])
    message = await call.read()
    call.cancel()
    assert message.change.revision == applied.revision
    assert message.change.transaction == applied.transaction
    assert message.change.event_id == d[2]["svix_id"]
    assert message.change.order_id == d[2]["body"]["data"]["id"]
    assert pb.CHANGE_KIND_REDRAW_AVAILABLE in message.change.kinds
    assert message.change.HasField("recorded_at")


async def test_a_transaction_can_be_watched_before_its_first_webhook(api: Running) -> None:
    order_id = REDRAW["expect"]["initial_order_id"]
    call = api.stub.WatchTransaction(pb.WatchTransactionRequest(order_id=order_id))
    opening = await call.read()
    assert opening.WhichOneof("event") == "progress"
    # The redraw order's webhook names the initial order in its transaction block.
    d = REDRAW["deliveries"][3]
    applied = await ingest(api, d["svix_id"], d["body"])
    message = await call.read()
    call.cancel()
    assert message.change.revision == applied.revision
    assert list(message.change.kinds) == [
        pb.CHANGE_KIND_TRANSACTION_CREATED,
        pb.CHANGE_KIND_REDRAW_AVAILABLE,
    ]


async def test_the_feed_opens_with_progress_at_the_head_then_goes_live(api: Running) -> None:
    d = REDRAW["deliveries"]
    await ingest(api, d[0]["svix_id"], d[0]["body"])
    call = api.stub.WatchTransactions(pb.WatchTransactionsRequest())
    opening = await call.read()
    assert opening.progress.revision == 1
    await ingest(api, d[1]["svix_id"], d[1]["body"])
    message = await call.read()
    call.cancel()
    assert message.change.revision == 2


async def test_start_revision_replays_then_hands_over_to_live_without_gap_or_repeat(
    api: Running,
) -> None:
    runs = [with_fresh_ids(s) for s in SCENARIOS for _ in range(30)]
    half = len(runs) // 2
    for run in runs[:half]:
        await ingest_direct(api, run["deliveries"])
    start = (await log_revisions(api))[len(await log_revisions(api)) // 2]
    call = api.stub.WatchTransactions(pb.WatchTransactionsRequest(start_revision=start))
    # The rest is ingested while the replay is under way.
    rest = asyncio.create_task(
        ingest_direct(api, [d for r in runs[half:] for d in r["deliveries"]])
    )
    await rest
    final = (await log_revisions(api))[-1]
    messages = await read_until(
        call,
        lambda ms: (
            bool(ms) and ms[-1].WhichOneof("event") == "change" and ms[-1].change.revision == final
        ),
    )
    got = [c.revision for c in changes(messages)]
    assert got == [r for r in await log_revisions(api) if r > start]


async def test_feed_filters_by_kind_and_team(api: Running) -> None:
    runs = [with_fresh_ids(s) for s in SCENARIOS for _ in range(3)]
    for run in runs:
        await ingest_direct(api, run["deliveries"])
    head = (await log_revisions(api))[-1]
    kinds = {ChangeKind.TRANSACTION_COMPLETED, ChangeKind.TRANSACTION_CANCELLED}
    call = api.stub.WatchTransactions(
        pb.WatchTransactionsRequest(
            start_revision=0,
            kinds=[pb.CHANGE_KIND_TRANSACTION_COMPLETED, pb.CHANGE_KIND_TRANSACTION_CANCELLED],
        )
    )
    expected = await log_revisions(api, WatchFilter(kinds=frozenset(kinds)))
    assert len(expected) == len(runs)  # every scenario ends completed or cancelled, once
    messages = await read_until(call, lambda ms: len(changes(ms)) == len(expected))
    assert [c.revision for c in changes(messages)] == expected
    assert expected[-1] <= head
    team = runs[0]["deliveries"][0]["body"]["team_id"]
    by_team = await log_revisions(api, WatchFilter(team_id=team))
    call = api.stub.WatchTransactions(pb.WatchTransactionsRequest(start_revision=0, team_id=team))
    messages = await read_until(call, lambda ms: len(changes(ms)) == len(by_team))
    assert all(c.transaction.team_id == team for c in changes(messages))


async def test_idle_streams_get_progress_messages(channel_to: Callable[..., Any]) -> None:
    _, stub = await channel_to(watch_progress_seconds=0.05)
    call = stub.WatchTransactions(pb.WatchTransactionsRequest())
    messages = await read_until(call, lambda ms: len(ms) >= 3)
    assert [m.WhichOneof("event") for m in messages] == ["progress"] * 3
    assert {m.progress.revision for m in messages} == {0}


# -- exactly once, whatever the delivery order -------------------------------------------------


async def test_redraw_completed_and_cancelled_are_each_reported_once_for_sampled_delivery_orders(
    api: Running,
) -> None:
    """Sampled delivery orders of every scenario (sampled_orders) on each store; test_plan.py
    checks the change log of every order of every scenario on the in-memory store."""
    expected: dict[ChangeKind, set[str]] = {k: set() for k in ChangeKind}
    for scenario in SCENARIOS:
        n = len(scenario["deliveries"])
        for i, order in sampled_orders(n, scenario["scenario"]):
            run = with_fresh_ids(scenario, tag=f"{scenario['scenario']}-{i}")
            await ingest_direct(api, [run["deliveries"][j] for j in order])
            txn = run["expect"]["transaction_id"]
            if run["expect"]["redraw_available"]:
                expected[ChangeKind.REDRAW_AVAILABLE].add(txn)
            status = run["expect"]["status"].removeprefix("TRANSACTION_STATUS_")
            expected[ChangeKind(f"transaction_{status.lower()}")].add(txn)
    for kind, wire in [
        (ChangeKind.REDRAW_AVAILABLE, pb.CHANGE_KIND_REDRAW_AVAILABLE),
        (ChangeKind.TRANSACTION_COMPLETED, pb.CHANGE_KIND_TRANSACTION_COMPLETED),
        (ChangeKind.TRANSACTION_CANCELLED, pb.CHANGE_KIND_TRANSACTION_CANCELLED),
    ]:
        want = expected[kind]
        call = api.stub.WatchTransactions(
            pb.WatchTransactionsRequest(start_revision=0, kinds=[wire])
        )
        count = len(want)
        messages = await read_until(call, lambda ms, n=count: len(changes(ms)) == n)
        reported = [c.transaction.id for c in changes(messages)]
        # Once per transaction: no transaction twice, none missing.
        assert sorted(reported) == sorted(want), kind
        # And no more of them than that in the log.
        assert len(await log_revisions(api, WatchFilter(kinds=frozenset({kind})))) == len(want)


async def test_subscribers_that_drop_and_resume_see_every_change_once_in_order(
    channel_to: Callable[..., Any],
) -> None:
    """Ingest runs concurrently while subscribers (feed and single-transaction) disconnect at
    random points and resume from the last revision they saw."""
    # Idle streams report progress quickly, so subscribers notice when they are done.
    service, stub = await channel_to(watch_progress_seconds=0.05)
    api = Running(service, stub, service.settings.db)
    rng = random.Random(7)
    runs = [with_fresh_ids(s) for s in SCENARIOS for _ in range(25)]
    deliveries = [d for r in runs for d in r["deliveries"]]
    finished = asyncio.Event()

    async def produce() -> None:
        for k in range(0, len(deliveries), 5):
            await ingest_direct(api, deliveries[k : k + 5])
            await asyncio.sleep(0)
        finished.set()

    async def subscribe(make_request: Callable[[int | None], Any], watch: Any) -> list[int]:
        seen: list[int] = []
        last: int | None = 0
        while True:
            call = watch(make_request(last))
            budget = rng.randint(1, 15)
            try:
                async for message in call:
                    event = message.WhichOneof("event")
                    if event == "change":
                        seen.append(message.change.revision)
                        last = message.change.revision
                    elif event == "progress":
                        last = max(last or 0, message.progress.revision)
                        if finished.is_set() and last >= (await log_revisions(api))[-1]:
                            return seen
                    budget -= 1
                    if budget == 0:
                        break  # drop the connection at a random point
            finally:
                call.cancel()

    def feed_request(start: int | None) -> pb.WatchTransactionsRequest:
        return pb.WatchTransactionsRequest(start_revision=start)

    def one_request(txn: str) -> Callable[[int | None], pb.WatchTransactionRequest]:
        return lambda start: pb.WatchTransactionRequest(transaction_id=txn, start_revision=start)

    feeds = [subscribe(feed_request, api.stub.WatchTransactions) for _ in range(4)]
    watched = [r["expect"]["transaction_id"] for r in runs[::10]]
    singles = [subscribe(one_request(t), api.stub.WatchTransaction) for t in watched]
    results = await asyncio.gather(produce(), *feeds, *singles)
    everything = await log_revisions(api)
    for seen in results[1 : 1 + len(feeds)]:
        assert seen == everything
    for txn, seen in zip(watched, results[1 + len(feeds) :], strict=True):
        assert seen == await log_revisions(api, WatchFilter(transaction_id=txn))


async def test_a_thousand_subscribers_all_receive_every_change(api: Running) -> None:
    channels = separate_channels(f"127.0.0.1:{api.service.port}", 1000)
    stubs = [pb_grpc.TransactionServiceStub(c) for c in channels]
    calls = [
        stubs[i % len(stubs)].WatchTransactions(pb.WatchTransactionsRequest()) for i in range(1000)
    ]
    try:
        # Every stream has opened (its first message is progress at the head).
        openings = await asyncio.gather(*(c.read() for c in calls))
        assert {m.progress.revision for m in openings} == {0}
        run = with_fresh_ids(REDRAW)
        await ingest_direct(api, run["deliveries"])
        expected = await log_revisions(api)

        async def drain(call: Any) -> list[int]:
            got: list[int] = []
            while len(got) < len(expected):
                message = await call.read()
                if message.WhichOneof("event") == "change":
                    got.append(message.change.revision)
            return got

        async with asyncio.timeout(120):
            received = await asyncio.gather(*(drain(c) for c in calls))
        assert all(got == expected for got in received)
        assert api.service.hub.subscriber_count == 1000
    finally:
        for call in calls:
            call.cancel()
        for channel in channels:
            await channel.close()
    await wait_for(lambda: api.service.hub.subscriber_count == 0)


# -- falling behind, compaction, cancellation, shutdown -----------------------------------------


async def test_a_subscriber_that_falls_behind_catches_up_from_the_log(tmp_path: Path) -> None:
    """Engine level, no transport: a subscriber not read from while hundreds of changes are
    published holds at most `queue_size` of them (a feed holds none of its own: it reads the
    hub's shared buffer of the last `queue_size`-odd changes), then gets every one, once, in
    order, from the change log."""
    service, _ = await started_service(tmp_path, watch_queue_size=8)
    hub: ChangeHub = service.hub
    slow = hub.watch(WatchFilter(), None)
    try:
        assert await anext(slow) == Progress(0)
        peak = 0
        for run in [with_fresh_ids(s) for s in SCENARIOS for _ in range(30)]:
            await ingest_direct(service, run["deliveries"])
            peak = max(peak, *(s.queued for s in hub.subscriptions()))
        assert peak <= 8
        assert len(hub._recent) <= 2 * 8
        (subscription,) = hub.subscriptions()
        metric = service.app.metrics.registry.get_sample_value
        assert metric("transaction_service_watch_catch_ups_total") == 0
        assert metric("transaction_service_watch_streams") == 1
        expected = [c.revision for c in (await service.store.changes_after(0, 10**6)).changes]
        got: list[int] = []
        while len(got) < len(expected):
            event = await anext(slow)
            if isinstance(event, ChangeRecord):
                got.append(event.revision)
        assert got == expected
        # It fell behind what the hub keeps, and caught up from the log: counted for /metrics.
        assert subscription.overflows > 0
        assert metric("transaction_service_watch_overflows_total") == subscription.overflows
        assert metric("transaction_service_watch_catch_ups_total") >= 1
        await slow.aclose()
        assert hub.subscriber_count == 0
        assert metric("transaction_service_watch_streams") == 0
    finally:
        await service.stop()


async def test_sqlite_a_commit_reported_failed_whose_rows_landed_is_still_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """COMMIT reports an error (or its write is cancelled) once SQLite has written the rows: the
    delivery is refused, yet its change is in the log at a revision this process never
    published. The next commit follows that gap: a watch gets both changes, in order, rather
    than nothing from then on."""
    import sqlite3

    from transaction_service.errors import ServiceError

    service, _ = await started_service(tmp_path)
    watch = service.hub.watch(WatchFilter(), None)
    try:
        assert await anext(watch) == Progress(0)
        first, second = (with_fresh_ids(s)["deliveries"][0] for s in SCENARIOS[:2])
        store = service.store
        writer = store._writer  # type: ignore[attr-defined]
        execute = writer.execute

        async def commit_then_fail(sql: str, *args: Any) -> Any:
            result = await execute(sql, *args)
            if sql == "COMMIT":
                raise sqlite3.OperationalError("disk I/O error")
            return result

        monkeypatch.setattr(writer, "execute", commit_then_fail)
        with pytest.raises(ServiceError):
            await ingest_direct(service, [first])
        monkeypatch.undo()
        await ingest_direct(service, [second])
        assert await store.head_revision() == 2
        got: list[int] = []
        async with asyncio.timeout(DEADLINE):
            while len(got) < 2:
                event = await anext(watch)
                if isinstance(event, ChangeRecord):
                    got.append(event.revision)
        assert got == [1, 2]
    finally:
        await watch.aclose()
        await service.stop()


async def test_a_watch_that_replayed_the_log_holds_none_of_it_while_it_waits(
    tmp_path: Path,
) -> None:
    """Thousands of watches wait at once, many of them resumed from a revision: once a watch
    has sent what it replayed, it waits holding none of the changes it read (they were a batch
    of up to 500 records)."""
    service, _ = await started_service(tmp_path)
    hub: ChangeHub = service.hub
    try:
        await ingest_direct(service, with_fresh_ids(REDRAW)["deliveries"])
        watch = hub.watch(WatchFilter(), 0, batch=True)
        replayed = await anext(watch)
        assert isinstance(replayed, Batch)
        del replayed
        waiting = asyncio.ensure_future(anext(watch))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # it waits for the next change
        held = watch.ag_frame.f_locals  # type: ignore[attr-defined]
        assert not any(isinstance(v, ChangeRecord | Batch) for v in held.values())
        assert not any(
            isinstance(v, list | tuple) and v and isinstance(v[0], ChangeRecord)
            for v in held.values()
        )
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        await watch.aclose()
    finally:
        await service.stop()


async def test_a_slow_subscriber_is_bounded_and_does_not_hold_up_others(
    channel_to: Callable[..., Any],
) -> None:
    service, stub = await channel_to(watch_queue_size=8)
    hub: ChangeHub = service.hub
    # A slow client: small flow-control windows, and it does not read while changes pour in.
    slow_channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{service.port}",
        options=[("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)],
    )
    slow = pb_grpc.TransactionServiceStub(slow_channel).WatchTransactions(
        pb.WatchTransactionsRequest(start_revision=0)
    )
    fast = stub.WatchTransactions(pb.WatchTransactionsRequest(start_revision=0))
    try:
        await wait_for(lambda: hub.subscriber_count == 2)
        runs = [with_fresh_ids(s) for s in SCENARIOS for _ in range(100)]
        peak = 0
        fast_seen: list[int] = []

        async def read_fast() -> None:
            async for message in fast:
                if message.WhichOneof("event") == "change":
                    fast_seen.append(message.change.revision)

        reader = asyncio.create_task(read_fast())
        for run in runs:
            await ingest_direct(service, run["deliveries"])
            peak = max(peak, *(s.queued for s in hub.subscriptions()))
        expected = [c.revision for c in (await service.store.changes_after(0, 1_000_000)).changes]
        await wait_for(lambda: fast_seen == expected)
        reader.cancel()
        # Memory per subscriber stayed bounded.
        assert peak <= 8
        assert len(hub._recent) <= 2 * 8
        # Now the slow client reads: everything, once, in order, caught up from the log.
        slow_seen = [
            c.revision
            for c in changes(await read_until(slow, lambda ms: len(changes(ms)) == len(expected)))
        ]
        assert slow_seen == expected
        assert service.app.metrics.registry.get_sample_value(
            "transaction_service_watch_catch_ups_total"
        )
    finally:
        slow.cancel()
        fast.cancel()
        await slow_channel.close()


async def test_resuming_from_a_compacted_revision_is_out_of_range_with_error_info(
    api: Running,
) -> None:
    run = with_fresh_ids(REDRAW)
    await ingest_direct(api, run["deliveries"])
    head = (await log_revisions(api))[-1]
    compacted = await api.service.store.trim_changes(datetime.now(UTC) + timedelta(hours=1))
    assert compacted == head
    call = api.stub.WatchTransactions(pb.WatchTransactionsRequest(start_revision=1))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    error = caught.value
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert f"revision {head}" in error.details()
    info = error_info(error)
    assert info.reason == "REVISION_COMPACTED"
    assert info.metadata["compacted_revision"] == str(head)
    assert info.metadata["last_sent_revision"] == "1"
    # 0 means "from the oldest kept", and the head itself is still a valid resume point.
    for from_head in (False, True):
        start = (await api.service.store.head_revision()) if from_head else 0
        call = api.stub.WatchTransactions(pb.WatchTransactionsRequest(start_revision=start))
        d = with_fresh_ids(REDRAW)["deliveries"][0]
        await ingest_direct(api, [d])
        message = await call.read()
        call.cancel()
        assert message.change.event_id == d["svix_id"]


@pytest.mark.parametrize("single", [False, True])
async def test_a_start_revision_in_the_future_is_out_of_range_naming_the_head(
    api: Running, single: bool
) -> None:
    """A future revision would let a watcher skip every revision up to it; etcd refuses it too."""
    run = with_fresh_ids(REDRAW)
    await ingest_direct(api, run["deliveries"][:2])
    head = await api.service.store.head_revision()
    if single:
        call = api.stub.WatchTransaction(
            pb.WatchTransactionRequest(order_id="any-order", start_revision=head + 1)
        )
    else:
        call = api.stub.WatchTransactions(pb.WatchTransactionsRequest(start_revision=head + 1))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
    info = error_info(caught.value)
    assert (info.reason, info.metadata["head_revision"]) == ("REVISION_IN_FUTURE", str(head))
    # The head itself is fine.
    call = api.stub.WatchTransactions(pb.WatchTransactionsRequest(start_revision=head))
    d = run["deliveries"][2]
    await ingest_direct(api, [d])
    assert (await call.read()).change.event_id == d["svix_id"]
    call.cancel()


def legacy_variant(body: dict[str, Any]) -> dict[str, Any]:
    legacy = copy.deepcopy(body)
    del legacy["data"]["order_transaction"]
    legacy["data"].pop("origin", None)
    return legacy


@pytest.mark.parametrize("lookup", ["transaction_id", "order_id"])
@pytest.mark.parametrize("from_log", [False, True])
async def test_a_legacy_standin_is_followed_into_its_real_transaction_without_repeats(
    api: Running, lookup: str, from_log: bool
) -> None:
    """A stand-in watched by its transaction id (its order's id) or by the order id: after the
    fold the watcher gets the real transaction's changes, and "completed" is not said twice."""
    scenario = next(s for s in SCENARIOS if s["scenario"] == "completed_without_redraw")
    run = with_fresh_ids(scenario)
    last = run["deliveries"][-1]
    order_id = last["body"]["data"]["id"]
    await ingest_direct(
        api, [{"svix_id": "legacy-" + last["svix_id"], "body": legacy_variant(last["body"])}]
    )
    request = pb.WatchTransactionRequest(**{lookup: order_id})
    if from_log:
        request.start_revision = 0
    call = api.stub.WatchTransaction(request)
    first = await call.read()
    await ingest_direct(api, [last])
    messages = [first]
    async with asyncio.timeout(DEADLINE):
        while len(changes(messages)) < (2 if from_log else 1):
            messages.append(await call.read())
    call.cancel()
    got = changes(messages)
    if not from_log:
        assert first.current.transaction.id == order_id
        assert first.current.transaction.status == pb.TRANSACTION_STATUS_COMPLETED
    fold = got[-1]
    assert fold.transaction.id == run["expect"]["transaction_id"]
    assert pb.CHANGE_KIND_LEGACY_MERGED in fold.kinds
    # Already reported for the stand-in (in `current`, or in its first change).
    assert pb.CHANGE_KIND_TRANSACTION_COMPLETED not in fold.kinds
    # A watcher of the real transaction is told it completed.
    real = api.stub.WatchTransactions(pb.WatchTransactionsRequest(start_revision=0))
    feed = changes(await read_until(real, lambda m: len(changes(m)) >= 2))
    assert pb.CHANGE_KIND_TRANSACTION_COMPLETED in feed[-1].kinds
    # After the fold, later changes of the real transaction reach the stand-in's watcher.
    later = copy.deepcopy(last["body"])
    later["data"]["updated_at"] = "2027-01-01T00:00:00Z"
    later["data"]["sample_id"] = "CHANGED"
    call = api.stub.WatchTransaction(
        pb.WatchTransactionRequest(**{lookup: order_id}, start_revision=fold.revision)
    )
    await ingest_direct(api, [{"svix_id": "later-" + last["svix_id"], "body": later}])
    (after,) = changes(await read_until(call, lambda m: len(changes(m)) >= 1))
    assert after.transaction.id == run["expect"]["transaction_id"]


async def test_the_change_log_is_trimmed_by_the_retention_window(
    channel_to: Callable[..., Any],
) -> None:
    service, _ = await channel_to(change_retention_seconds=0.001, change_trim_interval_seconds=0.02)
    run = with_fresh_ids(REDRAW)
    await ingest_direct(service, run["deliveries"])

    async def compacted() -> int:
        return (await service.store.changes_after(0, 1)).compacted_revision

    async with asyncio.timeout(DEADLINE):
        while await compacted() < 1:
            await asyncio.sleep(0.02)
    # The transaction's state is untouched by trimming its history.
    snapshot, _ = await service.store.get(run["expect"]["transaction_id"])
    assert snapshot is not None


async def test_cancelled_watches_leave_no_subscription_behind(api: Running) -> None:
    hub = api.service.hub
    for round_ in range(5):
        calls = [
            api.stub.WatchTransactions(pb.WatchTransactionsRequest())
            if k % 2
            else api.stub.WatchTransaction(pb.WatchTransactionRequest(order_id=f"o-{round_}-{k}"))
            for k in range(40)
        ]
        await asyncio.gather(*(c.read() for c in calls))
        assert hub.subscriber_count == 40
        for call in calls:
            call.cancel()
        await wait_for(lambda: hub.subscriber_count == 0)


@pytest.mark.parametrize("single", [False, True])
async def test_shutdown_ends_open_watches_with_a_resume_point(
    channel_to: Callable[..., Any], single: bool
) -> None:
    service, stub = await channel_to(shutdown_grace_seconds=30)
    await ingest_direct(service, REDRAW["deliveries"][:2])
    if single:
        # The watch methods map their errors themselves (StatusOnError): both end the same.
        order_id = REDRAW["deliveries"][0]["body"]["data"]["id"]
        call = stub.WatchTransaction(pb.WatchTransactionRequest(order_id=order_id))
    else:
        call = stub.WatchTransactions(pb.WatchTransactionsRequest())
    opening = await call.read()
    if single:
        assert opening.WhichOneof("event") == "current"
    started = asyncio.get_running_loop().time()
    await service.stop()
    # Streams are ended at once, not cut off when the 30 s grace period runs out.
    assert asyncio.get_running_loop().time() - started < 30
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    info = error_info(caught.value)
    assert info.reason == "SHUTTING_DOWN"
    sent = opening.current.progress_revision if single else opening.progress.revision
    assert sent > 0
    assert info.metadata["last_sent_revision"] == str(sent)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.WatchTransactionRequest(), "lookup"),
        (pb.WatchTransactionRequest(transaction_id=""), "transaction_id"),
        (pb.WatchTransactionRequest(order_id="o", start_revision=-1), "start_revision"),
    ],
)
async def test_watch_transaction_rejects_bad_requests(
    api: Running, request_: pb.WatchTransactionRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.stub.WatchTransaction(request_).read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in caught.value.details()


@pytest.mark.parametrize("method", ["WatchTransaction", "WatchTransactions"])
async def test_a_watch_request_that_is_not_protobuf_is_invalid_argument(
    api: Running, method: str
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{api.service.port}") as channel:
        call = channel.unary_stream(
            f"/transactions.v1.TransactionService/{method}",
            request_serializer=lambda raw: raw,
            response_deserializer=pb.WatchTransactionsResponse.FromString,
        )(b"\xff\xff\xff")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Request" in caught.value.details()


async def test_an_unexpected_error_in_a_watch_is_internal_and_logged(
    api: Running, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The watch methods map errors themselves (api/errors.StatusOnError), as @grpc_errors does
    for the other methods: a bug is INTERNAL with a generic message, its traceback logged."""

    async def broken(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        yield Progress(0)
        raise RuntimeError("a bug")

    monkeypatch.setattr(api.service.hub, "watch", broken)
    call = api.stub.WatchTransactions(pb.WatchTransactionsRequest())
    assert (await call.read()).progress.revision == 0
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "a bug" not in caught.value.details()
    assert any(r.exc_info and "WatchTransactions" in r.getMessage() for r in caplog.records), (
        caplog.records
    )


def test_a_watch_message_is_let_go_once_serialized() -> None:
    """gRPC keeps the last message a stream yielded while the watch waits: in a `Once`, what it
    keeps is empty once sent."""
    message = Once(b"the opening state")
    assert passthrough_serializer(message) == b"the opening state"
    assert message.data == b""
    assert passthrough_serializer(b"bytes") == b"bytes"
    assert (
        passthrough_serializer(pb.WatchProgress(revision=3))
        == pb.WatchProgress(revision=3).SerializeToString()
    )


async def test_watch_transactions_rejects_unspecified_kinds(api: Running) -> None:
    request = pb.WatchTransactionsRequest(kinds=[pb.CHANGE_KIND_UNSPECIFIED])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.stub.WatchTransactions(request).read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "kinds[0]" in caught.value.details()


async def test_a_feed_of_redraw_kinds_learns_the_redraw_order_after_the_announcement(
    api: Running,
) -> None:
    """The initial order's `redraw_available` webhook comes before anything names the redraw
    order: REDRAW_AVAILABLE says so with no redraw order yet, CURRENT_ORDER_CHANGED names it."""
    run = with_fresh_ids(REDRAW)
    run["deliveries"][2]["body"]["data"]["order_transaction"]["orders"].pop()
    await ingest_direct(api, run["deliveries"])
    call = api.stub.WatchTransactions(
        pb.WatchTransactionsRequest(
            start_revision=0,
            kinds=[pb.CHANGE_KIND_REDRAW_AVAILABLE, pb.CHANGE_KIND_CURRENT_ORDER_CHANGED],
        )
    )
    got = changes(await read_until(call, lambda ms: len(changes(ms)) == 2))
    announced, named = got
    assert pb.CHANGE_KIND_REDRAW_AVAILABLE in announced.kinds
    assert announced.transaction.redraw_order_id == ""
    assert list(named.kinds) == [pb.CHANGE_KIND_ORDER_ADDED, pb.CHANGE_KIND_CURRENT_ORDER_CHANGED]
    assert named.transaction.redraw_order_id == run["expect"]["redraw_order_id"]
    assert named.transaction.current_order_id == run["expect"]["redraw_order_id"]


async def test_the_readme_python_client_follows_an_order_until_it_is_done(
    api: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    """examples/follow_order.py, started before any webhook, reports the redraw and returns
    when the transaction completes."""
    spec = importlib.util.spec_from_file_location("follow_order", EXAMPLES / "follow_order.py")
    assert spec is not None
    assert spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    run = with_fresh_ids(REDRAW)
    follower = asyncio.create_task(
        asyncio.to_thread(
            example.follow, run["expect"]["initial_order_id"], f"127.0.0.1:{api.service.port}"
        )
    )
    await wait_for(lambda: api.service.hub.subscriber_count == 1)
    for d in run["deliveries"]:
        await ingest(api, d["svix_id"], d["body"])
    async with asyncio.timeout(DEADLINE):
        assert await follower == "completed"
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        f"redraw available: follow order {run['expect']['redraw_order_id']}",
        f"transaction {run['expect']['transaction_id']} completed",
    ]


# -- batches -------------------------------------------------------------------------------------


def flatten(messages: Sequence[Any]) -> list[pb.TransactionChange]:
    """Every change a stream carried, single or batched, in the order received."""
    out: list[pb.TransactionChange] = []
    for m in messages:
        event = m.WhichOneof("event")
        if event == "change":
            out.append(m.change)
        elif event == "changes":
            out.extend(m.changes.changes)
    return out


async def test_a_batched_feed_gets_every_change_once_in_order_in_fewer_messages(
    channel_to: Callable[..., Any],
) -> None:
    """Replay and live changes arrive in `changes` batches when the client asks for them; a
    client that does not ask never sees the field it may not know."""
    service, stub = await channel_to(watch_batch_interval_seconds=0.05)
    runs = [with_fresh_ids(s) for s in SCENARIOS for _ in range(10)]
    first_half = [d for run in runs[:15] for d in run["deliveries"]]
    second_half = [d for run in runs[15:] for d in run["deliveries"]]
    await asyncio.gather(*(ingest_direct(service, [d]) for d in first_half))
    batched = stub.WatchTransactions(
        pb.WatchTransactionsRequest(start_revision=0, batch_changes=True)
    )
    plain = stub.WatchTransactions(pb.WatchTransactionsRequest(start_revision=0))
    await asyncio.gather(*(ingest_direct(service, [d]) for d in second_half))
    head = await service.store.head_revision()

    def done(messages: list[Any]) -> bool:
        got = flatten(messages)
        return bool(got) and got[-1].revision >= head

    batched_messages = await read_until(batched, done)
    plain_messages = await read_until(plain, done)
    for messages in (batched_messages, plain_messages):
        assert [c.revision for c in flatten(messages)] == list(range(1, head + 1))
    assert any(m.WhichOneof("event") == "changes" for m in batched_messages)
    assert len(batched_messages) < head / 4
    assert all(m.WhichOneof("event") != "changes" for m in plain_messages)


async def test_batches_are_split_to_stay_under_the_message_limit(api: Running) -> None:
    """A batch larger than the limit travels in several messages, every change once, in order;
    below the limit it is one message."""
    runs = [with_fresh_ids(s) for s in SCENARIOS]
    await ingest_direct(api, [d for run in runs for d in run["deliveries"]])
    logged = (await api.service.store.changes_after(0, 1_000_000)).changes
    encoder = ChangeEncoder(single_field=1)
    largest = max(len(encoder.encode(c)) for c in logged)
    for limit in (10**9, largest + 8):
        built = list(encoder.batches(logged, 3, limit))
        assert (len(built) == 1) == (limit == 10**9)
        decoded = [pb.WatchTransactionsResponse.FromString(b) for b in built]
        assert [c.revision for c in flatten(decoded)] == [c.revision for c in logged]
        assert all(len(b) <= limit + 16 for b in built)


# -- the send budget ------------------------------------------------------------------------------


async def test_the_send_budget_gives_at_most_its_share_per_turn_of_the_loop() -> None:
    """Every other task runs between two shares of watch messages, however many watches wait."""
    budget = SendBudget(rate=1e9, burst=10**6, per_turn=3)
    events: list[str] = []
    stop = False

    async def other_task() -> None:
        while not stop:
            events.append("turn")
            await asyncio.sleep(0)

    async def watch(i: int) -> None:
        await budget.take()
        events.append("send")

    ticker = asyncio.create_task(other_task())
    await asyncio.sleep(0)
    await asyncio.gather(*(watch(i) for i in range(20)))
    stop = True
    await ticker
    between = [len(run) for run in "".join("s" if e == "send" else "|" for e in events).split("|")]
    assert sum(between) == 20
    assert max(between) <= 3


async def test_the_send_budget_gives_no_more_than_its_rate() -> None:
    """Past the burst, messages start only as the clock lets tokens in (a clock of the test's)."""
    now = [0.0]
    budget = SendBudget(rate=100, burst=5, clock=lambda: now[0])
    started = 0

    async def watch() -> None:
        nonlocal started
        await budget.take()
        started += 1

    tasks = [asyncio.create_task(watch()) for _ in range(30)]
    await asyncio.sleep(0.05)
    assert started == 5  # the burst; the clock stands still
    now[0] += 0.03  # three tokens
    await wait_for(lambda: started == 8)
    await asyncio.sleep(0.05)
    assert started == 8
    now[0] += 10  # the burst again at most
    await wait_for(lambda: started == 13)
    await asyncio.sleep(0.05)
    assert started == 13
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_unbatched_feeds_past_the_message_budget_lag_but_miss_nothing(
    channel_to: Callable[..., Any],
) -> None:
    """Watchers that do not ask for batches, more messages than the budget sends: every change,
    once, in order, to each (those that fall off the shared buffer catch up from the log)."""
    service, stub = await channel_to(watch_messages_per_second=300, watch_queue_size=8)
    feeds = [stub.WatchTransactions(pb.WatchTransactionsRequest()) for _ in range(5)]
    singles = []
    runs = [with_fresh_ids(s) for s in SCENARIOS for _ in range(4)]
    for run in runs[:3]:
        singles.append(
            stub.WatchTransaction(
                pb.WatchTransactionRequest(transaction_id=run["expect"]["transaction_id"])
            )
        )
    await wait_for(lambda: service.hub.subscriber_count == len(feeds) + len(singles))
    await asyncio.gather(*(ingest_direct(service, run["deliveries"]) for run in runs))
    head = await service.store.head_revision()

    def done(messages: list[Any]) -> bool:
        got = changes(messages)
        return bool(got) and got[-1].revision >= head

    received = await asyncio.gather(*(read_until(call, done) for call in feeds))
    assert all([c.revision for c in changes(m)] == list(range(1, head + 1)) for m in received)
    for call, run in zip(singles, runs, strict=False):
        wanted = await log_revisions(
            Running(service, stub, ""), WatchFilter(transaction_id=run["expect"]["transaction_id"])
        )
        got = await read_until(
            call, lambda m, wanted=wanted: [c.revision for c in changes(m)] == wanted
        )
        assert [c.revision for c in changes(got)] == wanted


# -- the hub's waiting watches, engine level (no store, no transport) ---------------------------


class LogOnly:
    """The change log, in memory, for a ChangeHub alone."""

    def __init__(self) -> None:
        self.log: list[ChangeRecord] = []

    async def head_revision(self) -> int:
        return len(self.log)

    async def changes_after(
        self, after_revision: int, limit: int, transaction_ids: Sequence[str] = ()
    ) -> Any:
        from transaction_service.store.base import ChangeLogPage

        found = [
            c
            for c in self.log[after_revision:]
            if not transaction_ids or c.transaction_id in transaction_ids
        ]
        return ChangeLogPage(found[:limit], 0, len(self.log))

    async def get_by_order(self, order_id: str) -> tuple[None, int]:
        return None, len(self.log)

    async def get_by_order_key(self) -> tuple[None, int]:
        """A watch's `current` for a transaction not seen yet."""
        return None, len(self.log)

    def commit(self, hub: ChangeHub, transaction_id: str) -> ChangeRecord:
        from transaction_service.domain.state import TransactionStatus, TransactionView

        change = ChangeRecord(
            revision=len(self.log) + 1,
            transaction_id=transaction_id,
            event_id=f"e{len(self.log) + 1}",
            order_id=None,
            kinds=(ChangeKind.ORDER_STATUS_CHANGED,),
            view=TransactionView(id=transaction_id, status=TransactionStatus.ACTIVE),
            recorded_at=datetime.now(UTC),
        )
        self.log.append(change)
        hub.publish([change])
        return change


@pytest.mark.parametrize("keyed", [True, False])
async def test_a_change_published_before_the_watch_waits_is_not_missed(keyed: bool) -> None:
    store = LogOnly()
    hub = ChangeHub(store, queue_size=4)  # type: ignore[arg-type]
    if keyed:
        watch = hub.watch(WatchFilter(transaction_id="t"), None, current=store.get_by_order_key)
    else:
        watch = hub.watch(WatchFilter(), None)
    try:
        assert await anext(watch) == Progress(0)
        # Published while the watch is between messages (not waiting yet): it finds it.
        first = store.commit(hub, "t")
        store.commit(hub, "other")
        async with asyncio.timeout(DEADLINE):
            assert await anext(watch) == first
        if not keyed:
            # A feed waiting when a change is published is woken for it.
            waiting = asyncio.ensure_future(anext(watch))
            assert (await waiting).revision == 2  # type: ignore[union-attr]
            waiting = asyncio.ensure_future(anext(watch))
            await asyncio.sleep(0.05)
            assert not waiting.done()
            third = store.commit(hub, "t")
            async with asyncio.timeout(DEADLINE):
                assert await waiting == third
    finally:
        await watch.aclose()
    assert hub.subscriber_count == 0


async def test_a_waiting_watch_closed_by_shutdown_ends_with_the_revision_to_resume_from() -> None:
    from transaction_service.usecases.watch import WatchClosed

    store = LogOnly()
    hub = ChangeHub(store, queue_size=4)  # type: ignore[arg-type]
    store.commit(hub, "t")
    watch = hub.watch(WatchFilter(transaction_id="t"), 0)
    first = await anext(watch)
    assert first.revision == 1  # type: ignore[union-attr]
    store.commit(hub, "other")
    waiting = asyncio.ensure_future(anext(watch))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    hub.close()
    with pytest.raises(WatchClosed) as closed:
        async with asyncio.timeout(DEADLINE):
            await waiting
    assert closed.value.last_sent_revision == 1
    assert hub.subscriber_count == 0


async def test_a_watch_begun_after_shutdown_resumes_from_where_it_asked_or_from_the_head() -> None:
    """A watch that had not begun when the server began shutting down (a `Watch` create whose
    task had not run yet): one from a revision is told that revision; one from now the newest
    published, not 0, which would replay the whole log to a client that asked for none of it."""
    from transaction_service.usecases.watch import WatchClosed

    store = LogOnly()
    hub = ChangeHub(store, queue_size=4)  # type: ignore[arg-type]
    for _ in range(3):
        store.commit(hub, "t")
    hub.close()
    for start, resume in ((None, 3), (0, 0), (2, 2)):
        with pytest.raises(WatchClosed) as closed:
            await anext(hub.watch(WatchFilter(), start))
        assert closed.value.last_sent_revision == resume


async def test_a_transaction_watch_that_overflows_catches_up_from_the_log_once_in_order() -> None:
    store = LogOnly()
    hub = ChangeHub(store, queue_size=4)  # type: ignore[arg-type]
    watch = hub.watch(WatchFilter(transaction_id="t"), None, current=store.get_by_order_key)
    try:
        assert await anext(watch) == Progress(0)
        waiting = asyncio.ensure_future(anext(watch))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        # Ten changes at once while it waits: more than its queue holds.
        expected = [store.commit(hub, "t").revision for _ in range(10)]
        (sub,) = hub.subscriptions()
        assert sub.behind
        got = [(await waiting).revision]  # type: ignore[union-attr]
        async with asyncio.timeout(DEADLINE):
            while len(got) < len(expected):
                got.append((await anext(watch)).revision)  # type: ignore[union-attr]
        assert got == expected
        later = store.commit(hub, "t")
        async with asyncio.timeout(DEADLINE):
            assert await anext(watch) == later
    finally:
        await watch.aclose()


@pytest.mark.parametrize(
    "value", [0, 1, 127, 128, 129, 255, 16383, 16384, 16385, 2**21 - 1, 2**21, 2**35, 2**63 - 1]
)
def test_a_varint_field_is_what_protobuf_encodes(value: int) -> None:
    """api/wire's varints (from a table below 128, two bytes without a loop below 16384), at
    each boundary: the bytes protobuf writes, for values, lengths and field tags."""
    from google.protobuf.internal.encoder import _VarintBytes

    from transaction_service.api.wire import field, varint_field

    assert varint_field(1, value) == pb.WatchProgress(revision=value).SerializeToString()
    if value <= 2**21:
        payload = b"x" * value
        assert field(3, payload) == _VarintBytes(3 << 3 | 2) + _VarintBytes(value) + payload
    # Field numbers whose tag takes one, two and three bytes.
    for number in (15, 16, 2047, 2048):
        assert field(number, b"ab") == _VarintBytes(number << 3 | 2) + b"\x02ab"
