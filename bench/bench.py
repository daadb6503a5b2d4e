"""`make bench`: the transaction service measured from outside, each figure against a ceiling
measured in the same run.

Run: `.venv/bin/python bench/bench.py [--quick | --smoke] [--json PATH] [--postgres URL |
--no-postgres]`
(`make bench` is the full run, `make bench-quick` the quick one; `--smoke` is the tiny run the
test suite uses to keep this from rotting; its figures mean nothing).

Processes: every server (`transaction-service serve`, on a fresh SQLite file with the default
synchronous=FULL, or a fresh PostgreSQL schema) runs in a process of its own; the load comes from
this process (grpc.aio, C calls in flight); the watchers of the fan-out cases from a third
process (`bench.py watchers`), so receiving 20,000 messages a second does not slow the
producer. The machine has 2 cores: servers and clients share them, as the table says.

Rows (the ceiling of each in brackets). Rows 1 to 4 alternate: the service and its ceiling run
side by side and are measured in turns, 5 rounds of each (3 quick), and a ratio is the median of
the rounds' ratios, so that both meet the same neighbours on a shared machine; the rates printed
are the totals over all rounds.
 1. echo: a bare grpc.aio server (`bench.py echo`, same gRPC options) answering IngestEvent and
    GetTransaction with a real response of the service, after parsing the request: gRPC and
    protobuf only, same message sizes, same concurrency.                                  [-]
 2. IngestEvent: distinct deliveries (fresh copies of the fixtures), C in flight; durable
    (fsync per commit).                                                              [echo 1]
 3. GetTransaction: random known order ids, C in flight.                             [echo 1]
 4. IngestEvents: one stream of distinct deliveries, 100 per request (`deliveries`), as a bulk
    loader sends them; against bare sqlite3 group commit of the
    same rows (per delivery: the event with its body, a change, the transaction upserted with
    body-sized knowledge and view, its orders indexed; a commit per 256 deliveries, WAL,
    synchronous=FULL, one thread, no gRPC, no parsing).                         [sqlite3 rows]
 5. fan-out: 1,000 WatchTransaction streams (one per transaction) and 100 WatchTransactions
    feeds open, 200 deliveries/s offered (unary IngestEvent) to those transactions: achieved
    ingest rate against the same offered load with no watcher, ingest latency, delivery lag
    (receipt minus the change's recorded_at, one clock) p50/p99 over every delivery to every
    watcher, and missed deliveries (expected from the ingest answers; must be 0). [no watchers]
 6. the same with 1,000 feeds (200,000 deliveries/s asked of the server); reported.
    Watchers of rows 5 and 6 ask for batches (`batch_changes`), as a client of that many feeds
    should.
 9. (issue 21) row 5 with watchers that do not ask for batches (what grpcurl or a naive client
    opens): one message per change per watcher, 20,000 messages/s asked of the server. Its own
    no-watcher rate is measured alongside; the watchers may lag, but must miss nothing (they are
    given 300 s to drain).                                                   [no watchers]
 8. (issue 6) IngestEvent latency, one call at a time, with 2,000 feed watchers open (batched,
    then not), against none.                                               [no watchers]
 7. GetTransaction latency, one call at a time, with 1k and with 300k transactions stored
    (the store grown through IngestEvents, i.e. the service's own bulk path, not a side load);
    bytes per transaction (database files / transactions); server memory per open watch
    (resident memory with the 1,100 watches of row 5 open, less before, over 1,100), and the
    same with those watches on `Watch` streams, 100 a stream, in a server of their own.
 PostgreSQL (issue 8), beside SQLite: IngestEvents events/s with one server, and with two
    servers on the same database (one stream each, summed); cross-replica watch delay p50/p99: a
    feed watcher on replica B, deliveries (50/s) to replica A.

Each figure is printed in a table and written to JSON (default bench/results.json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.scenario_tools import with_fresh_ids
from transaction_service.config import Settings
from transaction_service.server import grpc_options
from transactions.v1 import transactions_pb2 as pb
from transactions.v1 import transactions_pb2_grpc as pb_grpc

FIXTURES = ROOT / "tests" / "fixtures" / "junction"
LISTENING = re.compile(r"transaction-service listening on \S+:(\d+)")
SERVICE = "transactions.v1.TransactionService"
# Row 7's second figure: watches per `Watch` stream.
WATCHES_PER_STREAM = 100
DEFAULT_PG = os.environ.get(
    "TRANSACTION_SERVICE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


@dataclass(frozen=True)
class Size:
    """How much of everything a run does."""

    seconds: float  # per throughput measurement
    concurrency: int
    stream_events: int  # row 4
    single_watchers: int  # rows 5/6
    feed_watchers: int
    many_feeds: int
    offered_rate: float
    fanout_seconds: float
    many_feeds_seconds: float
    small_store: int  # row 7
    large_store: int
    latency_calls: int
    pg_events: int
    pg_watch_events: int
    # Rows 1-4 alternate between the service and its ceiling this many times (see unary_rows).
    rounds: int = 5


SIZES = {
    "full": Size(10, 32, 20_000, 1000, 100, 1000, 200, 10, 3, 1000, 300_000, 2000, 10_000, 300),
    "quick": Size(3, 32, 5_000, 1000, 100, 1000, 200, 4, 2, 1000, 30_000, 500, 3_000, 100, 3),
    "smoke": Size(0.5, 4, 200, 30, 2, 5, 50, 0.5, 0.3, 20, 60, 20, 100, 10, 1),
}


# -- workload ----------------------------------------------------------------------------------


def scenarios() -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(FIXTURES.glob("*.json"))]


def transactions(count: int) -> Iterator[dict[str, Any]]:
    """`count` fresh copies of the fixtures' scenarios, in turn: each its own transaction."""
    source = scenarios()
    for i in range(count):
        yield with_fresh_ids(source[i % len(source)])


