"""Admission to the ingest queue, one bad delivery among good ones, and store health, in process:
the queue's bounds and fairness (usecases/admission.py), what the Ingestor answers when a share
is full or a deadline passes, the commit path isolating a delivery the store refuses, and the
write-health hysteresis. The same, against real server processes: tests/test_abuse_ingest.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.conftest import SCENARIOS
from tests.scenario_tools import with_fresh_ids
from tests.webhook_tools import metric
from transaction_service.errors import DeadlinePassed, InvalidArgument, Overloaded, Unavailable
from transaction_service.metrics import Metrics
from transaction_service.store.base import (
    Answer,
    AppliedBatch,
    BatchKeys,
    KeysBusy,
    Planner,
    StoreDataRefused,
)
from transaction_service.store.health import WriteHealth
from transaction_service.store.memory import MemoryStore
from transaction_service.usecases.admission import AdmissionQueue, Flow, Lane, Ticket
from transaction_service.usecases.commit import CommitPath
from transaction_service.usecases.ingest import Delivery, Ingestor, Outcome, decode_delivery
from transaction_service.usecases.plan import batch_keys

REDRAW = next(s for s in SCENARIOS if s["scenario"] == "redraw_completed")
WEBHOOK = Flow(Lane.WEBHOOK, "webhook")
UNARY = Flow(Lane.UNARY, "peer-1")
LIMIT = 1 << 20


def deliveries(count: int, source: str = "grpc") -> list[Delivery]:
    out: list[Delivery] = []
    while len(out) < count:
        for d in with_fresh_ids(REDRAW)["deliveries"]:
            out.append(
                decode_delivery(
                    d["svix_id"], payload=d["body"], max_body_bytes=1 << 20, source=source
                )
            )
    return out[:count]


# -- the queue ------------------------------------------------------------------------------------


def test_each_lane_holds_its_share_and_each_flow_a_part_of_it() -> None:
    queue: AdmissionQueue[int] = AdmissionQueue(limit=16, limit_bytes=1 << 20)
    streams = [Flow(Lane.STREAM, f"s{i}") for i in range(2)]
    # Streams have half of 16; one stream alone may take all of it.
    for i in range(8):
        assert queue.has_room(streams[0], 1)
        queue.put(Ticket(i, streams[0], 1))
    assert not queue.has_room(streams[0], 1)
    assert not queue.has_room(streams[1], 1)
    # The webhook and unary lanes are untouched: a quarter each.
    for lane_flow in (WEBHOOK, UNARY):
        for i in range(4):
            assert queue.has_room(lane_flow, 1)
            queue.put(Ticket(i, lane_flow, 1))
        assert not queue.has_room(lane_flow, 1)
    assert len(queue) == 16


def test_a_flow_gets_an_equal_part_of_its_lane_among_the_flows_waiting() -> None:
    queue: AdmissionQueue[int] = AdmissionQueue(limit=16, limit_bytes=1 << 20)
    first, second = Flow(Lane.STREAM, "a"), Flow(Lane.STREAM, "b")
    for i in range(3):
        queue.put(Ticket(i, first, 1))
    # Two flows now: 8 // 2 = 4 each.
    assert queue.flow_share(second) == 4
    queue.put(Ticket(9, second, 1))
    assert queue.has_room(first, 1)
    queue.put(Ticket(3, first, 1))
    assert not queue.has_room(first, 1)
    assert queue.has_room(second, 1)


def test_the_bytes_bound_refuses_a_body_that_would_pass_it() -> None:
    queue: AdmissionQueue[int] = AdmissionQueue(limit=100, limit_bytes=400)
    queue.put(Ticket(0, WEBHOOK, 90))  # the webhook lane has 100 bytes
    assert not queue.has_room(WEBHOOK, 20)
    assert queue.has_room(WEBHOOK, 10)


def test_batches_are_filled_round_robin_over_lanes_then_flows() -> None:
    queue: AdmissionQueue[str] = AdmissionQueue(limit=400, limit_bytes=1 << 20)
    for name in ("a", "b"):
        for i in range(50):
            queue.put(Ticket(f"{name}{i}", Flow(Lane.STREAM, name), 1))
    queue.put(Ticket("w0", WEBHOOK, 1))
    queue.put(Ticket("u0", UNARY, 1))
    batch = [t.item for t in queue.take(6)]
    # A webhook and a unary call ride in the first batch whatever the streams queued before.
    assert batch == ["w0", "u0", "a0", "b0", "a1", "b1"]
    # While interactive callers are about, the stream lane's slice of a batch is capped.
    queue.put(Ticket("w1", WEBHOOK, 1))
    assert [t.item for t in queue.take(10, most_bulk=2)] == ["w1", "a2", "b2"]


def test_a_withdrawn_ticket_frees_its_place_and_is_never_taken() -> None:
    queue: AdmissionQueue[int] = AdmissionQueue(limit=4, limit_bytes=1 << 20)
    tickets = [Ticket(i, WEBHOOK, 1) for i in range(1)]
    queue.put(tickets[0])
    assert not queue.has_room(WEBHOOK, 1)
    assert queue.withdraw(tickets[0])
    assert queue.has_room(WEBHOOK, 1)
    assert queue.take(10) == []
    assert not queue.withdraw(tickets[0])


# -- the ingestor ---------------------------------------------------------------------------------


class GatedStore(MemoryStore):
    """A store whose writes wait until `gate` is set: a stalled commit, held by the test."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.writing = asyncio.Event()
        self.batches: list[frozenset[str]] = []

    async def write(self, keys: BatchKeys, plan: Planner[Answer]) -> tuple[AppliedBatch, Answer]:
        self.writing.set()
        await self.gate.wait()
        self.batches.append(keys.event_ids)
        return await super().write(keys, plan)


