"""The Python client (client/, `transaction_client`) against real server processes: typed calls
and errors, watches that resume across SIGTERM and SIGKILL, a forced compaction, a frozen
(SIGSTOPped) server and a killed replica, and a cache whose handlers fire exactly once."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.conftest import SCENARIOS
from tests.pg import fresh_database
from tests.process import Server, running_server, server_env
from tests.scenario_tools import with_fresh_ids
from transaction_client import (
    TLS,
    ClientSetupError,
    FileCheckpoint,
    HandlerCall,
    InvalidArgument,
    MemoryCheckpoint,
    NotFound,
    RevisionCompacted,
    Snapshot,
    TransactionCache,
    TransactionChange,
    TransactionClient,
    Unauthenticated,
    Watch,
    WatchItem,
)
from transaction_client import sync as sync_client
from transactions.v1 import transactions_pb2 as pb

DEADLINE = 120.0
HANDLERS = {
    "redraw_available": lambda t: t.redraw_available,
    "completed": lambda t: t.status == pb.TRANSACTION_STATUS_COMPLETED,
    "cancelled": lambda t: t.status == pb.TRANSACTION_STATUS_CANCELLED,
}


def runs(copies: int) -> list[dict[str, Any]]:
    return [with_fresh_ids(s) for s in SCENARIOS for _ in range(copies)]


async def ingest(client: TransactionClient, run: dict[str, Any]) -> None:
    for delivery in run["deliveries"]:
        for attempt in range(100):
            try:
                await client.ingest_event(delivery["body"], event_id=delivery["svix_id"])
                break
            except Exception:
                if attempt == 99:
                    raise
                await asyncio.sleep(0.1)


async def head_of(client: TransactionClient) -> int:
    listing = client.list_transactions(page_size=1)
    async for _ in listing.pages():
        break
    return listing.revision


async def start(
    stack: contextlib.ExitStack, *args: str, env: dict[str, str] | None = None
) -> Server:
    """A server process (started in a thread: the event loop keeps serving the watches)."""
    return await asyncio.to_thread(stack.enter_context, running_server(Path.cwd(), *args, env=env))


class Consumer:
    """A feed watch from revision 0, a watch of one order, and a cache with the three handlers,
    each recording what it got."""

    def __init__(self, client: TransactionClient, order_id: str) -> None:
        self.order_id = order_id
        self.feed: Watch[WatchItem] = client.watch_transactions(start_revision=0)
        self.single: Watch[WatchItem] = client.watch_transaction(
            order_id=order_id, start_revision=0
        )
        self.feed_items: list[WatchItem] = []
        self.single_items: list[WatchItem] = []
        self.calls: collections.Counter[str] = collections.Counter()
        self.cache = TransactionCache(client, checkpoint=MemoryCheckpoint())
        for name, predicate in HANDLERS.items():
            self.cache.on(name, predicate, self.record)
        self.tasks: list[asyncio.Task[None]] = []

    def record(self, call: HandlerCall) -> None:
        self.calls[call.key] += 1

    async def __aenter__(self) -> Consumer:
        await self.cache.start()
        self.tasks = [
            asyncio.create_task(self._drain(self.feed, self.feed_items)),
            asyncio.create_task(self._drain(self.single, self.single_items)),
        ]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.cache.close()

    @staticmethod
    async def _drain(watch: Watch[WatchItem], into: list[WatchItem]) -> None:
        async for item in watch:
            into.append(item)

    async def until(self, head: int) -> None:
        async with asyncio.timeout(DEADLINE):
            while (self.feed.revision or 0) < head or self.cache.handled_revision < head:
                for task in self.tasks:
                    if task.done():
                        task.result()  # a watch that stopped: its error
                await asyncio.sleep(0.05)

    def changes(self) -> list[pb.TransactionChange]:
        return [i for i in self.feed_items if isinstance(i, pb.TransactionChange)]

    def check_single_watch(self) -> None:
        """The single watch got exactly the feed's changes of its order, once each, in order."""
        mine = [
            c.revision
            for c in self.changes()
            if c.transaction.id == self.order_id
            or any(o.id == self.order_id for o in c.transaction.orders)
        ]
        got = [i.revision for i in self.single_items if isinstance(i, pb.TransactionChange)]
        assert got == mine

    def check_handlers(self) -> None:
        """Every handler fired at most once per transaction, and for every transaction whose
        state satisfies its predicate (or for a stand-in folded into it)."""
        assert [k for k, n in self.calls.items() if n != 1] == []
        folded: dict[str, set[str]] = collections.defaultdict(set)
        for change in self.changes():
            folded[change.transaction.id].update(change.merged_transaction_ids)
        for transaction in self.cache.transactions():
            for name, predicate in HANDLERS.items():
                if predicate(transaction):
                    ids = {transaction.id, *folded[transaction.id]}
                    assert any(f"{name}:{i}" in self.calls for i in ids), (name, transaction.id)


