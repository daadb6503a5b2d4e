"""Ingest and read throughput of the transaction service, as ratios to a ceiling measured alongside.

Run: `.venv/bin/python bench/ingest_bench.py [--events N] [--synchronous FULL|NORMAL]`.

The workload is built from the provider-shaped fixtures in tests/fixtures/junction: each copy of a
scenario gets fresh uuid4 order ids and a fresh order-transaction id (every place they occur:
data.id, data.order_transaction.id, order_transaction.orders[].id and parent_id), and each delivery
a fresh svix id. A transaction's deliveries stay together in the stream but are shuffled among
themselves (out-of-order delivery), and about 10% are sent twice with the same svix id (retries,
which must be answered DUPLICATE). All stages start from the same JSON text.

Stages, run one after another on the same temporary folder (same disk), each on a fresh database:

  (a0) sqlite bulk: one thread inserts (event id, body) rows into one table, committing every
       max_batch rows. No producers, no acknowledgements. Context only: the disk and SQLite alone.
  (a)  CEILING: the same plain table and commit size cap, fed the way the service is fed:
       `--concurrency` asyncio producers each wait for the commit holding their row, and a single
       writer thread commits whatever is queued (group commit). It is measured before and after the
       service stages; the better of the two is the ceiling. This is the fastest any durable
       ingest with per-delivery acknowledgement could be here.
  (b)  SERVICE USE CASE: SqliteStore + Ingestor; every producer calls `decode_delivery` then
       `await ingestor.ingest(...)`: parsing, dedupe, merge, change log, event log.
  (c)  END TO END: the real gRPC service started in-process (TransactionService, port 0), driven by
       a grpc.aio client calling IngestEvent with payload_json, on a subset of whole transactions.
       Client and server share one process and one event loop, so client costs count against it.
  (d)  READS: GetTransaction by order id for random known orders, through the same gRPC server.

How to read the table: the machine is shared and noisy, so absolute events/s mean little from run
to run. The ratio column ("x ceiling") divides a stage's events/s by the ceiling's, measured
minutes apart in the same process on the same disk, and is what to compare across runs and
machines. With synchronous=FULL the ceiling is bounded by fsync latency and the commit size, so the
ratio shows how much of the durable budget the domain work costs; with NORMAL (no fsync per commit)
the ceiling is mostly CPU, so the ratio shows raw per-event overhead. Latencies are per call, from
the producer's point of view (decode to acknowledgement). "commits" and "mean batch" count the
store's write transactions; with C producers waiting for acknowledgement no batch can exceed C.

After (b), and again after (c), every synthetic transaction is read back with the store's `get`
and compared with the fixture's `expect` (status, initial/redraw/current order ids, redraw
availability, each order's origin and low-level status, ids mapped to the copy's). The outcome
counts must show exactly one DUPLICATE per injected retry. Any mismatch exits non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import shutil
import sqlite3
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from transaction_service.config import Settings
from transaction_service.ingest import Ingestor, decode_delivery
from transaction_service.server import TransactionService
from transaction_service.store.base import Store
from transaction_service.store.sqlite import SqliteStore
from transactions.v1 import transactions_pb2 as pb
from transactions.v1 import transactions_pb2_grpc as pb_grpc

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "junction"
DUPLICATE_RATE = 0.10


# --------------------------------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One delivery as a webhook forwarder would hand it over."""

    event_id: str
    payload_json: str


@dataclass
class Copy:
    """One synthetic transaction: its deliveries (shuffled, with retries) and what must result."""

    scenario: str
    transaction_id: str
    order_ids: list[str]
    expect: dict[str, Any]
    items: list[Item]
    duplicates: int


@dataclass
class Workload:
    copies: list[Copy]

    @property
    def items(self) -> list[Item]:
        return [item for copy in self.copies for item in copy.items]

    @property
    def duplicates(self) -> int:
        return sum(c.duplicates for c in self.copies)

    def head(self, limit: int) -> Workload:
        """Whole transactions from the front, up to about `limit` deliveries."""
        taken, count = [], 0
        for copy in self.copies:
            if count >= limit:
                break
            taken.append(copy)
            count += len(copy.items)
        return Workload(taken)


