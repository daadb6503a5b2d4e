"""Several replicas on one PostgreSQL: any replica ingests, every watcher misses nothing.

Skipped (loudly, see conftest.py) without a PostgreSQL server.
"""

from __future__ import annotations

import asyncio
import importlib.util
import random
from collections.abc import AsyncIterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.conftest import SCENARIOS
from tests.harness import check_expect, struct
from tests.pg import fresh_database
from tests.process import Server, running_server
from tests.scenario_tools import expected_summary, view_summary, with_fresh_ids
from transaction_service.store.postgres import PostgresStore
from transaction_service.usecases.commit import CommitPath
from transaction_service.usecases.ingest import Ingestor, IngestResult, Outcome, decode_delivery
from transactions.v1 import transactions_pb2 as pb
from transactions.v1 import transactions_pb2_grpc as pb_grpc

LIMIT = 1 << 20
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DEADLINE = 120.0


# -- two writers, one database, in process -------------------------------------------------------


async def test_concurrent_writers_lose_no_merge_and_apply_a_duplicate_once(tmp_path: Path) -> None:
    """Two stores (two connection pools, as two replicas have) ingest the same transactions at
    the same time, each delivery to both: every merge lands, every event id is applied once,
    and revisions stay contiguous."""
    with fresh_database() as url:
        stores = [PostgresStore(url, pool_size=4) for _ in range(2)]
        for store in stores:
            await store.open()
        ingestors = [Ingestor(CommitPath(store), max_batch=16) for store in stores]
        for ingestor in ingestors:
            ingestor.start()
        try:
            runs = [with_fresh_ids(s) for s in SCENARIOS for _ in range(15)]
            deliveries = [d for run in runs for d in run["deliveries"]]
            random.Random(7).shuffle(deliveries)

            async def send(ingestor: Ingestor, d: dict[str, Any]) -> IngestResult:
                delivery = decode_delivery(d["svix_id"], payload=d["body"], max_body_bytes=LIMIT)
                return await ingestor.ingest(delivery)

            results = await asyncio.gather(
                *(send(ingestor, d) for d in deliveries for ingestor in ingestors)
            )
            by_event: dict[str, list[Outcome]] = {}
            for d, result in zip([d for d in deliveries for _ in ingestors], results, strict=True):
                by_event.setdefault(d["svix_id"], []).append(result.outcome)
            # Each event applied (or found stale) by exactly one replica; the other saw a duplicate.
            for outcomes in by_event.values():
                assert sorted(outcomes).count(Outcome.DUPLICATE) == 1, outcomes
            for run in runs:
                snapshot, _ = await stores[0].get(run["expect"]["transaction_id"])
                assert snapshot is not None
                assert view_summary(snapshot.view) == expected_summary(run)
            page = await stores[1].changes_after(0, 100_000)
            revisions = [c.revision for c in page.changes]
            assert revisions == list(range(1, len(revisions) + 1))
        finally:
            for ingestor in ingestors:
                await ingestor.stop()
            for store in stores:
                await store.close()


# -- replica processes ---------------------------------------------------------------------------


def round_robin_channel(*servers: Server) -> grpc.aio.Channel:
    """The README's client channel over every replica (examples/replica_channel.py)."""
    spec = importlib.util.spec_from_file_location(
        "replica_channel", EXAMPLES / "replica_channel.py"
    )
    assert spec is not None
    assert spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example.replica_channel([f"127.0.0.1:{s.port}" for s in servers])


class Watcher:
    """A feed watcher that starts on one replica, and when that replica dies resumes on the
    next from the last revision it received."""

    def __init__(self, name: str, replicas: list[Server]) -> None:
        self.name = name
        self.replicas = replicas
        self.revisions: list[int] = []
        self.resumed = 0
        self.errors: list[grpc.StatusCode] = []
        self.ready = asyncio.Event()

    async def run(self) -> None:
        last = 0
        for replica in self.replicas:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as channel:
                stub = pb_grpc.TransactionServiceStub(channel)
                try:
                    async for message in stub.WatchTransactions(
                        pb.WatchTransactionsRequest(start_revision=last)
                    ):
                        self.ready.set()
                        if message.WhichOneof("event") == "change":
                            self.revisions.append(message.change.revision)
                            last = message.change.revision
                except grpc.aio.AioRpcError as exc:
                    self.errors.append(exc.code())
                    self.resumed += 1

    async def until(self, head: int) -> None:
        async with asyncio.timeout(DEADLINE):
            while not self.revisions or self.revisions[-1] < head:
                await asyncio.sleep(0.05)