# -- calls ---------------------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with running_server(tmp_path, "--grpc-port", "0", "--db", str(tmp_path / "x.db")) as server:
        yield server


async def test_calls_are_typed_and_errors_say_what_is_wrong(server: Server) -> None:
    """Reads, ingest, paging and typed errors, async and sync: the same names, the same
    answers."""
    run, other = runs(1)[:2]
    async with TransactionClient(server.address) as client:
        await ingest(client, run)
        await ingest(client, other)
        order_id = next(iter(run["expect"]["orders"]))
        got = await client.get_transaction(order_id=order_id)
        assert got.transaction.id == run["expect"]["transaction_id"]
        listing = client.list_transactions(page_size=1)
        listed = [t.id async for t in listing]
        assert set(listed) == {run["expect"]["transaction_id"], other["expect"]["transaction_id"]}
        assert listing.revision == await head_of(client)
        batch = await client.batch_get_transactions(order_ids=[order_id, "nobody"])
        assert [r.found for r in batch.results] == [True, False]
        with pytest.raises(NotFound) as missing:
            await client.get_transaction(order_id="nobody")
        assert "nobody" in str(missing.value)
        with pytest.raises(InvalidArgument) as invalid:
            await client.ingest_event("not json", event_id="bad")
        assert [v.field for v in invalid.value.field_violations] == ["payload_json"]
        with pytest.raises(ValueError, match="exactly one"):
            await client.get_transaction()
        history = client.list_transaction_events(order_id=order_id, page_size=2)
        events = [e async for e in history]
        assert [e.event_id for e in events] == [d["svix_id"] for d in run["deliveries"]]
        assert history.transaction_id == run["expect"]["transaction_id"]
        first = next(e for e in events if e.revision)
        then = await client.get_transaction(order_id=order_id, revision=first.revision)
        assert then.transaction.revision == first.revision

    with sync_client.TransactionClient(server.address) as blocking:
        assert blocking.get_transaction(order_id=order_id).transaction == got.transaction
        assert {t.id for t in blocking.list_transactions(page_size=1)} == set(listed)
        change = next(iter(blocking.watch_transactions(start_revision=0)))
        assert isinstance(change, pb.TransactionChange)
        assert change.revision == 1
        assert list(blocking.list_transaction_events(order_id=order_id, page_size=2)) == events
        at = blocking.get_transaction(order_id=order_id, revision=first.revision)
        assert at.transaction == then.transaction


@pytest.mark.parametrize("watches_per_stream", [0, 10])
async def test_closing_the_client_ends_the_watches_being_iterated(
    server: Server, watches_per_stream: int
) -> None:
    """`close()` ends each watch's iteration, its position saved (before: with a stream each the
    iteration waited for ever, its reader gone; on shared streams it reconnected, opening the
    channel again). A watch iterated again afterwards goes on from where it was."""
    run = runs(1)[0]
    client = TransactionClient(server.address, watches_per_stream=watches_per_stream)
    await ingest(client, run)
    checkpoint = MemoryCheckpoint()
    watch = client.watch_transactions(start_revision=0, checkpoint=checkpoint)
    got: list[int] = []

    async def consume() -> None:
        async for item in watch:
            assert isinstance(item, pb.TransactionChange)
            got.append(item.revision)

    task = asyncio.create_task(consume())
    head = await head_of(client)
    async with asyncio.timeout(DEADLINE):
        while not got or got[-1] < head:
            await asyncio.sleep(0.05)
        await client.close()
        await task  # ended, not raised
    assert got == list(range(1, head + 1))
    assert watch.reconnects == 0
    saved = await checkpoint.load()
    assert saved is not None
    assert saved.revision == head
    try:
        await ingest(client, runs(1)[0])  # the client works again, on a new channel
        async with asyncio.timeout(DEADLINE):
            async for item in watch:
                assert isinstance(item, pb.TransactionChange)
                assert item.revision == head + 1
                break
    finally:
        await client.close()


