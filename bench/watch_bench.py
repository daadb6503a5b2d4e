"""Watch fan-out of the transaction service, as a ratio to what gRPC Python can push here.

Run: `.venv/bin/python bench/watch_bench.py [--subscribers N] [--events M] [--channels C]`.

The workload is the one of bench/ingest_bench.py (imported from it): copies of the provider-shaped
fixtures in tests/fixtures/junction with fresh ids, each transaction's deliveries shuffled, about
10% sent twice (retries). M deliveries produce K changes (revisions 1..K): retries, stale and
ignored deliveries change nothing, so K < M. Every stage delivers the same K changes to the same N
subscribers, that is N x K deliveries. Each of the C channels has its own TCP connection (a
local subchannel pool; by default gRPC would share one). Client and server share one process and
one event loop, so client costs (receiving, parsing) count against every gRPC stage alike.

Stages:

  (a)  SERVICE, LIVE: the real service in-process (TransactionService, port 0, SQLite with
       synchronous=NORMAL). N WatchTransactions feed streams without start_revision, spread over C
       channels, each waited for until its opening `progress` message arrives. Then M deliveries
       are ingested through the service's own Ingestor (`decode_delivery` + `ingestor.ingest`,
       `--concurrency` producers) in the same process, so ingest (parsing, merging, the SQLite
       writer thread) competes with fan-out for the same 2 cores. Timed from the first ingest until
       the last subscriber holds every change. With few changes this stage is bounded by the
       ingest time rather than by fan-out, so use enough --events for the ratio to mean anything.
  (a') SERVICE, REPLAY: with the log full, N more streams open with start_revision=0 and read it
       all from the change log (the catch-up path of a subscriber that reconnects or fell behind).
       Timed from opening the streams until the last subscriber holds every change.
  (c)  CEILING: a bare grpc.aio server (same options as the service) whose WatchTransactions only
       streams pre-built WatchTransactionsResponse messages from an asyncio.Queue per subscriber:
       the same K changes (converted once with `change_to_pb` from the service's change log), to
       N subscribers on the same C channels, published in the same commit-sized batches as fast as
       the queues take them. No store, no hub, no per-stream conversion: what gRPC Python on this
       machine can push. Measured after (a) and again at the end; the better run is the ceiling.
  (e)  ENGINE ONLY: a fresh ChangeHub without gRPC; N asyncio consumers of
       `hub.watch(WatchFilter(), None)` receive the same K ChangeRecords, published with
       `hub.publish()` in the same batches. Shows how much of the budget the hub itself takes.

How to read the table: the machine is shared and noisy, so absolute deliveries/s mean little from
run to run; compare the "x ceiling" column, which divides a stage's deliveries/s by the ceiling's,
measured in the same process minutes apart. For (a) the ratio includes the cost of ingesting the
changes in the same process; (a') isolates serving from the log. (e) is normally well above 1:
the hub is not the bottleneck, gRPC is. "lag" is per delivery, from when the change became
available to when the client had it: for (a) from the change's `recorded_at` (set when its commit
starts) to receipt; for (c) and (e) from publication to receipt. Publishing in (c) and (e) is a
burst, so their lag mostly measures queueing behind the burst; (a) is paced by ingest. (a') has
no lag (the changes are old). "overflows" counts subscriber buffers (WATCH_QUEUE_SIZE) that
overflowed and were dropped; each such subscriber caught up from the change log. That happens
when ingest outruns fan-out by more than WATCH_QUEUE_SIZE changes (try --events 5000); the run then
mixes live delivery with the slower log reads of (a'), and its ratio drops towards that of (a').

Correctness, any failure exits non-zero: every subscriber of every stage must receive exactly the
revisions of the change log (`store.changes_after(0, 10**7)`), in order, each once; the first
subscriber's change messages of (a) and (a') must equal `change_to_pb` of the log's records; the
revisions acknowledged by the ingestor must be exactly those of the log, with one DUPLICATE per
injected retry; the opening progress must be at revision 0; a stage not finished within
`--timeout` seconds is reported as a hang with the subscribers' positions. At the end the
service is stopped with its streams still open: each must end with UNAVAILABLE and ErrorInfo
SHUTTING_DOWN naming the head revision as `last_sent_revision`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import groupby, pairwise
from pathlib import Path
from typing import Any, cast

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

# bench/ is on sys.path when this file is run as a script; the workload is shared.
from ingest_bench import Item, build_workload

from transaction_service.api.convert import change_to_pb
from transaction_service.config import Settings
from transaction_service.ingest import Ingestor, decode_delivery
from transaction_service.server import TransactionService, grpc_options
from transaction_service.store.base import ChangeLogPage, ChangeRecord, Store
from transaction_service.store.sqlite import SqliteStore
from transaction_service.watch import ChangeHub, WatchClosed, WatchFilter
from transactions.v1 import transactions_pb2 as pb
from transactions.v1 import transactions_pb2_grpc as pb_grpc

# --------------------------------------------------------------------------------------------------
# Subscribers and the bookkeeping of what they received
# --------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Sink:
    """What one subscriber received, and when (wall clock, to compare with recorded_at)."""

    index: int
    keep_messages: bool = False
    revisions: list[int] = field(default_factory=list)
    received_at: list[float] = field(default_factory=list)
    messages: list[pb.TransactionChange] = field(default_factory=list)
    opening: int | None = None  # revision of the opening progress message
    progress: int = 0  # progress messages after the opening one
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    finished_at: float | None = None  # perf_counter when it held every change
    ended: str | None = None  # how the stream ended: OK, a status code name, or an exception
    error_info: tuple[str, dict[str, str]] | None = None


class Tracker:
    """Knows when every subscriber has received up to the target revision."""

    def __init__(self, sinks: Sequence[Sink], target: float = math.inf) -> None:
        self.sinks = sinks
        self.target = target
        self.remaining = len(sinks)
        self.all_done = asyncio.Event()
        if not sinks:
            self.all_done.set()

    def arrived(self, sink: Sink) -> None:
        if sink.finished_at is None:
            sink.finished_at = time.perf_counter()
            self.remaining -= 1
            if self.remaining == 0:
                self.all_done.set()

    def set_target(self, revision: int) -> None:
        self.target = revision
        for sink in self.sinks:
            if sink.revisions and sink.revisions[-1] >= revision:
                self.arrived(sink)


async def read_stream(
    call: AsyncIterator[pb.WatchTransactionsResponse], sink: Sink, tracker: Tracker
) -> None:
    """Consume one WatchTransactions stream until it ends."""
    try:
        async for message in call:
            if message.HasField("change"):
                change = message.change
                sink.received_at.append(time.time())
                sink.revisions.append(change.revision)
                if sink.keep_messages:
                    sink.messages.append(change)
                if change.revision >= tracker.target:
                    tracker.arrived(sink)
            elif sink.opening is None:
                sink.opening = message.progress.revision
                sink.opened.set()
            else:
                sink.progress += 1
        sink.ended = "OK"
    except grpc.aio.AioRpcError as exc:
        sink.ended = exc.code().name
        status = rpc_status.from_call(exc)
        if status is not None and status.details:
            info = error_details_pb2.ErrorInfo()
            if status.details[0].Unpack(info):
                sink.error_info = (info.reason, dict(info.metadata))
    except asyncio.CancelledError:
        sink.ended = "cancelled"
        raise
    except Exception as exc:
        sink.ended = f"{type(exc).__name__}: {exc}"


async def read_hub(hub: ChangeHub, sink: Sink, tracker: Tracker) -> None:
    """Consume one ChangeHub watch until the hub closes."""
    try:
        async for event in hub.watch(WatchFilter(), None):
            if isinstance(event, ChangeRecord):
                sink.received_at.append(time.time())
                sink.revisions.append(event.revision)
                if event.revision >= tracker.target:
                    tracker.arrived(sink)
            elif sink.opening is None:
                sink.opening = event.revision
                sink.opened.set()
            else:
                sink.progress += 1
        sink.ended = "OK"
    except WatchClosed as exc:
        sink.ended = "WatchClosed"
        sink.error_info = ("WatchClosed", {"last_sent_revision": str(exc.last_sent_revision)})
    except Exception as exc:
        sink.ended = f"{type(exc).__name__}: {exc}"


async def wait_opened(sinks: Sequence[Sink], limit: float, label: str) -> list[str]:
    try:
        async with asyncio.timeout(limit):
            for sink in sinks:
                await sink.opened.wait()
    except TimeoutError:
        waiting = sum(not s.opened.is_set() for s in sinks)
        return [f"{label}: {waiting} of {len(sinks)} streams got no opening message in {limit}s"]
    return []


async def wait_done(tracker: Tracker, limit: float, label: str, total: int) -> list[str]:
    """Wait for every subscriber to hold every change; describe the stragglers if not."""
    try:
        async with asyncio.timeout(limit):
            await tracker.all_done.wait()
    except TimeoutError:
        stuck = [s for s in tracker.sinks if s.finished_at is None]
        sample = ", ".join(
            f"#{s.index} has {len(s.revisions)}/{total} (last "
            f"{s.revisions[-1] if s.revisions else None}, ended {s.ended})"
            for s in stuck[:5]
        )
        return [
            f"{label}: HANG: {len(stuck)} of {len(tracker.sinks)} subscribers had not received "
            f"every change (up to revision {tracker.target}) after {limit}s; e.g. {sample}"
        ]
    return []


def check_sinks(label: str, sinks: Sequence[Sink], expected: list[int]) -> list[str]:
    """Each subscriber must hold exactly the log's revisions, in order, each once."""
    problems = []
    want = set(expected)
    for sink in sinks:
        got = sink.revisions
        if got == expected:
            continue
        counts = Counter(got)
        repeated = sum(n - 1 for n in counts.values() if n > 1)
        missing = len(want - counts.keys())
        unknown = len(counts.keys() - want)
        out_of_order = sum(1 for a, b in pairwise(got) if b <= a)
        first = next(
            (i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
            min(len(got), len(expected)),
        )
        problems.append(
            f"{label}: subscriber #{sink.index} received {len(got)} changes for {len(expected)}: "
            f"{missing} missing, {repeated} repeated, {unknown} unknown, {out_of_order} out of "
            f"order; first difference at position {first} (got "
            f"{got[first : first + 3]}, expected {expected[first : first + 3]})"
        )
    return problems


def check_messages(label: str, sink: Sink, log: list[ChangeRecord]) -> list[str]:
    """The change messages must be those the log's records convert to."""
    by_revision = {c.revision: c for c in log}
    for message in sink.messages:
        record = by_revision.get(message.revision)
        if record is None or message != change_to_pb(record):
            return [
                f"{label}: subscriber #{sink.index}'s message for revision {message.revision} "
                "differs from change_to_pb of the change log's record"
            ]
    return []


def check_ends(
    label: str, sinks: Sequence[Sink], code: str, reason: str, revision: int
) -> list[str]:
    bad = [
        s
        for s in sinks
        if s.ended != code
        or s.error_info is None
        or s.error_info[0] != reason
        or s.error_info[1].get("last_sent_revision") != str(revision)
    ]
    if not bad:
        return []
    s = bad[0]
    return [
        f"{label}: {len(bad)} of {len(sinks)} streams did not end with {code} {reason} "
        f"last_sent_revision={revision}; e.g. #{s.index} ended {s.ended} {s.error_info}"
    ]


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclass
class Stage:
    label: str
    subscribers: int
    changes: int
    seconds: float = 0.0
    lags: list[float] | None = None
    overflows: int | None = None

    @property
    def deliveries(self) -> int:
        return self.subscribers * self.changes

    @property
    def rate(self) -> float:
        return self.deliveries / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float | None:
        if not self.lags:
            return None
        ordered = sorted(self.lags)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def finish(stage: Stage, sinks: Sequence[Sink], started: float) -> None:
    ends = [s.finished_at for s in sinks if s.finished_at is not None]
    stage.seconds = (max(ends) if ends else time.perf_counter()) - started


def lags(sinks: Sequence[Sink], sent_at: dict[int, float]) -> list[float]:
    return [
        received - sent_at[revision]
        for sink in sinks
        for revision, received in zip(sink.revisions, sink.received_at, strict=True)
        if revision in sent_at
    ]


def commit_batches(log: list[ChangeRecord]) -> list[list[ChangeRecord]]:
    """The log split as it was committed: one commit's changes share their recorded_at."""
    return [list(group) for _, group in groupby(log, key=lambda c: c.recorded_at)]


async def open_channels(address: str, count: int) -> list[grpc.aio.Channel]:
    # Channels to the same address with the same options share one connection (gRPC's global
    # subchannel pool); a local pool per channel gives each its own TCP connection.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(count)]
    for channel in channels:
        await channel.channel_ready()
    return channels


async def end_tasks(tasks: Sequence[asyncio.Task[None]], limit: float) -> int:
    """Wait for reader tasks to end by themselves; cancel the rest; return how many were cut."""
    if not tasks:
        return 0
    _, pending = await asyncio.wait(tasks, timeout=limit)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return len(pending)


# --------------------------------------------------------------------------------------------------
# (a), (a'): the service
# --------------------------------------------------------------------------------------------------


@dataclass
class ServiceRun:
    live: Stage
    replay: Stage
    log: list[ChangeRecord]
    ingest_seconds: float
    outcomes: Counter[str]
    problems: list[str]


async def ingest_all(
    ingestor: Ingestor,
    items: list[Item],
    concurrency: int,
    max_body_bytes: int,
    outcomes: Counter[str],
    revisions: list[int],
) -> None:
    source: Iterator[Item] = iter(items)

    async def producer() -> None:
        # Producers share one iterator; safe because next() never awaits.
        for item in source:
            try:
                delivery = decode_delivery(
                    item.event_id, payload_json=item.payload_json, max_body_bytes=max_body_bytes
                )
                result = await ingestor.ingest(delivery)
            except Exception as exc:
                outcomes[f"error {type(exc).__name__}"] += 1
                continue
            outcomes[result.outcome.value] += 1
            if result.change is not None:
                revisions.append(result.change.revision)

    await asyncio.gather(*(producer() for _ in range(concurrency)))


async def bench_service(
    args: argparse.Namespace, settings: Settings, items: list[Item], retries: int
) -> ServiceRun:
    n, timeout = args.subscribers, args.timeout
    service = TransactionService(settings)
    channels: list[grpc.aio.Channel] = []
    tasks: list[asyncio.Task[None]] = []
    problems: list[str] = []
    live_sinks = [Sink(i, keep_messages=i == 0) for i in range(n)]
    replay_sinks = [Sink(n + i, keep_messages=i == 0) for i in range(n)]
    live = Stage("(a)  service: live feed", n, 0)
    replay = Stage("(a') service: replay from log", n, 0)
    outcomes: Counter[str] = Counter()
    acknowledged: list[int] = []
    log: list[ChangeRecord] = []
    ingest_seconds = 0.0
    head = 0
    try:
        port = await service.start()
        channels = await open_channels(f"127.0.0.1:{port}", args.channels)
        stubs = [pb_grpc.TransactionServiceStub(c) for c in channels]

        # Live: open the feeds, wait for each opening progress, then ingest.
        tracker = Tracker(live_sinks)
        for sink in live_sinks:
            call = stubs[sink.index % len(stubs)].WatchTransactions(pb.WatchTransactionsRequest())
            tasks.append(asyncio.create_task(read_stream(call, sink, tracker)))
        wait_problems = await wait_opened(live_sinks, timeout, live.label)
        problems += wait_problems
        if wait_problems:
            return ServiceRun(live, replay, log, ingest_seconds, outcomes, problems)
        openings = Counter(s.opening for s in live_sinks)
        if set(openings) != {0}:
            problems.append(f"{live.label}: opening progress revisions {dict(openings)}, not 0")
        if service.hub.subscriber_count != n:
            problems.append(f"{live.label}: hub has {service.hub.subscriber_count} subscribers")

        started = time.perf_counter()
        await ingest_all(
            service.ingestor,
            items,
            args.concurrency,
            settings.max_body_bytes,
            outcomes,
            acknowledged,
        )
        ingest_seconds = time.perf_counter() - started
        page: ChangeLogPage = await service.store.changes_after(0, 10**7)
        log = page.changes
        expected = [c.revision for c in log]
        head = page.head_revision
        live.changes = replay.changes = len(log)
        tracker.set_target(expected[-1] if expected else 0)
        problems += await wait_done(tracker, timeout, live.label, len(log))
        finish(live, live_sinks, started)
        live.overflows = sum(s.overflows for s in service.hub.subscriptions())
        live.lags = lags(live_sinks, {c.revision: c.recorded_at.timestamp() for c in log})

        errors = {k: v for k, v in outcomes.items() if k.startswith("error")}
        if errors:
            problems.append(f"{live.label}: ingest failures {errors}")
        if outcomes["duplicate"] != retries:
            problems.append(
                f"{live.label}: {outcomes['duplicate']} DUPLICATE outcomes for {retries} retries"
            )
        if sorted(acknowledged) != expected or head != (expected[-1] if expected else 0):
            problems.append(
                f"{live.label}: ingest acknowledged {len(acknowledged)} changes, the log holds "
                f"{len(expected)} (head {head})"
            )

        # Replay: the same number of streams read the whole log from revision 0.
        live_subscriptions = set(service.hub.subscriptions())
        tracker = Tracker(replay_sinks, target=head)
        started = time.perf_counter()
        for sink in replay_sinks:
            call = stubs[sink.index % len(stubs)].WatchTransactions(
                pb.WatchTransactionsRequest(start_revision=0)
            )
            tasks.append(asyncio.create_task(read_stream(call, sink, tracker)))
        problems += await wait_done(tracker, timeout, replay.label, len(log))
        finish(replay, replay_sinks, started)
        replay.overflows = sum(
            s.overflows for s in service.hub.subscriptions() if s not in live_subscriptions
        )

        problems += check_sinks(live.label, live_sinks, expected)
        problems += check_messages(live.label, live_sinks[0], log)
        problems += check_sinks(replay.label, replay_sinks, expected)
        problems += check_messages(replay.label, replay_sinks[0], log)
    finally:
        # Stop with the streams open: each must end at once with a resume point.
        stop_started = time.perf_counter()
        await service.stop()
        stop_seconds = time.perf_counter() - stop_started
        cut = await end_tasks(tasks, limit=10)
        for channel in channels:
            await channel.close()
    if cut:
        problems.append(f"service stop: {cut} streams had not ended 10 s after service.stop()")
    if log:
        problems += check_ends(
            "service stop", live_sinks + replay_sinks, "UNAVAILABLE", "SHUTTING_DOWN", head
        )
    print(f"service.stop() with {2 * n} open streams took {stop_seconds:.2f}s")
    return ServiceRun(live, replay, log, ingest_seconds, outcomes, problems)


# --------------------------------------------------------------------------------------------------
# (c): the gRPC ceiling
# --------------------------------------------------------------------------------------------------


class CeilingServicer(pb_grpc.TransactionServiceServicer):
    """WatchTransactions that only streams what is put in its queue; None ends the stream."""

    def __init__(self) -> None:
        self.queues: list[asyncio.Queue[pb.WatchTransactionsResponse | None]] = []

    async def WatchTransactions(
        self, request: pb.WatchTransactionsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchTransactionsResponse]:
        queue: asyncio.Queue[pb.WatchTransactionsResponse | None] = asyncio.Queue()
        self.queues.append(queue)
        try:
            yield pb.WatchTransactionsResponse(progress=pb.WatchProgress(revision=0))
            while (message := await queue.get()) is not None:
                yield message
        finally:
            self.queues.remove(queue)


async def bench_ceiling(
    label: str,
    args: argparse.Namespace,
    settings: Settings,
    log: list[ChangeRecord],
    batches: list[list[ChangeRecord]],
) -> tuple[Stage, list[str]]:
    n = args.subscribers
    stage = Stage(label, n, len(log))
    expected = [c.revision for c in log]
    messages = {c.revision: pb.WatchTransactionsResponse(change=change_to_pb(c)) for c in log}
    servicer = CeilingServicer()
    server = grpc.aio.server(options=grpc_options(settings))
    pb_grpc.add_TransactionServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    channels: list[grpc.aio.Channel] = []
    tasks: list[asyncio.Task[None]] = []
    sinks = [Sink(i) for i in range(n)]
    tracker = Tracker(sinks, target=expected[-1] if expected else 0)
    problems: list[str] = []
    sent_at: dict[int, float] = {}
    try:
        await server.start()
        channels = await open_channels(f"127.0.0.1:{port}", args.channels)
        stubs = [pb_grpc.TransactionServiceStub(c) for c in channels]
        for sink in sinks:
            call = stubs[sink.index % len(stubs)].WatchTransactions(pb.WatchTransactionsRequest())
            tasks.append(asyncio.create_task(read_stream(call, sink, tracker)))
        problems += await wait_opened(sinks, args.timeout, label)
        if not problems:
            started = time.perf_counter()
            for batch in batches:
                now = time.time()
                out = [messages[c.revision] for c in batch]
                for c in batch:
                    sent_at[c.revision] = now
                for queue in servicer.queues:
                    for message in out:
                        queue.put_nowait(message)
                await asyncio.sleep(0)
            problems += await wait_done(tracker, args.timeout, label, len(log))
            finish(stage, sinks, started)
    finally:
        for queue in servicer.queues:
            queue.put_nowait(None)
        cut = await end_tasks(tasks, limit=10)
        for channel in channels:
            await channel.close()
        # Every stream has ended: a grace period lets the server close without cancelling calls.
        await server.stop(5)
    stage.lags = lags(sinks, sent_at)
    problems += check_sinks(label, sinks, expected)
    if cut or any(s.ended != "OK" for s in sinks):
        problems.append(f"{label}: streams did not end cleanly: {Counter(s.ended for s in sinks)}")
    return stage, problems


# --------------------------------------------------------------------------------------------------
# (e): the ChangeHub alone
# --------------------------------------------------------------------------------------------------


class LogFromStart:
    """The service's store as the hub sees it, as if the log were empty when watches opened.

    A watch without start_revision opens at the head revision and drops anything at or below it;
    the changes are published again here, so the head must read 0. Catch-up reads (after an
    overflow) go to the real log.
    """

    def __init__(self, store: Store) -> None:
        self._store = store

    async def head_revision(self) -> int:
        return 0

    async def changes_after(
        self, after_revision: int, limit: int, transaction_ids: Sequence[str] = ()
    ) -> ChangeLogPage:
        return await self._store.changes_after(after_revision, limit, transaction_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


async def bench_engine(
    args: argparse.Namespace,
    settings: Settings,
    log: list[ChangeRecord],
    batches: list[list[ChangeRecord]],
) -> tuple[Stage, list[str]]:
    n = args.subscribers
    label = "(e)  engine: ChangeHub, no gRPC"
    stage = Stage(label, n, len(log))
    expected = [c.revision for c in log]
    store = SqliteStore(settings.db, synchronous=settings.sqlite_synchronous)
    await store.open()
    hub = ChangeHub(
        cast(Store, LogFromStart(store)),
        queue_size=settings.watch_queue_size,
        progress_interval=settings.watch_progress_seconds,
    )
    sinks = [Sink(i) for i in range(n)]
    tracker = Tracker(sinks, target=expected[-1] if expected else 0)
    tasks = [asyncio.create_task(read_hub(hub, sink, tracker)) for sink in sinks]
    problems: list[str] = []
    sent_at: dict[int, float] = {}
    try:
        problems += await wait_opened(sinks, args.timeout, label)
        if not problems:
            started = time.perf_counter()
            for batch in batches:
                now = time.time()
                for c in batch:
                    sent_at[c.revision] = now
                hub.publish(batch)
                await asyncio.sleep(0)
            problems += await wait_done(tracker, args.timeout, label, len(log))
            finish(stage, sinks, started)
            stage.overflows = sum(s.overflows for s in hub.subscriptions())
    finally:
        hub.close()
        await end_tasks(tasks, limit=10)
        await store.close()
    stage.lags = lags(sinks, sent_at)
    problems += check_sinks(label, sinks, expected)
    if expected:
        problems += check_ends(label, sinks, "WatchClosed", "WatchClosed", expected[-1])
    return stage, problems


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return f"{value * 1000:.1f}" if value is not None else "-"


def print_table(stages: list[Stage], ceiling: Stage) -> None:
    header = (
        f"{'stage':<34} {'subs':>5} {'changes':>7} {'deliveries':>10} {'seconds':>7} "
        f"{'deliv/s':>8} {'x ceiling':>9} {'lag p50 ms':>10} {'lag p99 ms':>10} {'overflows':>9}"
    )
    print(header)
    print("-" * len(header))
    for s in stages:
        ratio = f"{s.rate / ceiling.rate:.3f}" if ceiling.rate else "-"
        overflows = str(s.overflows) if s.overflows is not None else "-"
        print(
            f"{s.label:<34} {s.subscribers:>5} {s.changes:>7} {s.deliveries:>10} "
            f"{s.seconds:>7.2f} {s.rate:>8.0f} {ratio:>9} {_ms(s.percentile(50)):>10} "
            f"{_ms(s.percentile(99)):>10} {overflows:>9}"
        )


async def run(args: argparse.Namespace, folder: Path) -> int:
    rng = random.Random(args.seed)
    settings = Settings(
        grpc_host="127.0.0.1",
        grpc_port=0,
        http_host="127.0.0.1",
        http_port=0,
        db=folder / "watch.db",
        sqlite_synchronous="NORMAL",
        log_level="WARNING",
    )
    workload = build_workload(args.events, rng)
    items = workload.items
    print(
        f"workload: {len(items)} deliveries ({workload.duplicates} retries) in "
        f"{len(workload.copies)} transactions; {args.subscribers} subscribers on "
        f"{args.channels} channels; ingest concurrency {args.concurrency}; "
        f"WATCH_QUEUE_SIZE {settings.watch_queue_size}; folder {folder}"
    )

    service = await bench_service(args, settings, items, workload.duplicates)
    problems = list(service.problems)
    stages = [service.live, service.replay]
    ceilings: list[Stage] = []
    if service.log:
        batches = commit_batches(service.log)
        print(
            f"ingest: {len(items)} deliveries in {service.ingest_seconds:.2f}s "
            f"({len(items) / service.ingest_seconds:.0f}/s) -> {len(service.log)} changes in "
            f"{len(batches)} commits; outcomes {dict(sorted(service.outcomes.items()))}"
        )
        first, first_problems = await bench_ceiling(
            "(c)  ceiling: bare grpc.aio push", args, settings, service.log, batches
        )
        engine, engine_problems = await bench_engine(args, settings, service.log, batches)
        again, again_problems = await bench_ceiling(
            "(c') ceiling, measured again", args, settings, service.log, batches
        )
        problems += first_problems + engine_problems + again_problems
        ceilings = [first, again]
        stages += [first, again, engine]
    else:
        problems.append("the service stage produced no changes; nothing to compare")

    print()
    ceiling = max(ceilings, key=lambda s: s.rate) if ceilings else Stage("none", 0, 0)
    print_table(stages, ceiling)
    print()
    if ceilings:
        print(f"ratios use the faster ceiling run: {ceiling.label.strip()} ({ceiling.rate:.0f}/s)")
    print(
        f"correctness: every subscriber of every stage checked against the change log "
        f"({len(service.log)} revisions); {len(problems)} problems"
    )
    for problem in problems[:20]:
        print(f"  PROBLEM {problem}")
    if len(problems) > 20:
        print(f"  ... and {len(problems) - 20} more")
    return 1 if problems else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--subscribers", type=int, default=200, help="streams (default 200)")
    parser.add_argument("--events", type=int, default=2_000, help="deliveries (default 2000)")
    parser.add_argument("--channels", type=int, default=10, help="gRPC channels (default 10)")
    parser.add_argument("--concurrency", type=int, default=64, help="ingest producers (default 64)")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds before a stage counts as hung"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dir", type=Path, default=None, help="parent of the temporary folder")
    args = parser.parse_args(argv)
    if args.subscribers < 1 or args.events < 1 or args.channels < 1 or args.concurrency < 1:
        parser.error("--subscribers, --events, --channels and --concurrency must be positive")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    folder = Path(tempfile.mkdtemp(prefix="watch-bench-", dir=args.dir))
    try:
        return asyncio.run(run(args, folder))
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(folder)


if __name__ == "__main__":
    sys.exit(main())