def as_request(delivery: dict[str, Any]) -> pb.IngestEventRequest:
    return pb.IngestEventRequest(
        event_id=delivery["svix_id"], payload_json=json.dumps(delivery["body"])
    )


def first_deliveries(count: int) -> list[pb.IngestEventRequest]:
    """One delivery (the first) of each of `count` new transactions: one change each."""
    return [as_request(run["deliveries"][0]) for run in transactions(count)]


def percentile(values: Sequence[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# -- processes ---------------------------------------------------------------------------------


class Process:
    """A child process whose stderr (or stdout) is drained by a thread, so it never blocks."""

    def __init__(self, args: list[str], *, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        self.lines: list[str] = []
        self.out: list[str] = []
        self._seen = threading.Condition()
        for stream, sink in ((self.process.stderr, self.lines), (self.process.stdout, self.out)):
            threading.Thread(target=self._drain, args=(stream, sink), daemon=True).start()

    def _drain(self, stream: Any, sink: list[str]) -> None:
        for line in stream:
            with self._seen:
                if len(sink) < 10_000:
                    sink.append(line)
                self._seen.notify_all()

    def wait_for(self, pattern: re.Pattern[str], *, stdout: bool = False, timeout: float = 60):
        deadline = time.monotonic() + timeout
        sink = self.out if stdout else self.lines
        with self._seen:
            while True:
                for line in sink:
                    if match := pattern.search(line):
                        return match
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(
                        f"bench: {self.process.args} did not start:\n{''.join(self.lines[-30:])}"
                    )
                self._seen.wait(0.2)

    def rss_bytes(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextmanager
def server(db: str, **settings: str) -> Iterator[tuple[Process, str]]:
    """`transaction-service serve` on a free port with database `db`; (process, address)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSACTION_SERVICE_")}
    env |= {f"TRANSACTION_SERVICE_{k.upper()}": v for k, v in settings.items()}
    args = [sys.executable, "-m", "transaction_service", "serve"]
    args += ["--grpc-port", "0", "--http-port", "0", "--db", db]
    process = Process(args, env=env)
    try:
        port = process.wait_for(LISTENING).group(1)
        yield process, f"127.0.0.1:{port}"
    finally:
        process.stop()


@contextmanager
def echo_server(ingest_response: bytes, get_response: bytes) -> Iterator[str]:
    folder = Path(tempfile.mkdtemp(prefix="bench-echo-"))
    (folder / "ingest").write_bytes(ingest_response)
    (folder / "get").write_bytes(get_response)
    process = Process([sys.executable, str(Path(__file__)), "echo", str(folder)])
    try:
        port = process.wait_for(re.compile(r"port (\d+)"), stdout=True).group(1)
        yield f"127.0.0.1:{port}"
    finally:
        process.stop()


async def run_echo(folder: str) -> None:
    """A bare grpc.aio server: IngestEvent and GetTransaction parse the request and answer a
    canned response of the real service's size."""
    ingest = pb.IngestEventResponse.FromString(Path(folder, "ingest").read_bytes())
    get = pb.GetTransactionResponse.FromString(Path(folder, "get").read_bytes())

    async def ingest_handler(request: Any, context: Any) -> Any:
        return ingest

    async def get_handler(request: Any, context: Any) -> Any:
        return get

    handlers = {
        "IngestEvent": grpc.unary_unary_rpc_method_handler(
            ingest_handler,
            request_deserializer=pb.IngestEventRequest.FromString,
            response_serializer=pb.IngestEventResponse.SerializeToString,
        ),
        "GetTransaction": grpc.unary_unary_rpc_method_handler(
            get_handler,
            request_deserializer=pb.GetTransactionRequest.FromString,
            response_serializer=pb.GetTransactionResponse.SerializeToString,
        ),
    }
    server_ = grpc.aio.server(options=grpc_options(Settings()))
    server_.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server_.add_insecure_port("127.0.0.1:0")
    await server_.start()
    print(f"port {port}", flush=True)
    await server_.wait_for_termination()


# -- load --------------------------------------------------------------------------------------


@dataclass
class Load:
    calls: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0


async def closed_loop(
    call: Callable[[int], Awaitable[Any]], *, concurrency: int, seconds: float, limit: int
) -> Load:
    """`concurrency` workers calling `call(i)` for i = 0, 1, ... until `seconds` pass or `limit`
    calls were made."""
    load = Load()
    next_index = 0
    started = time.perf_counter()
    deadline = started + seconds

    async def worker() -> None:
        nonlocal next_index
        while time.perf_counter() < deadline and next_index < limit:
            index = next_index
            next_index += 1
            began = time.perf_counter()
            await call(index)
            load.latencies.append(time.perf_counter() - began)
            load.calls += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    load.seconds = time.perf_counter() - started
    return load


# Deliveries per IngestEvents request in the bulk rows (4, 7 and PostgreSQL), as a bulk loader
# sends them (`transaction-service ingest` does too).
PER_REQUEST = 100


async def stream_all(
    stub: Any, requests: list[pb.IngestEventRequest], per_request: int | None = None
) -> tuple[float, list[Any]]:
    """IngestEvents with every delivery, `per_request` (default PER_REQUEST) to a request;
    (seconds, one response per delivery)."""
    per_request = per_request or PER_REQUEST

    async def produce() -> Any:
        if per_request == 1:
            for item in requests:
                yield item
            return
        for i in range(0, len(requests), per_request):
            yield pb.IngestEventRequest(deliveries=requests[i : i + per_request])

    started = time.perf_counter()
    responses = []
    async for response in stub.IngestEvents(produce()):
        responses.extend(response.results if per_request > 1 else [response])
    return time.perf_counter() - started, responses


def channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(
        address,
        options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.use_local_subchannel_pool", 1),
        ],
    )


# -- rows --------------------------------------------------------------------------------------


def sqlite_group_commit(requests: list[pb.IngestEventRequest], path: Path) -> float:
    """Row 4's ceiling: the same rows a delivery writes, in plain sqlite3 (a new database at
    `path`); seconds."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.executescript(
        "CREATE TABLE events (seq INTEGER PRIMARY KEY, event_id TEXT UNIQUE, body BLOB,"
        " digest TEXT, order_id TEXT, outcome TEXT, revision INTEGER, received_at TEXT);"
        "CREATE TABLE changes (revision INTEGER PRIMARY KEY, transaction_id TEXT, view TEXT,"
        " recorded_at TEXT);"
        "CREATE TABLE transactions (id TEXT PRIMARY KEY, revision INTEGER, knowledge TEXT,"
        " view TEXT);"
        "CREATE TABLE order_transactions (order_id TEXT PRIMARY KEY, transaction_id TEXT)"
        " WITHOUT ROWID;"
    )
    now = datetime.now(UTC).isoformat()
    rows = []
    for revision, item in enumerate(requests, start=1):
        body = item.payload_json
        txn = json.loads(body)["data"].get("order_transaction", {}).get("id", item.event_id)
        order = json.loads(body)["data"]["id"]
        rows.append((item.event_id, body, txn, order, revision))
    started = time.perf_counter()
    for i in range(0, len(rows), 256):
        chunk = rows[i : i + 256]
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO events (event_id, body, digest, order_id, outcome, revision,"
            " received_at) VALUES (?, ?, 'd', ?, 'applied', ?, ?)",
            [(e, b.encode(), o, r, now) for e, b, _, o, r in chunk],
        )
        conn.executemany(
            "INSERT INTO changes VALUES (?, ?, ?, ?)", [(r, t, b, now) for _, b, t, _, r in chunk]
        )
        conn.executemany(
            "INSERT INTO transactions VALUES (?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
            " revision = excluded.revision, knowledge = excluded.knowledge, view = excluded.view",
            [(t, r, b, b) for _, b, t, _, r in chunk],
        )
        conn.executemany(
            "INSERT INTO order_transactions VALUES (?, ?) ON CONFLICT DO NOTHING",
            [(o, t) for _, _, t, o, _ in chunk],
        )
        conn.execute("COMMIT")
    seconds = time.perf_counter() - started
    conn.close()
    return seconds


def median(values: Sequence[float]) -> float:
    return percentile(values, 0.5)


async def alternate(
    rounds: int, service: Callable[[], Awaitable[Load]], ceiling: Callable[[], Awaitable[Load]]
) -> tuple[Load, Load, float]:
    """`rounds` rounds of the ceiling then the service, back to back: (the service's loads
    summed, the ceiling's summed, the median of the rounds' ratios). The machines here are
    shared: alternating puts both under the same neighbours, and the median of the rounds
    leaves out a round that one burst spoiled."""
    mine, theirs, ratios = Load(), Load(), []
    for _ in range(rounds):
        ceiling_load = await ceiling()
        load = await service()
        ratios.append(load.rate / ceiling_load.rate)
        for total, part in ((mine, load), (theirs, ceiling_load)):
            total.calls += part.calls
            total.seconds += part.seconds
            total.latencies += part.latencies
    return mine, theirs, median(ratios)


async def unary_rows(size: Size, folder: Path, results: dict[str, Any]) -> None:
    """Rows 1 to 4, on one SQLite server and the echo server, both running throughout."""
    pool = [
        as_request(d)
        for run in transactions(max(200, int(size.seconds * 2500)))
        for d in run["deliveries"]
    ]
    seconds = size.seconds / size.rounds
    with server(str(folder / "unary.db")) as (_, address):
        async with channel(address) as ch:
            stub = pb_grpc.TransactionServiceStub(ch)
            sample = await stub.IngestEvent(pool[0])
            got = await stub.GetTransaction(
                pb.GetTransactionRequest(order_id=sample.transaction.orders[0].id)
            )
            with echo_server(sample.SerializeToString(), got.SerializeToString()) as echo:
                async with channel(echo) as echo_ch:
                    echo_stub = pb_grpc.TransactionServiceStub(echo_ch)
                    sent = 1  # each delivery is ingested once: rounds go on through the pool

                    async def ingest_round() -> Load:
                        nonlocal sent
                        base = sent
                        load = await closed_loop(
                            lambda i: stub.IngestEvent(pool[base + i]),
                            concurrency=size.concurrency,
                            seconds=seconds,
                            limit=len(pool) - base,
                        )
                        sent += load.calls
                        return load

                    ingest, echo_ingest, ingest_ratio = await alternate(
                        size.rounds,
                        ingest_round,
                        lambda: closed_loop(
                            lambda i: echo_stub.IngestEvent(pool[i % len(pool)]),
                            concurrency=size.concurrency,
                            seconds=seconds,
                            limit=10**9,
                        ),
                    )
                    listed = await stub.ListTransactions(pb.ListTransactionsRequest(page_size=500))
                    order_ids = [o.id for t in listed.transactions for o in t.orders]
                    get, echo_get, get_ratio = await alternate(
                        size.rounds,
                        lambda: closed_loop(
                            lambda i: stub.GetTransaction(
                                pb.GetTransactionRequest(order_id=order_ids[i % len(order_ids)])
                            ),
                            concurrency=size.concurrency,
                            seconds=seconds,
                            limit=10**9,
                        ),
                        lambda: closed_loop(
                            lambda i: echo_stub.GetTransaction(
                                pb.GetTransactionRequest(order_id=order_ids[0])
                            ),
                            concurrency=size.concurrency,
                            seconds=seconds,
                            limit=10**9,
                        ),
                    )
    results["echo_ingest_rps"] = echo_ingest.rate
    results["echo_get_rps"] = echo_get.rate
    results["ingest_event_rps"] = ingest.rate
    results["ingest_event_ratio"] = ingest_ratio
    results["ingest_event_p50_ms"] = percentile(ingest.latencies, 0.5) * 1000
    results["ingest_event_p99_ms"] = percentile(ingest.latencies, 0.99) * 1000
    results["get_rps"] = get.rate
    results["get_ratio"] = get_ratio
    results["rounds"] = size.rounds
    results["message_bytes"] = {
        "ingest_request": pool[1].ByteSize(),
        "ingest_response": sample.ByteSize(),
        "get_response": got.ByteSize(),
    }

    # Row 4: one stream against bare sqlite3, alternating parts of the deliveries likewise; the
    # same with one delivery per request (as before requests carried several) for comparison.
    requests = first_deliveries(size.stream_events)
    singles = first_deliveries(size.stream_events // 4)
    part = -(-len(requests) // size.rounds)
    single_part = -(-len(singles) // size.rounds)
    streamed, ceiling, ratios = 0.0, 0.0, []
    single_streamed, single_ratios = 0.0, []
    with server(str(folder / "stream.db")) as (_process, address):
        async with channel(address) as ch:
            stub = pb_grpc.TransactionServiceStub(ch)
            for turn, k in enumerate(range(0, len(requests), part)):
                chunk = requests[k : k + part]
                bare = sqlite_group_commit(chunk, folder / f"ceiling-{k}.db")
                took, responses = await stream_all(stub, chunk)
                assert all(r.outcome == pb.INGEST_OUTCOME_APPLIED for r in responses), "refused"
                streamed, ceiling = streamed + took, ceiling + bare
                ratios.append(bare / took)
                few = singles[turn * single_part : (turn + 1) * single_part]
                took, responses = await stream_all(stub, few, per_request=1)
                assert all(r.outcome == pb.INGEST_OUTCOME_APPLIED for r in responses), "refused"
                single_streamed += took
                single_ratios.append(bare / len(chunk) / (took / len(few)))
    results["ingest_events_per_s"] = len(requests) / streamed
    results["sqlite_group_commit_per_s"] = len(requests) / ceiling
    results["ingest_events_ratio"] = median(ratios)
    results["ingest_events_single_per_s"] = len(singles) / single_streamed
    results["ingest_events_single_ratio"] = median(single_ratios)


async def latency(stub: Any, order_ids: list[str], calls: int) -> tuple[float, float]:
    times = []
    for _i in range(calls):
        began = time.perf_counter()
        await stub.GetTransaction(pb.GetTransactionRequest(order_id=random.choice(order_ids)))
        times.append(time.perf_counter() - began)
    return percentile(times, 0.5) * 1000, percentile(times, 0.99) * 1000


async def store_size_rows(size: Size, folder: Path, results: dict[str, Any]) -> None:
    """Row 7: GetTransaction latency at a small and a large store, bytes per transaction."""
    db = folder / "large.db"
    with server(str(db)) as (_process, address):
        async with channel(address) as ch:
            stub = pb_grpc.TransactionServiceStub(ch)
            loaded = 0
            order_ids: list[str] = []
            load_seconds = 0.0
            for target, name in ((size.small_store, "small"), (size.large_store, "large")):
                while loaded < target:
                    chunk = first_deliveries(min(20_000, target - loaded))
                    seconds, _responses = await stream_all(stub, chunk)
                    load_seconds += seconds
                    loaded += len(chunk)
                    order_ids += [json.loads(r.payload_json)["data"]["id"] for r in chunk[:500]]
                p50, p99 = await latency(stub, order_ids, size.latency_calls)
                results[f"get_latency_{name}_store"] = {
                    "transactions": loaded,
                    "p50_ms": p50,
                    "p99_ms": p99,
                }
            results["bulk_load_events_per_s"] = loaded / load_seconds
    files = [db, db.with_name(db.name + "-wal")]
    stored = sum(f.stat().st_size for f in files if f.exists())
    results["bytes_per_transaction"] = stored / size.large_store
    # Memory per open watch on `Watch` (many watches a stream): row 5's watches, 100 a stream, in
    # a server of their own (bench/watch_memory.py measures it, and says where the bytes go).
    import watch_memory

    multiplexed = await watch_memory.one_server(
        None,
        folder,
        size.single_watchers,
        size.feed_watchers,
        trace=False,
        bare=False,
        per_stream=WATCHES_PER_STREAM,
    )
    results["server_memory_per_multiplexed_watch_bytes"] = multiplexed["rss"]


# -- fan-out -------------------------------------------------------------------------------------


async def run_watchers(spec_path: str) -> None:
    """The watcher process of rows 5 and 6: opens the watches, says "ready", then records each
    change received until told the expected revisions on stdin; prints its figures as JSON."""
    spec = json.loads(Path(spec_path).read_text())
    singles: list[str] = spec["singles"]
    feeds: int = spec["feeds"]
    lags: list[float] = []
    received: dict[int, set[int]] = {}  # watcher -> revisions
    opened = 0
    everything_opened = asyncio.Event()
    total = len(singles) + feeds
    # One connection carries at most grpc_max_concurrent_streams streams (docs/limits.md): as a
    # client with this many watches must, spread them over enough channels (each its own
    # connection: `channel` uses a local subchannel pool).
    per_channel = Settings.model_fields["grpc_max_concurrent_streams"].default
    channels = [channel(spec["address"]) for _ in range(max(4, -(-total // per_channel)))]

    async def consume(index: int, call: Any) -> None:
        nonlocal opened
        first = True
        mine = received.setdefault(index, set())
        async for message in call:
            if first:
                first = False
                opened += 1
                if opened == total:
                    everything_opened.set()
            event = message.WhichOneof("event")
            if event in ("change", "changes"):
                now = time.time()
                batch = message.changes.changes if event == "changes" else [message.change]
                for change in batch:
                    mine.add(change.revision)
                    lags.append(now - change.recorded_at.ToNanoseconds() / 1e9)

    tasks = []
    for i, txn_id in enumerate(singles):
        stub = pb_grpc.TransactionServiceStub(channels[i % len(channels)])
        call = stub.WatchTransaction(
            pb.WatchTransactionRequest(transaction_id=txn_id, batch_changes=spec["batch"])
        )
        tasks.append(asyncio.create_task(consume(i, call)))
    for j in range(feeds):
        # Round-robin on from where the singles stopped: restarting at channel 0 put 101
        # streams on one connection (1,000 + 100 over 11), one past its cap, never opened.
        stub = pb_grpc.TransactionServiceStub(channels[(len(singles) + j) % len(channels)])
        call = stub.WatchTransactions(pb.WatchTransactionsRequest(batch_changes=spec["batch"]))
        tasks.append(asyncio.create_task(consume(len(singles) + j, call)))
    await everything_opened.wait()
    print("ready", flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    expected = json.loads(line)  # {"by_txn": {txn: [revisions]}, "all": [revisions]}
    wanted: dict[int, set[int]] = {
        i: set(expected["by_txn"].get(t, [])) for i, t in enumerate(singles)
    }
    for j in range(feeds):
        wanted[len(singles) + j] = set(expected["all"])
    deadline = time.monotonic() + spec["drain_seconds"]
    while time.monotonic() < deadline:
        if all(wanted[i] <= received.get(i, set()) for i in wanted):
            break
        await asyncio.sleep(0.05)
    missed = sum(len(wanted[i] - received.get(i, set())) for i in wanted)
    deliveries = sum(len(v) for v in wanted.values())
    print(
        json.dumps(
            {
                "missed": missed,
                "deliveries": deliveries,
                "lag_p50_ms": percentile(lags, 0.5) * 1000,
                "lag_p99_ms": percentile(lags, 0.99) * 1000,
            }
        ),
        flush=True,
    )
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ch in channels:
        await ch.close()


# Calls of `offered` that failed, by status code name (reported with the fan-out rows).
offered_failures: list[str] = []


async def offered(
    stub: Any, requests: list[pb.IngestEventRequest], rate: float
) -> tuple[float, list[float], list[Any]]:
    """Send the requests at `rate` per second (unary, open loop); (achieved rate, latencies,
    responses)."""
    latencies: list[float] = []
    responses: list[Any] = [None] * len(requests)
    started = time.perf_counter()

    async def send(i: int) -> None:
        began = time.perf_counter()
        try:
            responses[i] = await stub.IngestEvent(requests[i])
        except grpc.aio.AioRpcError as exc:
            # Counted, not fatal: an overloaded server's failures are part of the figure.
            offered_failures.append(exc.code().name)
            return
        latencies.append(time.perf_counter() - began)

    tasks = []
    for i in range(len(requests)):
        delay = started + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(i)))
    await asyncio.gather(*tasks)
    return len(requests) / (time.perf_counter() - started), latencies, responses


@contextmanager
def watcher_process(spec_path: Path, **spec: Any) -> Iterator[Process]:
    """The watcher process (`run_watchers`) for `spec` (address, singles, feeds, batch,
    drain_seconds), once every watch is open; stopped afterwards."""
    spec_path.write_text(json.dumps(spec))
    watchers = Process([sys.executable, str(Path(__file__)), "watchers", str(spec_path)])
    try:
        watchers.wait_for(re.compile("^ready"), stdout=True, timeout=300)
        yield watchers
    finally:
        watchers.stop()


async def fanout(
    size: Size,
    folder: Path,
    feeds: int,
    seconds: float,
    name: str,
    with_baseline: bool,
    *,
    batch: bool = True,
) -> dict[str, Any]:
    """Rows 5, 6 and 9 (and the memory per watch of row 7)."""
    runs = list(transactions(size.single_watchers))
    first = [as_request(r["deliveries"][0]) for r in runs]
    later = [as_request(d) for r in runs for d in r["deliveries"][1:]]
    random.Random(7).shuffle(later)
    count = int(size.offered_rate * seconds)
    measured = later[:count]
    baseline = later[count : 2 * count]
    figures: dict[str, Any] = {"offered_per_s": size.offered_rate}
    with server(str(folder / f"{name}.db")) as (process, address):
        async with channel(address) as ch:
            stub = pb_grpc.TransactionServiceStub(ch)
            await stream_all(stub, first)
            if with_baseline:
                rate, latencies, _ = await offered(stub, baseline, size.offered_rate)
                figures["no_watcher_ingest_per_s"] = rate
                figures["no_watcher_ingest_p99_ms"] = percentile(latencies, 0.99) * 1000
            rss_before = process.rss_bytes()
            with watcher_process(
                folder / f"{name}-watchers.json",
                address=address,
                singles=[r["expect"]["transaction_id"] for r in runs],
                feeds=feeds,
                batch=batch,
                drain_seconds=120 if batch else 300,
            ) as watchers:
                figures["server_memory_per_watch_bytes"] = (process.rss_bytes() - rss_before) / (
                    size.single_watchers + feeds
                )
                offered_failures.clear()
                rate, latencies, responses = await offered(stub, measured, size.offered_rate)
                figures["failed_calls"] = len(offered_failures)
                by_txn: dict[str, list[int]] = {}
                applied = []
                for response in responses:
                    if response is not None and response.outcome == pb.INGEST_OUTCOME_APPLIED:
                        by_txn.setdefault(response.transaction.id, []).append(response.revision)
                        applied.append(response.revision)
                assert watchers.process.stdin is not None
                watchers.process.stdin.write(json.dumps({"by_txn": by_txn, "all": applied}) + "\n")
                watchers.process.stdin.flush()
                result = json.loads(
                    watchers.wait_for(re.compile(r"^\{.*\}$"), stdout=True, timeout=300).group(0)
                )
    figures |= {
        "watchers": f"{size.single_watchers} single + {feeds} {'' if batch else 'unbatched '}feeds",
        "ingest_per_s": rate,
        "ingest_p50_ms": percentile(latencies, 0.5) * 1000,
        "ingest_p99_ms": percentile(latencies, 0.99) * 1000,
        "changes": len(applied),
        **result,
    }
    return figures


async def latency_with_feeds(size: Size, folder: Path, feeds: int) -> dict[str, Any]:
    """Row 8 (issue 6): IngestEvent latency, one call at a time, with `feeds` open feed watchers
    (batched, and not), against none."""
    figures: dict[str, Any] = {"feeds": feeds}
    requests = first_deliveries(size.latency_calls * 4)
    parts = iter(requests[i::4] for i in range(4))
    with server(str(folder / "feeds.db")) as (_, address):
        async with channel(address) as ch:
            stub = pb_grpc.TransactionServiceStub(ch)
            figures["none"] = await sequential_latency(stub, next(parts))
            for batch in (True, False):
                with watcher_process(
                    folder / f"feeds-{batch}.json",
                    address=address,
                    singles=[],
                    feeds=feeds,
                    batch=batch,
                    drain_seconds=60,
                ):
                    key = "batched" if batch else "unbatched"
                    part = next(parts)
                    # Unbatched, each call waits behind thousands of messages: fewer calls.
                    figures[key] = await sequential_latency(
                        stub, part if batch else part[: max(10, len(part) // 10)]
                    )
    return figures


async def sequential_latency(stub: Any, requests: list[pb.IngestEventRequest]) -> dict[str, float]:
    latencies = []
    for request in requests:
        began = time.perf_counter()
        await stub.IngestEvent(request)
        latencies.append(time.perf_counter() - began)
    return {
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
    }


# -- PostgreSQL ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def pg_schema(url: str) -> AsyncIterator[str]:
    """A fresh schema on the server, dropped afterwards; its URL."""
    import asyncpg

    schema = f"bench_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
        sep = "&" if "?" in url else "?"
        yield f"{url}{sep}search_path={schema}"
    finally:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await conn.close()


async def pg_unavailable(url: str) -> str | None:
    """None if the server answers; else why not."""
    import asyncpg

    try:
        conn = await asyncpg.connect(url, timeout=3)
    except Exception as exc:  # any failure: no PostgreSQL rows, and the table says why
        return f"no PostgreSQL at {url} ({type(exc).__name__})"
    await conn.close()
    return None


async def postgres_rows(size: Size, url: str, results: dict[str, Any]) -> None:
    async with pg_schema(url) as db:
        for replicas in (1, 2):
            with contextmanager_stack(replicas, db) as addresses:
                channels = [channel(a) for a in addresses]
                try:
                    streams = [first_deliveries(size.pg_events // replicas) for _ in addresses]
                    started = time.perf_counter()
                    done = await asyncio.gather(
                        *(
                            stream_all(pb_grpc.TransactionServiceStub(c), s)
                            for c, s in zip(channels, streams, strict=True)
                        )
                    )
                    seconds = time.perf_counter() - started
                    events = sum(len(r) for _, r in done)
                    results[f"pg_ingest_events_per_s_{replicas}_replica"] = events / seconds
                    if replicas == 2:
                        results["pg_cross_replica_watch"] = await cross_replica(size, channels)
                finally:
                    for c in channels:
                        await c.close()


@contextmanager
def contextmanager_stack(count: int, db: str) -> Iterator[list[str]]:
    servers = [server(db) for _ in range(count)]
    addresses = []
    try:
        for s in servers:
            addresses.append(s.__enter__()[1])
        yield addresses
    finally:
        for s in reversed(servers):
            s.__exit__(None, None, None)


async def cross_replica(size: Size, channels: list[grpc.aio.Channel]) -> dict[str, float]:
    """A feed watcher on replica B, deliveries to replica A at 50/s: receipt minus recorded_at."""
    a, b = (pb_grpc.TransactionServiceStub(c) for c in channels)
    lags: list[float] = []
    call = b.WatchTransactions(pb.WatchTransactionsRequest())
    await call.read()  # the opening progress: the watch is live
    requests = first_deliveries(size.pg_watch_events)
    wanted = len(requests)

    async def watch() -> None:
        while len(lags) < wanted:
            message = await call.read()
            if message.WhichOneof("event") == "change":
                lags.append(time.time() - message.change.recorded_at.ToNanoseconds() / 1e9)

    watching = asyncio.create_task(watch())
    await offered(a, requests, 50)
    await asyncio.wait_for(watching, 60)
    call.cancel()
    return {"p50_ms": percentile(lags, 0.5) * 1000, "p99_ms": percentile(lags, 0.99) * 1000}


# -- report --------------------------------------------------------------------------------------


def table(results: dict[str, Any]) -> str:
    r = results
    rows = [
        ("1 echo IngestEvent (ceiling)", f"{r['echo_ingest_rps']:.0f} rps", "1.00"),
        ("1 echo GetTransaction (ceiling)", f"{r['echo_get_rps']:.0f} rps", "1.00"),
        (
            "2 IngestEvent, durable",
            f"{r['ingest_event_rps']:.0f} rps (p50 {r['ingest_event_p50_ms']:.1f} ms,"
            f" p99 {r['ingest_event_p99_ms']:.1f} ms)",
            f"{r['ingest_event_ratio']:.2f} x echo",
        ),
        ("3 GetTransaction", f"{r['get_rps']:.0f} rps", f"{r['get_ratio']:.2f} x echo"),
        (
            f"4 IngestEvents, one stream, {PER_REQUEST} per request",
            f"{r['ingest_events_per_s']:.0f} events/s",
            f"{r['ingest_events_ratio']:.2f} x sqlite3 ({r['sqlite_group_commit_per_s']:.0f}/s)",
        ),
        (
            "4 IngestEvents, one stream, 1 per request",
            f"{r['ingest_events_single_per_s']:.0f} events/s",
            f"{r['ingest_events_single_ratio']:.2f} x sqlite3",
        ),
    ]
    for key, label in (
        ("fanout", "5 fan-out"),
        ("fanout_many_feeds", "6 fan-out"),
        ("fanout_unbatched", "9 fan-out"),
    ):
        f = r.get(key)
        if not f:
            continue
        base = f.get("no_watcher_ingest_per_s") or r["fanout"]["no_watcher_ingest_per_s"]
        rows.append(
            (
                f"{label}: {f['watchers']}, {f['offered_per_s']:.0f}/s offered",
                f"ingest {f['ingest_per_s']:.0f}/s (p99 {f['ingest_p99_ms']:.0f} ms); lag p50"
                f" {f['lag_p50_ms']:.0f} ms, p99 {f['lag_p99_ms']:.0f} ms; missed {f['missed']}"
                f" of {f['deliveries']}"
                + (f"; {f['failed_calls']} ingest calls failed" if f.get("failed_calls") else ""),
                f"{f['ingest_per_s'] / base:.2f} x no watchers ({base:.0f}/s)" if base else "",
            )
        )
    if lat := r.get("latency_with_feeds"):
        none = lat["none"]
        for key in ("batched", "unbatched"):
            got = lat[key]
            rows.append(
                (
                    f"8 IngestEvent latency, {lat['feeds']:,} {key} feeds",
                    f"p50 {got['p50_ms']:.1f} ms, p99 {got['p99_ms']:.1f} ms (none: p50"
                    f" {none['p50_ms']:.1f}, p99 {none['p99_ms']:.1f})",
                    f"{got['p50_ms'] / none['p50_ms']:.2f} x none (p50)",
                )
            )
    for name in ("small", "large"):
        g = r.get(f"get_latency_{name}_store")
        if g:
            rows.append(
                (
                    f"7 GetTransaction, {g['transactions']:,} stored",
                    f"p50 {g['p50_ms']:.2f} ms, p99 {g['p99_ms']:.2f} ms (one at a time)",
                    "",
                )
            )
    if "bytes_per_transaction" in r:
        rows.append(("7 bytes per transaction (SQLite)", f"{r['bytes_per_transaction']:.0f}", ""))
        rows.append(
            ("7 bulk load through IngestEvents", f"{r['bulk_load_events_per_s']:.0f} events/s", "")
        )
    if "server_memory_per_watch_bytes" in r.get("fanout", {}):
        rows.append(
            (
                "7 server memory per open watch",
                f"{r['fanout']['server_memory_per_watch_bytes'] / 1024:.1f} KiB",
                "",
            )
        )
    if "server_memory_per_multiplexed_watch_bytes" in r:
        rows.append(
            (
                f"7 server memory per open watch, on Watch ({WATCHES_PER_STREAM} a stream)",
                f"{r['server_memory_per_multiplexed_watch_bytes'] / 1024:.1f} KiB",
                "",
            )
        )
    if "pg_ingest_events_per_s_1_replica" in r:
        one = r["pg_ingest_events_per_s_1_replica"]
        two = r["pg_ingest_events_per_s_2_replica"]
        rows.append(
            (
                "PG IngestEvents, 1 replica",
                f"{one:.0f} events/s",
                f"{one / r['ingest_events_per_s']:.2f} x SQLite row 4",
            )
        )
        rows.append(
            ("PG IngestEvents, 2 replicas", f"{two:.0f} events/s", f"{two / one:.2f} x 1 replica")
        )
        w = r["pg_cross_replica_watch"]
        rows.append(
            (
                "PG cross-replica watch delay",
                f"p50 {w['p50_ms']:.0f} ms, p99 {w['p99_ms']:.0f} ms",
                "",
            )
        )
    elif "pg_skipped" in r:
        rows.append(("PG rows", f"skipped: {r['pg_skipped']}", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [
        f"{r['mode']} run, {r['cores']} cores shared by the servers and the clients; "
        f"{r['started']}",
        f"rows 2-4: the ratio is the median of {r.get('rounds', 1)} rounds alternating with the"
        " ceiling; rates are totals",
        "",
    ]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    size = SIZES[mode]
    results: dict[str, Any] = {
        "mode": mode,
        "cores": os.cpu_count(),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "note": "servers and clients share the machine's cores; ratios are to ceilings measured"
        " in the same run",
    }
    folder = Path(tempfile.mkdtemp(prefix="bench-"))
    stages: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        ("rows 1-4", lambda: unary_rows(size, folder, results)),
        (
            "row 5",
            lambda: _set(
                results,
                "fanout",
                fanout(size, folder, size.feed_watchers, size.fanout_seconds, "fanout", True),
            ),
        ),
        (
            "row 6",
            lambda: _set(
                results,
                "fanout_many_feeds",
                fanout(size, folder, size.many_feeds, size.many_feeds_seconds, "many", False),
            ),
        ),
        (
            "row 9",
            lambda: _set(
                results,
                "fanout_unbatched",
                fanout(
                    size,
                    folder,
                    size.feed_watchers,
                    size.fanout_seconds,
                    "unbatched",
                    True,
                    batch=False,
                ),
            ),
        ),
        (
            "row 8",
            lambda: _set(
                results, "latency_with_feeds", latency_with_feeds(size, folder, size.many_feeds * 2)
            ),
        ),
        ("row 7", lambda: store_size_rows(size, folder, results)),
    ]
    if args.only == "ingest":
        stages = stages[:1]
    elif not args.no_postgres:
        reason = await pg_unavailable(args.postgres)
        if reason is None:
            stages.append(("PostgreSQL rows", lambda: postgres_rows(size, args.postgres, results)))
        else:
            results["pg_skipped"] = reason[:120]
    for name, stage in stages:
        began = time.perf_counter()
        print(f"bench: {name}...", file=sys.stderr, flush=True)
        await stage()
        print(
            f"bench: {name} took {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True
        )
        # What is measured so far survives a later stage's failure.
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


async def _set(results: dict[str, Any], key: str, value: Awaitable[Any]) -> None:
    results[key] = await value


def main() -> int:
    global PER_REQUEST
    if len(sys.argv) > 1 and sys.argv[1] == "echo":
        asyncio.run(run_echo(sys.argv[2]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "watchers":
        asyncio.run(run_watchers(sys.argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer seconds and a 30k store")
    parser.add_argument("--smoke", action="store_true", help="tiny: only proves the bench runs")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results.json"))
    parser.add_argument("--postgres", default=DEFAULT_PG, help="server for the PostgreSQL rows")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument(
        "--per-request",
        type=int,
        default=PER_REQUEST,
        help=f"deliveries per IngestEvents request in the bulk rows (default {PER_REQUEST}; 1 "
        "for a server without `deliveries`)",
    )
    parser.add_argument(
        "--only",
        choices=["ingest"],
        help="ingest: rows 1-4 only (the echo and sqlite3 ceilings with IngestEvent, "
        "GetTransaction and IngestEvents), for A/B runs of the write path",
    )
    args = parser.parse_args()
    PER_REQUEST = args.per_request
    results = asyncio.run(main_async(args))
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nwritten to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