async def test_watches_past_the_servers_limit_a_stream_move_to_another_stream(
    tmp_path: Path,
) -> None:
    """watches_per_stream above the server's WATCH_MAX_PER_STREAM: the watches the server
    refuses on a full stream (TOO_MANY_WATCHES) resume on another instead of raising
    ResourceExhausted to their consumers (before: they raised)."""
    args = ("--grpc-port", "0", "--db", str(tmp_path / "x.db"), "--watch-max-per-stream", "3")
    with running_server(tmp_path, *args) as server:
        client = TransactionClient(server.address, watches_per_stream=10)
        try:
            run = runs(1)[0]
            await ingest(client, run)
            head = await head_of(client)
            watches = [client.watch_transactions(start_revision=0) for _ in range(7)]

            async def first_changes(watch: Watch[WatchItem]) -> list[int]:
                got: list[int] = []
                async for item in watch:
                    assert isinstance(item, pb.TransactionChange)
                    got.append(item.revision)
                    if item.revision == head:
                        return got
                raise AssertionError("ended early")

            async with asyncio.timeout(DEADLINE):
                got = await asyncio.gather(*(first_changes(w) for w in watches))
            assert got == [list(range(1, head + 1))] * 7
            assert client.watch_streams is not None
            assert client.watch_streams.streams >= 3  # 3 + 3 + 1, at least
        finally:
            await client.close()


async def test_the_token_comes_from_the_environment(tmp_path: Path, monkeypatch: Any) -> None:
    env = server_env(TRANSACTION_SERVICE_READ_TOKENS="read-token-0123456789")
    with running_server(
        tmp_path, "--grpc-port", "0", "--db", str(tmp_path / "x.db"), env=env
    ) as server:
        async with TransactionClient(server.address) as anonymous:
            with pytest.raises(Unauthenticated) as refused:
                await anonymous.get_transaction(order_id="x")
            assert refused.value.reason == "MISSING_TOKEN"
            assert "TRANSACTION_SERVICE_TOKEN" in str(refused.value)
        monkeypatch.setenv("TRANSACTION_SERVICE_TOKEN", "read-token-0123456789")
        async with TransactionClient(server.address) as client:
            with pytest.raises(NotFound):
                await client.get_transaction(order_id="x")


# -- watches and the cache through restarts ------------------------------------------------------