async def _ingest_with_retries(
    stubs: list[pb_grpc.TransactionServiceStub], d: dict[str, Any]
) -> pb.IngestEventResponse:
    request = pb.IngestEventRequest(event_id=d["svix_id"], payload=struct(d["body"]))
    for attempt in range(50):
        stub = stubs[attempt % len(stubs)]
        try:
            return await stub.IngestEvent(request, timeout=30)
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            await asyncio.sleep(0.1)
    raise AssertionError(f"{d['svix_id']} was never acknowledged")


@pytest.fixture
async def replicas(tmp_path: Path) -> AsyncIterator[list[Server]]:
    with fresh_database() as url, ExitStack() as stack:
        servers = [
            stack.enter_context(running_server(tmp_path, "--grpc-port", "0", "--db", url))
            for _ in range(3)
        ]
        yield servers


async def test_replicas_share_one_state_and_every_watcher_sees_every_revision(
    replicas: list[Server],
) -> None:
    """Deliveries spread round robin over three replicas, a third of them also sent to every
    replica at once; a feed watcher on each replica. Mid-stream one replica is killed -9: its
    watcher resumes on another from its last revision. Every watcher ends with every revision
    exactly once, in order; the states are the fixtures'; nothing acknowledged is lost."""
    a, b, c = replicas
    watchers = [
        Watcher(f"on-{i}", [r, *[o for o in replicas if o is not r]])
        for i, r in enumerate(replicas)
    ]
    tasks = [asyncio.create_task(w.run()) for w in watchers]
    async with asyncio.timeout(DEADLINE):
        for w in watchers:
            await w.ready.wait()

    runs = [with_fresh_ids(s) for s in SCENARIOS for _ in range(8)]
    deliveries = [d for run in runs for d in run["deliveries"]]
    random.Random(11).shuffle(deliveries)
    acknowledged: set[str] = set()
    async with round_robin_channel(a, b, c) as balanced:
        spread = pb_grpc.TransactionServiceStub(balanced)
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{r.port}") for r in replicas]
        direct = [pb_grpc.TransactionServiceStub(channel) for channel in channels]
        survivors = [direct[0], direct[2]]

        async def deliver(i: int, d: dict[str, Any]) -> None:
            targets = [spread] if i % 3 else direct
            for response in await asyncio.gather(
                *(_ingest_with_retries([t, *survivors], d) for t in targets)
            ):
                assert response.event_id == d["svix_id"]
            acknowledged.add(d["svix_id"])

        half = len(deliveries) // 2
        await asyncio.gather(*(deliver(i, d) for i, d in enumerate(deliveries[:half])))
        b.process.kill()  # -9, mid-stream: nothing flushed, no goodbye
        await asyncio.gather(*(deliver(i, d) for i, d in enumerate(deliveries[half:], start=half)))

        await asyncio.gather(*(channel.close() for channel in channels))
        head = (await spread.ListTransactions(pb.ListTransactionsRequest())).revision
        for w in watchers:
            await w.until(head)
        for run in runs:
            got = await spread.GetTransaction(
                pb.GetTransactionRequest(transaction_id=run["expect"]["transaction_id"])
            )
            check_expect(got.transaction, run["expect"])
        # A call keeps working with one replica dead.
        assert (await spread.ListTransactions(pb.ListTransactionsRequest())).revision == head

    for task in tasks:
        task.cancel()
    for w in watchers:
        assert w.revisions == list(range(1, head + 1)), w.name
        assert set(w.errors) <= {grpc.StatusCode.UNAVAILABLE}
    assert watchers[1].resumed >= 1  # the watcher on the killed replica moved on
    assert len(acknowledged) == len(deliveries)