def _scenario_ids(scenario: dict[str, Any]) -> list[str]:
    """The order ids and order-transaction id a scenario uses, in first-seen order."""
    found: dict[str, None] = {}
    for delivery in scenario["deliveries"]:
        data = delivery["body"].get("data") or {}
        if data.get("id"):
            found[data["id"]] = None
        block = data.get("order_transaction") or {}
        if block.get("id"):
            found[block["id"]] = None
        for order in block.get("orders") or []:
            for key in ("id", "parent_id"):
                if order.get(key):
                    found[order[key]] = None
    return list(found)


def _rewrite(value: Any, ids: dict[str, str]) -> Any:
    # The ids are uuids, so an exact string match can only be one of them.
    if isinstance(value, dict):
        return {ids.get(k, k): _rewrite(v, ids) for k, v in value.items()}
    if isinstance(value, list):
        return [_rewrite(v, ids) for v in value]
    if isinstance(value, str):
        return ids.get(value, value)
    return value


def build_workload(events: int, rng: random.Random) -> Workload:
    scenarios = [json.loads(p.read_text()) for p in sorted(FIXTURES.glob("*.json"))]
    if not scenarios:
        raise SystemExit(f"no fixtures in {FIXTURES}")
    prepared = [(s, _scenario_ids(s)) for s in scenarios]

    def fresh_uuid() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    copies: list[Copy] = []
    total = 0
    while total < events:
        scenario, old_ids = rng.choice(prepared)
        ids = {old: fresh_uuid() for old in old_ids}
        items = [
            Item(f"msg_{rng.getrandbits(128):032x}", json.dumps(_rewrite(d["body"], ids)))
            for d in scenario["deliveries"]
        ]
        retries = [item for item in items if rng.random() < DUPLICATE_RATE]
        items.extend(retries)
        rng.shuffle(items)
        expect = scenario["expect"]
        copies.append(
            Copy(
                scenario=scenario["scenario"],
                transaction_id=ids[expect["transaction_id"]],
                order_ids=[ids[o] for o in expect["orders"]],
                expect=_rewrite(expect, ids),
                items=items,
                duplicates=len(retries),
            )
        )
        total += len(items)
    return Workload(copies)


# --------------------------------------------------------------------------------------------------
# Measurement helpers
# --------------------------------------------------------------------------------------------------