@pytest.mark.parametrize("per_stream", [0, 100])
async def test_watches_and_cache_survive_sigterm_and_sigkill(
    tmp_path: Path, per_stream: int
) -> None:
    """A feed watch, a watch of one order and a cache run while the server is stopped with
    SIGTERM and then killed with SIGKILL, each time restarted on the same port after changes were
    made on the same database elsewhere. Every revision reaches the feed exactly once, in order;
    the order's watch gets exactly its changes; every handler fires exactly once. Each watch on
    a stream of its own, and (`watches_per_stream`) all on one `Watch` stream."""
    db = str(tmp_path / "x.db")
    batches = [runs(1), runs(1), runs(1)]
    order_id = next(iter(batches[0][0]["expect"]["orders"]))
    with contextlib.ExitStack() as stack:
        server = await start(stack, "--grpc-port", "0", "--db", db)
        port = str(server.port)
        async with (
            TransactionClient(server.address, watches_per_stream=per_stream) as client,
            Consumer(client, order_id) as seen,
        ):
            for run in batches[0]:
                await ingest(client, run)
            await seen.until(await head_of(client))
            if per_stream:
                assert client.watch_streams is not None
                assert client.watch_streams.streams == 1
            for sig, batch in zip((signal.SIGTERM, signal.SIGKILL), batches[1:], strict=True):
                await asyncio.to_thread(server.stop, sig=sig)
                # Changes made while the watchers cannot reach the server: they get them only by
                # resuming from where they were.
                with contextlib.ExitStack() as elsewhere:
                    other = await start(elsewhere, "--grpc-port", "0", "--db", db)
                    async with TransactionClient(other.address) as writer:
                        for run in batch[:-1]:
                            await ingest(writer, run)
                server = await start(stack, "--grpc-port", port, "--db", db)
                await ingest(client, batch[-1])
                await seen.until(await head_of(client))
            head = await head_of(client)
            assert [c.revision for c in seen.changes()] == list(range(1, head + 1))
            assert not any(isinstance(i, Snapshot) for i in seen.feed_items)
            assert seen.feed.reconnects >= 2
            seen.check_single_watch()
            seen.check_handlers()
            for run in [r for batch in batches for r in batch]:
                cached = await seen.cache.get(transaction_id=run["expect"]["transaction_id"])
                served = await client.get_transaction(
                    transaction_id=run["expect"]["transaction_id"]
                )
                assert cached == served.transaction


@pytest.mark.parametrize("per_stream", [0, 100])
async def test_a_compacted_history_is_resynced_and_handlers_still_fire_once(
    tmp_path: Path, per_stream: int
) -> None:
    """While the consumers cannot reach the server, a server that keeps its change log for one
    second compacts away the changes they need. They resume with REVISION_COMPACTED: the watches
    re-read the state (marked resync items) and carry on; the cache re-lists and fires the
    handlers of what it missed, once, and none of those it had fired before."""
    db = str(tmp_path / "x.db")
    before, during, after = runs(1), runs(1), runs(1)
    order_id = next(iter(before[0]["expect"]["orders"]))
    short = ("--change-retention-seconds", "1", "--change-trim-interval-seconds", "0.2")
    with contextlib.ExitStack() as stack:
        server = await start(stack, "--grpc-port", "0", "--db", db)
        port = str(server.port)
        async with (
            TransactionClient(server.address, watches_per_stream=per_stream) as client,
            Consumer(client, order_id) as seen,
        ):
            for run in before:
                await ingest(client, run)
            await seen.until(await head_of(client))
            calls_before = dict(seen.calls)
            position = seen.feed.revision or 0
            await asyncio.to_thread(server.stop)
            with contextlib.ExitStack() as elsewhere:
                trimming = await start(elsewhere, "--grpc-port", "0", "--db", db, *short)
                async with TransactionClient(trimming.address) as writer:
                    for run in during:
                        await ingest(writer, run)
                    async with asyncio.timeout(DEADLINE):
                        while True:  # until the log no longer holds what the consumers need
                            try:
                                watch = writer.watch_transactions(
                                    start_revision=position, on_compacted="raise"
                                )
                                async for _ in watch:
                                    break
                            except RevisionCompacted as compacted:
                                if compacted.compacted_revision > position:
                                    break
                            await asyncio.sleep(0.2)
            server = await start(stack, "--grpc-port", port, "--db", db)
            for run in after:
                await ingest(client, run)
            await seen.until(await head_of(client))

            assert seen.feed.resyncs == 1
            assert seen.cache.resyncs == 1
            revisions = [c.revision for c in seen.changes()]
            assert revisions == sorted(set(revisions))
            resync = [i for i in seen.feed_items if isinstance(i, Snapshot)]
            assert all(s.resync for s in resync)
            # Every transaction as it was when re-read: those it missed changes of among them.
            assert {r["expect"]["transaction_id"] for r in during} <= {
                s.transaction.id for s in resync
            }
            # The single watch reconnects on its own backoff, which may end after the feed's
            # and the cache's caught up: wait for its resync too.
            async with asyncio.timeout(DEADLINE):
                while not any(isinstance(i, Snapshot) for i in seen.single_items):
                    await asyncio.sleep(0.05)
            single = [i for i in seen.single_items if isinstance(i, Snapshot)]
            assert [s.resync for s in single] == [True]
            assert single[0].transaction.id == before[0]["expect"]["transaction_id"]
            seen.check_handlers()
            assert {k: seen.calls[k] for k in calls_before} == calls_before
            for run in during:
                transaction = seen.cache.peek(transaction_id=run["expect"]["transaction_id"])
                assert transaction is not None
                if HANDLERS["completed"](transaction):
                    assert seen.calls[f"completed:{transaction.id}"] == 1