@pytest.fixture
async def gated() -> AsyncIterator[tuple[GatedStore, Ingestor, Metrics]]:
    store = GatedStore()
    metrics = Metrics()
    ingestor = Ingestor(CommitPath(store), queue_limit=8, metrics=metrics)
    ingestor.start()
    yield store, ingestor, metrics
    store.gate.set()
    await ingestor.stop()


async def until(condition: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_a_full_share_is_refused_with_a_retry_hint_and_the_other_lanes_still_queue(
    gated: tuple[GatedStore, Ingestor, Metrics],
) -> None:
    store, ingestor, metrics = gated
    first, *rest = deliveries(6, source="webhook")
    held = asyncio.ensure_future(ingestor.ingest(first, flow=WEBHOOK))
    await store.writing.wait()  # the commit loop is stuck on `first`
    # The webhook lane holds 8 // 4 = 2.
    waiting = [asyncio.ensure_future(ingestor.ingest(d, flow=WEBHOOK)) for d in rest[:2]]
    await until(lambda: ingestor.queued == 2)
    with pytest.raises(Overloaded) as refused:
        await ingestor.ingest(rest[2], flow=WEBHOOK)
    assert refused.value.reason == "INGEST_QUEUE_FULL"
    assert refused.value.retry_after == 1.0
    assert (
        metric(
            metrics.exposition().decode(),
            "transaction_service_events_total",
            source="webhook",
            outcome="overloaded",
        )
        == 1
    )
    # A unary call is still queued: its lane is its own.
    unary = asyncio.ensure_future(ingestor.ingest(rest[3], flow=UNARY))
    await until(lambda: ingestor.queued == 3)
    store.gate.set()
    results = await asyncio.gather(held, *waiting, unary)
    assert {r.outcome for r in results} <= {Outcome.APPLIED, Outcome.STALE}


async def test_a_stream_waits_for_room_instead_of_being_refused(
    gated: tuple[GatedStore, Ingestor, Metrics],
) -> None:
    store, ingestor, _ = gated
    stream = Flow(Lane.STREAM, "stream-1")
    items = deliveries(8)
    sent = [asyncio.ensure_future(ingestor.ingest(d, flow=stream, wait=True)) for d in items]
    await store.writing.wait()
    # The stream lane holds 8 // 2 = 4; the rest wait, none is refused.
    await until(lambda: ingestor.queued == 4)
    assert not any(task.done() for task in sent)
    store.gate.set()
    results = await asyncio.gather(*sent)
    assert len(results) == 8
    assert all(r.outcome in (Outcome.APPLIED, Outcome.STALE) for r in results)


async def test_a_delivery_whose_deadline_passes_while_queued_is_dropped_unstored(
    gated: tuple[GatedStore, Ingestor, Metrics], caplog: pytest.LogCaptureFixture
) -> None:
    store, ingestor, metrics = gated
    first, late = deliveries(2, source="webhook")
    held = asyncio.ensure_future(ingestor.ingest(first, flow=WEBHOOK))
    await store.writing.wait()
    with pytest.raises(DeadlinePassed) as dropped:
        await ingestor.ingest(late, flow=WEBHOOK, time_remaining=0.2)
    assert dropped.value.reason == "DEADLINE_PASSED"
    assert ingestor.queued == 0
    store.gate.set()
    await held
    await ingestor.stop()  # logs the drops of the last few seconds
    assert late.event_id not in store.events
    text = metrics.exposition().decode()
    assert (
        metric(
            text, "transaction_service_ingest_dropped_total", source="webhook", reason="deadline"
        )
        == 1
    )
    assert "dropped 1 deliveries before their commit" in caplog.text


async def test_a_caller_that_goes_away_before_the_commit_leaves_nothing_behind(
    gated: tuple[GatedStore, Ingestor, Metrics],
) -> None:
    store, ingestor, metrics = gated
    first, gone = deliveries(2)
    held = asyncio.ensure_future(ingestor.ingest(first, flow=UNARY))
    await store.writing.wait()
    call = asyncio.ensure_future(ingestor.ingest(gone, flow=UNARY))
    await until(lambda: ingestor.queued == 1)
    call.cancel()
    await until(lambda: ingestor.queued == 0)
    store.gate.set()
    await held
    await until(lambda: len(store.batches) == 1)
    assert gone.event_id not in store.events
    assert (
        metric(
            metrics.exposition().decode(),
            "transaction_service_ingest_dropped_total",
            source="grpc",
            reason="caller_gone",
        )
        == 1
    )


# Several deliveries of one request (`ingest_many`, IngestEvents' `deliveries`): each is admitted,
# dropped and answered as by `ingest`, though one coroutine waits for them all.


async def test_a_request_of_several_waits_for_room_and_is_answered_in_order(
    gated: tuple[GatedStore, Ingestor, Metrics],
) -> None:
    store, ingestor, metrics = gated
    stream = Flow(Lane.STREAM, "stream-1")
    first, *items = deliveries(11)
    held = asyncio.ensure_future(ingestor.ingest(first, flow=UNARY))
    await store.writing.wait()
    sent = asyncio.ensure_future(ingestor.ingest_many(items, flow=stream, wait=True))
    # The stream lane holds 8 // 2 = 4; the other 6 wait for room, none is refused.
    await until(lambda: ingestor.queued == 4)
    assert not sent.done()
    store.gate.set()
    await held
    results = await sent
    assert [r.event_id for r in results] == [d.event_id for d in items]  # type: ignore[union-attr]
    assert all(r.outcome in (Outcome.APPLIED, Outcome.STALE) for r in results)  # type: ignore[union-attr]
    # Committed in the order sent: the first four in one batch, the others after.
    assert store.batches[1] == frozenset(d.event_id for d in items[:4])
    text = metrics.exposition().decode()
    counted = sum(
        metric(text, "transaction_service_events_total", source="grpc", outcome=outcome) or 0
        for outcome in ("applied", "stale")
    )
    assert counted == 11


async def test_a_request_of_several_beyond_its_share_is_refused_in_part(
    gated: tuple[GatedStore, Ingestor, Metrics],
) -> None:
    store, ingestor, metrics = gated
    first, *items = deliveries(4, source="webhook")
    held = asyncio.ensure_future(ingestor.ingest(first, flow=WEBHOOK))
    await store.writing.wait()
    # The webhook lane holds 2: the third is refused, the first two are committed.
    sent = asyncio.ensure_future(ingestor.ingest_many(items, flow=WEBHOOK))
    await until(lambda: ingestor.queued == 2)
    store.gate.set()
    await held
    results = await sent
    assert [type(r) for r in results[:2]] != [Overloaded, Overloaded]
    assert isinstance(results[2], Overloaded)
    assert results[2].reason == "INGEST_QUEUE_FULL"
    assert items[2].event_id not in store.events
    assert (
        metric(
            metrics.exposition().decode(),
            "transaction_service_events_total",
            source="webhook",
            outcome="overloaded",
        )
        == 1
    )


async def test_a_request_of_several_whose_deadline_passes_is_dropped_unstored(
    gated: tuple[GatedStore, Ingestor, Metrics],
) -> None:
    store, ingestor, metrics = gated
    stream = Flow(Lane.STREAM, "stream-1")
    first, *items = deliveries(7)
    held = asyncio.ensure_future(ingestor.ingest(first, flow=UNARY))
    await store.writing.wait()
    # 4 queued, 2 waiting for room: all six dropped at the deadline.
    results = await ingestor.ingest_many(items, flow=stream, time_remaining=0.2, wait=True)
    assert all(isinstance(r, DeadlinePassed) for r in results)
    assert ingestor.queued == 0
    store.gate.set()
    await held
    await until(lambda: len(store.batches) == 1)
    assert not any(d.event_id in store.events for d in items)
    text = metrics.exposition().decode()
    assert (
        metric(text, "transaction_service_ingest_dropped_total", source="grpc", reason="deadline")
        == 6
    )
    assert metric(text, "transaction_service_events_total", source="grpc", outcome="dropped") == 6


async def test_a_request_of_several_being_committed_at_its_deadline_gets_its_answers() -> None:
    store = GatedStore()
    ingestor = Ingestor(CommitPath(store), queue_limit=8)
    ingestor.start()
    items = deliveries(3)
    sent = asyncio.ensure_future(
        ingestor.ingest_many(
            items, flow=Flow(Lane.STREAM, "stream-1"), time_remaining=0.2, wait=True
        )
    )
    await store.writing.wait()  # taken into the batch being written: past the point of drops
    await asyncio.sleep(0.3)
    store.gate.set()
    results = await sent
    assert all(r.outcome in (Outcome.APPLIED, Outcome.STALE) for r in results)  # type: ignore[union-attr]
    await ingestor.stop()


async def test_a_request_of_several_whose_caller_goes_away_leaves_nothing_behind(
    gated: tuple[GatedStore, Ingestor, Metrics],
) -> None:
    store, ingestor, metrics = gated
    stream = Flow(Lane.STREAM, "stream-1")
    first, *items = deliveries(7)
    held = asyncio.ensure_future(ingestor.ingest(first, flow=UNARY))
    await store.writing.wait()
    call = asyncio.ensure_future(ingestor.ingest_many(items, flow=stream, wait=True))
    await until(lambda: ingestor.queued == 4)
    call.cancel()
    await until(lambda: ingestor.queued == 0)
    store.gate.set()
    await held
    await asyncio.sleep(0.1)
    assert len(store.batches) == 1
    assert not any(d.event_id in store.events for d in items)
    assert (
        metric(
            metrics.exposition().decode(),
            "transaction_service_ingest_dropped_total",
            source="grpc",
            reason="caller_gone",
        )
        == 4
    )


async def test_a_request_of_several_waiting_for_room_at_shutdown_is_refused(
    gated: tuple[GatedStore, Ingestor, Metrics],
) -> None:
    store, ingestor, _ = gated
    stream = Flow(Lane.STREAM, "stream-1")
    first, *items = deliveries(7)
    held = asyncio.ensure_future(ingestor.ingest(first, flow=UNARY))
    await store.writing.wait()
    sent = asyncio.ensure_future(ingestor.ingest_many(items, flow=stream, wait=True))
    await until(lambda: ingestor.queued == 4)
    stopping = asyncio.ensure_future(ingestor.stop())
    store.gate.set()
    await stopping
    await held
    results = await sent
    # The four queued were committed and answered; the two waiting for room were refused.
    assert all(r.outcome in (Outcome.APPLIED, Outcome.STALE) for r in results[:4])  # type: ignore[union-attr]
    assert all(isinstance(r, Unavailable) for r in results[4:])
    assert all(r.reason == "SHUTTING_DOWN" for r in results[4:])  # type: ignore[union-attr]
    assert not any(d.event_id in store.events for d in items[4:])


# -- one bad delivery among good ones --------------------------------------------------------------


class RefusingStore(MemoryStore):
    """Refuses any batch holding the chosen event id, as PostgreSQL refuses a NUL (a data
    error), or reports a chosen transaction's rows locked by another session."""

    def __init__(self, poison: str = "", locked: str = "") -> None:
        super().__init__()
        self.poison = poison
        self.locked = locked
        self.attempts = 0

    async def write(self, keys: BatchKeys, plan: Planner[Answer]) -> tuple[AppliedBatch, Answer]:
        self.attempts += 1
        if self.poison in keys.event_ids:
            raise StoreDataRefused("PostgreSQL error 22021")
        if self.locked in keys.transaction_ids:
            raise KeysBusy(frozenset(), frozenset({self.locked}))
        return await super().write(keys, plan)


async def test_a_delivery_the_store_refuses_fails_alone_and_its_batch_commits(
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = deliveries(31)
    poison = deliveries(1)[0]
    store = RefusingStore(poison=poison.event_id)
    ingestor = Ingestor(CommitPath(store))
    ingestor.start()
    try:
        results = await asyncio.gather(
            *(ingestor.ingest(d) for d in [*good[:15], poison, *good[15:]]),
            return_exceptions=True,
        )
    finally:
        await ingestor.stop()
    refused = results.pop(15)
    assert isinstance(refused, InvalidArgument)
    assert "22021" in refused.message
    assert all(not isinstance(r, BaseException) for r in results), results
    assert set(store.events) == {d.event_id for d in good}
    assert "the store refused the data of event" in caplog.text


async def test_deliveries_to_a_transaction_locked_elsewhere_are_refused_the_others_commit() -> None:
    locked_scenario = with_fresh_ids(REDRAW)
    locked_id = locked_scenario["expect"]["transaction_id"]
    to_locked = [
        decode_delivery(d["svix_id"], payload=d["body"], max_body_bytes=LIMIT)
        for d in locked_scenario["deliveries"]
    ]
    # Only deliveries naming the transaction's block touch its row; the first may not.
    naming = [d for d in to_locked if locked_id in batch_keys([d]).transaction_ids]
    others = deliveries(12)
    store = RefusingStore(locked=locked_id)
    ingestor = Ingestor(CommitPath(store))
    ingestor.start()
    try:
        results = await asyncio.gather(
            *(ingestor.ingest(d) for d in [*naming, *others]), return_exceptions=True
        )
    finally:
        await ingestor.stop()
    for result in results[: len(naming)]:
        assert isinstance(result, Unavailable)
        assert result.reason == "TRANSACTION_LOCKED"
    assert all(not isinstance(r, BaseException) for r in results[len(naming) :])
    assert {d.event_id for d in others} <= set(store.events)


# -- write health ----------------------------------------------------------------------------------


def test_health_turns_at_the_first_failure_and_back_only_after_clean_writes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    flips: list[bool] = []
    health = WriteHealth("db", recovery_seconds=5, clock=lambda: now[0])
    health.subscribe(flips.append)
    caplog.set_level(logging.WARNING)
    # A nearly full disk: failures with successes between them.
    for second in range(20):
        now[0] = float(second)
        if second % 3:
            health.succeeded()
        else:
            health.failed("disk full")
    assert flips == [False]
    for second in range(20, 27):
        now[0] = float(second)
        health.succeeded()
    assert flips == [False, True]
    # Logged once when it started and once when it ended.
    lines = [r.getMessage() for r in caplog.records]
    assert sum("cannot write: disk full" in line for line in lines) == 1
    assert sum("writes again after disk full x7" in line for line in lines) == 1


async def test_a_commit_that_stalls_turns_health_unhealthy_while_it_runs() -> None:
    store = GatedStore()
    store.health.configure(stall_seconds=0.2, recovery_seconds=0)
    commits = CommitPath(store)
    ingestor = Ingestor(commits)
    ingestor.start()
    try:
        call = asyncio.ensure_future(ingestor.ingest(deliveries(1)[0]))
        await until(lambda: not store.health.healthy)
        assert any("commits stalled" in kind for kind in store.health.failing)
        store.gate.set()
        await call
        assert store.health.healthy
    finally:
        store.gate.set()
        await ingestor.stop()


async def test_a_request_of_several_at_its_deadline_is_answered_in_part_and_dropped_in_part() -> (
    None
):
    """At the deadline, the deliveries of one request already in the batch being written are
    waited for and answered; those still queued behind it are dropped, each in its place."""
    store = GatedStore()
    metrics = Metrics()
    ingestor = Ingestor(CommitPath(store), queue_limit=8, metrics=metrics)
    ingestor.start()
    stream = Flow(Lane.STREAM, "stream-1")
    items = deliveries(7)
    try:
        sent = asyncio.ensure_future(
            ingestor.ingest_many(items, flow=stream, time_remaining=1.0, wait=True)
        )
        # The stream lane holds 4: those are taken into the batch being written, and the three
        # that waited for room are queued behind it.
        await store.writing.wait()
        await until(lambda: ingestor.queued == 3)
        await until(lambda: ingestor.queued == 0)  # dropped at the deadline
        assert not sent.done()  # nothing answered before the commit
        store.gate.set()
        results = await sent
    finally:
        store.gate.set()
        await ingestor.stop()
    assert [getattr(r, "event_id", None) for r in results[:4]] == [d.event_id for d in items[:4]]
    assert all(isinstance(r, DeadlinePassed) for r in results[4:]), results
    assert {d.event_id for d in items[:4]} <= set(store.events)
    assert not any(d.event_id in store.events for d in items[4:])
    text = metrics.exposition().decode()
    assert (
        metric(text, "transaction_service_ingest_dropped_total", source="grpc", reason="deadline")
        == 3
    )
    assert metric(text, "transaction_service_events_total", source="grpc", outcome="dropped") == 3


async def test_a_request_of_several_whose_caller_goes_away_mid_commit_commits_only_what_was_taken(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A caller gone while part of its request is being written and part is queued: the part
    being written commits (unanswered), the queued part is taken out, unstored."""
    store = GatedStore()
    metrics = Metrics()
    ingestor = Ingestor(CommitPath(store), queue_limit=8, metrics=metrics)
    ingestor.start()
    stream = Flow(Lane.STREAM, "stream-1")
    items = deliveries(7)
    try:
        call = asyncio.ensure_future(ingestor.ingest_many(items, flow=stream, wait=True))
        await store.writing.wait()
        await until(lambda: ingestor.queued == 3)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert ingestor.queued == 0
        store.gate.set()
        await until(lambda: len(store.batches) == 1)
        await asyncio.sleep(0.05)
    finally:
        store.gate.set()
        await ingestor.stop()
    assert len(store.batches) == 1
    assert {d.event_id for d in items[:4]} <= set(store.events)
    assert not any(d.event_id in store.events for d in items[4:])
    assert (
        metric(
            metrics.exposition().decode(),
            "transaction_service_ingest_dropped_total",
            source="grpc",
            reason="caller_gone",
        )
        == 3
    )
    assert "never retrieved" not in caplog.text


async def test_a_request_of_several_with_one_delivery_the_store_refuses_answers_each_in_order() -> (
    None
):
    good = deliveries(9)
    poison = deliveries(1)[0]
    store = RefusingStore(poison=poison.event_id)
    metrics = Metrics()
    ingestor = Ingestor(CommitPath(store), metrics=metrics)
    ingestor.start()
    items = [*good[:4], poison, *good[4:]]
    try:
        results = await ingestor.ingest_many(items, flow=Flow(Lane.STREAM, "s"), wait=True)
    finally:
        await ingestor.stop()
    assert isinstance(results[4], InvalidArgument)
    rest = results[:4] + results[5:]
    assert [getattr(r, "event_id", None) for r in rest] == [d.event_id for d in good]
    assert set(store.events) == {d.event_id for d in good}


async def test_a_request_of_several_after_shutdown_is_refused_each() -> None:
    ingestor = Ingestor(CommitPath(MemoryStore()))
    ingestor.start()
    await ingestor.stop()
    results = await ingestor.ingest_many(deliveries(3), flow=Flow(Lane.STREAM, "s"), wait=True)
    assert len(results) == 3
    assert all(isinstance(r, Unavailable) and r.reason == "SHUTTING_DOWN" for r in results)


async def test_a_request_whose_caller_goes_away_makes_room_for_the_next_request_waiting(
    gated: tuple[GatedStore, Ingestor, Metrics],
) -> None:
    """Two requests of one stream wait for room; the first's caller goes away: its queued
    deliveries are taken out and its waiting ones given up, and the second's are queued in
    their order and committed."""
    store, ingestor, _ = gated
    stream = Flow(Lane.STREAM, "stream-1")
    first, *items = deliveries(11)
    gone, kept = items[:6], items[6:]
    held = asyncio.ensure_future(ingestor.ingest(first, flow=UNARY))
    await store.writing.wait()
    leaving = asyncio.ensure_future(ingestor.ingest_many(gone, flow=stream, wait=True))
    staying = asyncio.ensure_future(ingestor.ingest_many(kept, flow=stream, wait=True))
    await until(lambda: ingestor.queued == 4)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    # The second request's four now hold the stream lane's share.
    await until(lambda: ingestor.queued == 4)
    store.gate.set()
    await held
    results = await staying
    assert [getattr(r, "event_id", None) for r in results] == [d.event_id for d in kept]
    assert {d.event_id for d in kept} <= set(store.events)
    assert not any(d.event_id in store.events for d in gone)
    assert store.batches[1] == frozenset(d.event_id for d in kept)