@dataclass
class Result:
    label: str
    count: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    commits: int | None = None
    rows_committed: int | None = None
    outcomes: Counter[str] = field(default_factory=Counter)
    errors: int = 0

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def drive(
    inputs: Iterable[Any],
    call: Callable[[Any], Awaitable[str]],
    concurrency: int,
    result: Result,
) -> None:
    """Run `call` over inputs with `concurrency` producers; record latency and outcome of each."""
    source: Iterator[Any] = iter(inputs)

    async def producer() -> None:
        # Producers share one iterator; safe because next() never awaits.
        for value in source:
            started = time.perf_counter()
            try:
                outcome = await call(value)
            except Exception as exc:
                result.errors += 1
                if result.errors <= 5:
                    print(f"  {result.label}: {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            result.latencies.append(time.perf_counter() - started)
            result.outcomes[outcome] += 1
            result.count += 1

    started = time.perf_counter()
    await asyncio.gather(*(producer() for _ in range(concurrency)))
    result.seconds = time.perf_counter() - started


class CommitCounter:
    """Wraps a store's run_batch to count write transactions and the work items in them."""

    def __init__(self, store: Store) -> None:
        self.commits = 0
        self.rows = 0
        inner = store.run_batch

        async def run_batch(work: Sequence[Callable[[Any], Any]]) -> list[Any]:
            results = await inner(work)
            self.commits += 1
            self.rows += len(work)
            return results

        store.run_batch = run_batch  # type: ignore[method-assign]


# --------------------------------------------------------------------------------------------------
# (a0), (a): plain SQLite
# --------------------------------------------------------------------------------------------------


def _open_plain(path: Path, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.execute("CREATE TABLE events (event_id TEXT PRIMARY KEY, body BLOB NOT NULL)")
    return conn


def _insert(conn: sqlite3.Connection, rows: list[tuple[str, bytes]]) -> None:
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany("INSERT OR IGNORE INTO events (event_id, body) VALUES (?, ?)", rows)
    conn.execute("COMMIT")


def bench_bulk(path: Path, items: list[Item], synchronous: str, max_batch: int) -> Result:
    result = Result("(a0) sqlite bulk, 1 thread, no acks")
    rows = [(i.event_id, i.payload_json.encode()) for i in items]
    conn = _open_plain(path, synchronous)
    try:
        started = time.perf_counter()
        for start in range(0, len(rows), max_batch):
            _insert(conn, rows[start : start + max_batch])
        result.seconds = time.perf_counter() - started
    finally:
        conn.close()
    result.count = len(rows)
    result.commits = -(-len(rows) // max_batch)
    result.rows_committed = len(rows)
    return result


async def bench_ceiling(
    label: str,
    path: Path,
    items: list[Item],
    synchronous: str,
    max_batch: int,
    concurrency: int,
) -> Result:
    """Group commit with no domain: producers queue (id, body) and wait for the commit."""
    result = Result(label, commits=0, rows_committed=0)
    conn = _open_plain(path, synchronous)
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ceiling-writer")
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[tuple[str, bytes], asyncio.Future[None]] | None] = asyncio.Queue()

    async def write_loop() -> None:
        while (first := await queue.get()) is not None:
            batch = [first]
            stop = False
            while len(batch) < max_batch and not queue.empty():
                entry = queue.get_nowait()
                if entry is None:
                    stop = True
                    break
                batch.append(entry)
            try:
                await loop.run_in_executor(writer, _insert, conn, [row for row, _ in batch])
            except Exception as exc:
                for _, done in batch:
                    done.set_exception(exc)
            else:
                for _, done in batch:
                    done.set_result(None)
            result.commits = (result.commits or 0) + 1
            result.rows_committed = (result.rows_committed or 0) + len(batch)
            if stop:
                return

    async def call(item: Item) -> str:
        done: asyncio.Future[None] = loop.create_future()
        queue.put_nowait(((item.event_id, item.payload_json.encode()), done))
        await done
        return "committed"

    task = asyncio.create_task(write_loop())
    try:
        await drive(items, call, concurrency, result)
    finally:
        queue.put_nowait(None)
        await task
        await loop.run_in_executor(writer, conn.close)
        writer.shutdown(wait=True)
    return result


# --------------------------------------------------------------------------------------------------
# (b): the use case; correctness check
# --------------------------------------------------------------------------------------------------


def _status_name(value: str) -> str:
    return f"TRANSACTION_STATUS_{value.upper()}"


def _origin_name(value: str) -> str:
    return f"ORDER_ORIGIN_{value.upper() or 'UNSPECIFIED'}"


async def verify(store: Store, workload: Workload, label: str) -> list[str]:
    """Compare each synthetic transaction in the store with its fixture's expectation."""
    problems: list[str] = []
    for copy in workload.copies:
        snapshot, _ = await store.get(copy.transaction_id)
        where = f"{label} {copy.scenario} {copy.transaction_id}"
        if snapshot is None:
            problems.append(f"{where}: missing")
            continue
        view, want = snapshot.view, copy.expect
        got = {
            "status": _status_name(view.status.value),
            "initial_order_id": view.initial_order_id,
            "redraw_order_id": view.redraw_order_id,
            "current_order_id": view.current_order_id,
            "redraw_available": view.redraw_available,
            "orders": {
                o.id: [_origin_name(o.origin.value), o.low_level_status] for o in view.orders
            },
        }
        for key, value in got.items():
            if key in want and want[key] != value:
                problems.append(f"{where}: {key} is {value!r}, expected {want[key]!r}")
    return problems


def check_outcomes(result: Result, workload: Workload) -> list[str]:
    problems = []
    if result.errors:
        problems.append(f"{result.label}: {result.errors} calls failed")
    duplicates = result.outcomes.get("duplicate", 0)
    if duplicates != workload.duplicates:
        problems.append(
            f"{result.label}: {duplicates} DUPLICATE outcomes for {workload.duplicates} retries"
        )
    return problems


async def bench_service(
    path: Path, workload: Workload, settings: Settings, concurrency: int
) -> tuple[Result, list[str]]:
    result = Result("(b)  service: decode + Ingestor")
    store = SqliteStore(path, synchronous=settings.sqlite_synchronous)
    await store.open()
    counter = CommitCounter(store)
    ingestor = Ingestor(store, max_batch=settings.max_batch)
    ingestor.start()
    try:

        async def call(item: Item) -> str:
            delivery = decode_delivery(
                item.event_id,
                payload_json=item.payload_json,
                max_body_bytes=settings.max_body_bytes,
            )
            return (await ingestor.ingest(delivery)).outcome.value

        try:
            await drive(workload.items, call, concurrency, result)
        finally:
            await ingestor.stop()
        result.commits, result.rows_committed = counter.commits, counter.rows
        problems = check_outcomes(result, workload) + await verify(store, workload, "(b)")
    finally:
        await store.close()
    return result, problems


# --------------------------------------------------------------------------------------------------
# (c), (d): through gRPC
# --------------------------------------------------------------------------------------------------

_PB_OUTCOME = {
    pb.INGEST_OUTCOME_APPLIED: "applied",
    pb.INGEST_OUTCOME_DUPLICATE: "duplicate",
    pb.INGEST_OUTCOME_STALE: "stale",
    pb.INGEST_OUTCOME_IGNORED: "ignored",
}


async def bench_grpc(
    settings: Settings,
    workload: Workload,
    concurrency: int,
    reads: int,
    rng: random.Random,
) -> tuple[Result, Result, list[str]]:
    ingest = Result("(c)  gRPC IngestEvent, end to end")
    get = Result("(d)  gRPC GetTransaction by order")
    service = TransactionService(settings)
    counter = CommitCounter(service.store)
    problems: list[str] = []
    try:
        port = await service.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TransactionServiceStub(channel)
            await channel.channel_ready()

            async def ingest_call(item: Item) -> str:
                request = pb.IngestEventRequest(
                    event_id=item.event_id, payload_json=item.payload_json
                )
                response = await stub.IngestEvent(request)
                return _PB_OUTCOME.get(response.outcome, str(response.outcome))

            await drive(workload.items, ingest_call, concurrency, ingest)
            ingest.commits, ingest.rows_committed = counter.commits, counter.rows
            problems += check_outcomes(ingest, workload)
            problems += await verify(service.store, workload, "(c)")

            expected = {
                order_id: copy.expect["status"]
                for copy in workload.copies
                for order_id in copy.order_ids
            }
            known = list(expected)
            lookups = [rng.choice(known) for _ in range(reads)]

            async def get_call(order_id: str) -> str:
                response = await stub.GetTransaction(pb.GetTransactionRequest(order_id=order_id))
                status = pb.TransactionStatus.Name(response.transaction.status)
                return "ok" if status == expected[order_id] else "wrong status"

            await drive(lookups, get_call, concurrency, get)
            if get.errors or get.outcomes.get("wrong status"):
                problems.append(
                    f"{get.label}: {get.errors} failed, {get.outcomes.get('wrong status', 0)}"
                    " returned a status other than expected"
                )
    finally:
        await service.stop()
    return ingest, get, problems


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return f"{value * 1000:.2f}" if value is not None else "-"


def print_table(results: list[Result], ceiling: Result) -> None:
    header = (
        f"{'stage':<40} {'events':>7} {'events/s':>9} {'x ceiling':>9} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'commits':>8} {'mean batch':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        ratio = "-" if r.label.startswith("(d)") else f"{r.rate / ceiling.rate:.3f}"
        commits = str(r.commits) if r.commits is not None else "-"
        batch = f"{r.rows_committed / r.commits:.1f}" if r.commits and r.rows_committed else "-"
        print(
            f"{r.label:<40} {r.count:>7} {r.rate:>9.0f} {ratio:>9} "
            f"{_ms(r.percentile(50)):>8} {_ms(r.percentile(99)):>8} {commits:>8} {batch:>10}"
        )


async def run(args: argparse.Namespace, folder: Path) -> int:
    rng = random.Random(args.seed)
    settings = Settings(
        grpc_host="127.0.0.1",
        grpc_port=0,
        http_host="127.0.0.1",
        http_port=0,
        db=folder / "grpc.db",
        sqlite_synchronous=args.synchronous,
        log_level="WARNING",
    )
    workload = build_workload(args.events, rng)
    items = workload.items
    subset = workload.head(min(args.events, args.grpc_events))
    print(
        f"workload: {len(items)} deliveries ({workload.duplicates} retries) in "
        f"{len(workload.copies)} transactions; gRPC subset {len(subset.items)} deliveries in "
        f"{len(subset.copies)} transactions"
    )
    print(
        f"settings: synchronous={settings.sqlite_synchronous} max_batch={settings.max_batch} "
        f"concurrency={args.concurrency} folder={folder}"
    )

    bulk = bench_bulk(folder / "bulk.db", items, args.synchronous, settings.max_batch)
    ceiling_args = (items, args.synchronous, settings.max_batch, args.concurrency)
    before = await bench_ceiling(
        "(a)  ceiling: sqlite group commit", folder / "a.db", *ceiling_args
    )
    service, problems = await bench_service(
        folder / "service.db", workload, settings, args.concurrency
    )
    ingest, get, grpc_problems = await bench_grpc(
        settings, subset, args.concurrency, args.reads, rng
    )
    problems += grpc_problems
    after = await bench_ceiling("(a') ceiling, measured again", folder / "a2.db", *ceiling_args)
    ceiling = max(before, after, key=lambda r: r.rate)

    print()
    print_table([bulk, before, after, service, ingest, get], ceiling)
    print()
    print(f"ratios use the faster ceiling run: {ceiling.label.strip()} ({ceiling.rate:.0f}/s)")
    for r in (service, ingest):
        print(f"{r.label.strip()} outcomes: {dict(sorted(r.outcomes.items()))}")
    print(
        f"correctness: checked {len(workload.copies)} transactions after (b) and "
        f"{len(subset.copies)} after (c) against fixture expectations, "
        f"{len(get.latencies)} GetTransaction statuses; {len(problems)} problems"
    )
    for problem in problems[:20]:
        print(f"  MISMATCH {problem}")
    if len(problems) > 20:
        print(f"  ... and {len(problems) - 20} more")
    return 1 if problems else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--events", type=int, default=20_000, help="deliveries (default 20000)")
    parser.add_argument("--synchronous", choices=["FULL", "NORMAL"], default="FULL")
    parser.add_argument("--concurrency", type=int, default=64, help="producers (default 64)")
    parser.add_argument(
        "--grpc-events", type=int, default=5_000, help="deliveries for (c) (default 5000)"
    )
    parser.add_argument("--reads", type=int, default=5_000, help="calls for (d) (default 5000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dir", type=Path, default=None, help="parent of the temporary folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    folder = Path(tempfile.mkdtemp(prefix="ingest-bench-", dir=args.dir))
    try:
        return asyncio.run(run(args, folder))
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(folder)


if __name__ == "__main__":
    sys.exit(main())