async def test_a_frozen_server_is_noticed_within_the_deadline(tmp_path: Path) -> None:
    """The server is SIGSTOPped: its connection stays open and answers nothing, not even
    keepalive pings. The watch notices the silence within three progress intervals (the server
    sends progress every 0.5 s here; the client's keepalive is 60 s, so it cannot be what
    noticed) and keeps trying; once the server is SIGCONTed it resumes, missing nothing."""
    env = server_env(TRANSACTION_SERVICE_WATCH_PROGRESS_SECONDS="0.5")
    with contextlib.ExitStack() as stack:
        server = await start(stack, "--grpc-port", "0", "--db", str(tmp_path / "x.db"), env=env)
        client = TransactionClient(
            server.address,
            progress_interval=0.5,
            keepalive_seconds=60,
            keepalive_timeout_seconds=20,
        )
        async with client:
            watch = client.watch_transactions(start_revision=0)
            seen: list[int] = []

            async def drain() -> None:
                async for item in watch:
                    seen.append(item.revision)

            task = asyncio.create_task(drain())
            first = runs(1)
            for run in first:
                await ingest(client, run)
            head = await head_of(client)
            async with asyncio.timeout(DEADLINE):
                while (watch.revision or 0) < head:
                    await asyncio.sleep(0.05)
            server.process.send_signal(signal.SIGSTOP)
            try:
                frozen_at = time.monotonic()
                async with asyncio.timeout(DEADLINE):
                    while watch.reconnects == 0:
                        await asyncio.sleep(0.05)
                noticed = time.monotonic() - frozen_at
            finally:
                server.process.send_signal(signal.SIGCONT)
            # The bound the issue asks for: 1.5 s of silence, plus a generous 10 s for a loaded
            # machine's scheduling (keepalive would take 60 + 20 s).
            assert noticed < watch.silence_timeout + 10, noticed
            for run in runs(1):
                await ingest(client, run)
            head = await head_of(client)
            async with asyncio.timeout(DEADLINE):
                while (watch.revision or 0) < head:
                    await asyncio.sleep(0.05)
            task.cancel()
            assert seen == list(range(1, head + 1))


async def test_replicas_behind_round_robin_with_one_killed(tmp_path: Path) -> None:
    """Two replicas on PostgreSQL behind one round_robin target; one is killed -9 while the
    consumers run and deliveries keep coming. Every revision once, in order; handlers once."""
    batches = [runs(2), runs(2)]
    order_id = next(iter(batches[1][0]["expect"]["orders"]))
    with fresh_database() as url, contextlib.ExitStack() as stack:
        replicas = [await start(stack, "--grpc-port", "0", "--db", url) for _ in range(2)]
        target = "ipv4:" + ",".join(f"127.0.0.1:{r.port}" for r in replicas)
        async with (
            TransactionClient(target, load_balancing="round_robin") as client,
            Consumer(client, order_id) as seen,
        ):
            for run in batches[0]:
                await ingest(client, run)
            replicas[0].process.kill()
            for run in batches[1]:
                await ingest(client, run)
            head = await head_of(client)
            await seen.until(head)
            assert [c.revision for c in seen.changes()] == list(range(1, head + 1))
            seen.check_single_watch()
            seen.check_handlers()


# -- checkpoints: a consumer process that restarts -----------------------------------------------


async def test_a_restarted_consumer_resumes_from_its_checkpoint(
    server: Server, tmp_path: Path
) -> None:
    """A watch and a cache with file checkpoints stop and start again (as a restarted process
    would): the watch goes on after the last item handed out and finished; the cache fires no
    handler twice and the ones for what happened while it was away once. On the very first
    start, what already satisfied a handler is recorded without a call."""
    first, second = runs(1), runs(1)
    path = tmp_path / "feed.ckpt"
    async with TransactionClient(server.address) as client:
        for run in first:
            await ingest(client, run)
        head = await head_of(client)
        calls: collections.Counter[str] = collections.Counter()

        def record(call: HandlerCall) -> None:
            calls[call.key] += 1

        def cache(checkpoint: FileCheckpoint) -> TransactionCache:
            made = TransactionCache(client, checkpoint=checkpoint)
            for name, predicate in HANDLERS.items():
                made.on(name, predicate, record)
            return made

        # Each FileCheckpoint is closed where the process it stands for would have exited.
        with contextlib.closing(FileCheckpoint(tmp_path / "cache.ckpt")) as checkpoint:
            async with cache(checkpoint) as warm:
                assert len(warm) == len(first)
        assert calls == {}  # the first start records what was there, calls nothing

        seen: list[int] = []
        with contextlib.closing(FileCheckpoint(path)) as checkpoint:
            watch = client.watch_transactions(start_revision=0, checkpoint=checkpoint)
            async for item in watch:
                seen.append(item.revision)
                if len(seen) == head // 2 + 1:
                    break  # the last item is handed out, not finished: it comes again
            await watch.aclose()
        for run in second:
            await ingest(client, run)
        new_head = await head_of(client)
        with contextlib.closing(FileCheckpoint(path)) as checkpoint:
            again = client.watch_transactions(start_revision=0, checkpoint=checkpoint)
            async for item in again:
                seen.append(item.revision)
                if item.revision == new_head:
                    break
            await again.aclose()
        assert seen[: head // 2] + seen[head // 2 + 1 :] == list(range(1, new_head + 1))

        with contextlib.closing(FileCheckpoint(tmp_path / "cache.ckpt")) as checkpoint:
            async with cache(checkpoint) as restarted:
                assert restarted.revision >= new_head  # the index: listed at start
                async with asyncio.timeout(DEADLINE):  # the handlers: the replay
                    while restarted.handled_revision < new_head:
                        await asyncio.sleep(0.05)
        assert [k for k, n in calls.items() if n != 1] == []
        assert {k.split(":", 1)[1] for k in calls} <= {
            r["expect"]["transaction_id"] for r in second
        }
        completed = [r for r in second if r["expect"]["status"] == "TRANSACTION_STATUS_COMPLETED"]
        assert {f"completed:{r['expect']['transaction_id']}" for r in completed} <= set(calls)

    holder = FileCheckpoint(path)
    await holder.load()
    with pytest.raises(ClientSetupError, match="in use"):
        await FileCheckpoint(path).load()


async def test_a_checkpoint_cut_short_by_a_crash_keeps_what_was_whole(tmp_path: Path) -> None:
    path = tmp_path / "c.ckpt"
    checkpoint = FileCheckpoint(path, compact_bytes=200)
    for revision in range(1, 30):
        await checkpoint.save(revision, [f"completed:t{revision}"])
    checkpoint.close()
    with path.open("ab") as f:
        f.write(b'{"revision": 99, "fi')  # the crash
    loaded = await FileCheckpoint(path).load()
    assert loaded is not None
    assert loaded.revision == 29
    assert loaded.fired == {f"completed:t{r}" for r in range(1, 30)}
    assert path.stat().st_size < 30 * 40  # compacted along the way


# -- the command line ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    server = ca.issue_cert("localhost", "127.0.0.1")
    server.cert_chain_pems[0].write_to_path(str(folder / "server.pem"))
    server.private_key_pem.write_to_path(str(folder / "server.key"))
    return folder


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "transaction_service", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "TRANSACTION_SERVICE_TOKEN"},
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """What a failed command said: exit 1 and exactly one line, no traceback, no repr."""
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert output.count("\n") == 1, output
    assert "Traceback" not in output
    assert "AioRpcError" not in output
    return output


@pytest.fixture(scope="module")
def tls_and_plaintext_servers(
    tmp_path_factory: pytest.TempPathFactory, pki: Path
) -> Iterator[tuple[Server, Server]]:
    """A server that wants TLS and one that does not, shared by the setup-mistake cases: each
    case's command fails to connect, so none changes what the next one finds."""
    folder = tmp_path_factory.mktemp("mistakes")
    tls = ("--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"))
    with (
        running_server(folder, "--grpc-port", "0", "--db", str(folder / "x.db"), *tls) as secure,
        running_server(folder, "--grpc-port", "0", "--db", str(folder / "y.db")) as plain,
    ):
        yield secure, plain


@pytest.mark.parametrize("command", ["health", "watch", "reconcile", "history"])
def test_setup_mistakes_are_one_line_with_a_hint(
    tls_and_plaintext_servers: tuple[Server, Server], pki: Path, command: str
) -> None:
    """A wrong port, plaintext against TLS, and TLS against plaintext: one line each, saying
    what to check."""
    secure, plain = tls_and_plaintext_servers
    extra = {"reconcile": ["--order-id", "o"], "history": ["o"]}.get(command, [])
    mistakes = [
        ("--address", "localhost:1"),
        ("--address", secure.address),
        ("--address", plain.address, "--ca", str(pki / "ca.pem")),
        ("--address", f"127.0.0.1:{plain.http_port}"),
    ]
    # At once: `history` retries UNAVAILABLE for a few seconds first (gRPC's retry policy); health
    # probes once, and reconcile and the watches are not retried by gRPC.
    with concurrent.futures.ThreadPoolExecutor(len(mistakes)) as pool:
        said = list(pool.map(lambda options: one_line(cli(command, *options, *extra)), mistakes))
    wrong_port, plaintext, wrong, http = said
    assert "nothing accepts connections at localhost:1" in wrong_port
    assert "it probably wants TLS" in plaintext
    assert "UNAVAILABLE" in plaintext
    assert "does not speak TLS" in wrong
    assert "answers HTTP/1, not gRPC" in http


def test_a_missing_client_certificate_is_one_line_with_a_hint(tmp_path: Path, pki: Path) -> None:
    tls = ("--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"))
    mutual = (*tls, "--tls-client-ca", str(pki / "ca.pem"))
    with running_server(tmp_path, "--grpc-port", "0", "--db", str(tmp_path / "x.db"), *mutual) as s:
        for command in ("health", "watch"):
            said = one_line(cli(command, "--address", s.address, "--ca", str(pki / "ca.pem")))
            assert "wants a client certificate" in said


def test_cli_watch_prints_resync_lines(tmp_path: Path) -> None:
    """`transaction-service watch` prints the resync items as `resync` lines."""
    from transaction_service.cli.watch import line_of

    state = Snapshot(pb.Transaction(id="t", revision=3), 7, resync=True)
    assert json.loads(json.dumps(line_of(state))) == {
        "resync": {"transaction": {"id": "t", "revision": "3"}, "progress_revision": "7"}
    }
    assert list(line_of(TransactionChange(revision=2))) == ["change"]


def test_tls_options_that_cannot_work_are_refused_at_once(tmp_path: Path) -> None:
    with pytest.raises(ClientSetupError, match="cannot read it"):
        TransactionClient("localhost:1", tls=TLS(ca=tmp_path / "missing.pem"))
    with pytest.raises(ClientSetupError, match="go together"):
        TransactionClient("localhost:1", tls=TLS(cert=b"x"))


def test_cli_watch_names_the_change_kinds_for_an_unknown_kind() -> None:
    """`--kind NOPE` said "Enum ChangeKind has no value defined for name 'CHANGE_KIND_NOPE'";
    now it lists the kinds. The prefixed name is taken too; UNSPECIFIED is not a kind."""
    from transaction_service.cli.watch import _kind

    for name in ("NOPE", "unspecified"):
        result = cli("watch", "--address", "localhost:1", "--kind", name)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        assert "is not a change kind; one of: TRANSACTION_CREATED," in result.stderr
        assert "Enum" not in result.stderr
    assert _kind("change_kind_redraw_available") == _kind("REDRAW_AVAILABLE") != 0
