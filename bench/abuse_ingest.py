"""Issue 16, items 3, 4 and 7: the ingest path under abuse and database faults, measured from
outside against a real server process. Each figure is printed with a ceiling measured in the same
run (the same load with no attack or fault), since the machine is shared.

Run: `.venv/bin/python bench/abuse_ingest.py CASE [--seconds S] [--postgres URL]`

- `fairness` (SQLite): a unary IngestEvent caller and a signed-webhook sender, one call at a time
  each, for S seconds alone (the ceiling), then for S seconds while 20 IngestEvents streams send
  as fast as they can and never read an answer. Prints the acknowledgements of each per S seconds
  and their p50 latency, and what the server counted as refused or dropped.
- `poison` (PostgreSQL): 20 callers send good deliveries, one at a time each, while one caller
  keeps sending a delivery whose order id holds a NUL character. Prints how many good deliveries
  were acknowledged and how many failed, and what the poison got.
- `rowlocks` (PostgreSQL): 250 transactions; a separate connection holds row locks on 100 of
  them (`SELECT ... FOR UPDATE`) for S seconds while 8 callers ingest (half to the locked
  transactions, half to the others). Prints the p50 latency of the unrelated ingests before and
  during the locks, what the ingests to locked transactions got, and health during the locks.
- `tablelock` (PostgreSQL): a separate connection holds `LOCK TABLE transactions IN ACCESS
  EXCLUSIVE MODE` for S seconds while 4 callers ingest (5 s deadline). Prints what health said
  during the lock (and how often it flipped), how the ingests were answered, and after the
  release how long until the first acknowledgement and until health said SERVING.

To measure a version of the service other than the checked-out one, put its `src` and
`generated` first on PYTHONPATH: the server processes inherit the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import random
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import SCENARIOS
from tests.pg import base_url, with_schema
from tests.process import running_server, server_env
from tests.webhook_tools import SECRET, WEBHOOK_PATH, signed_headers
from transactions.v1 import transactions_pb2 as pb
from transactions.v1 import transactions_pb2_grpc as pb_grpc

REDRAW = next(s for s in SCENARIOS if s["scenario"] == "redraw_completed")
_TEMPLATE = json.dumps(REDRAW)
_IDS = [REDRAW["expect"]["transaction_id"], *REDRAW["expect"]["orders"]]


def fresh_scenario() -> tuple[str, list[tuple[str, str]]]:
    """A copy of the redraw scenario with new ids: (transaction id, [(event id, body text)])."""
    text = _TEMPLATE
    new = [str(uuid.uuid4()) for _ in _IDS]
    for old, replacement in zip(_IDS, new, strict=True):
        text = text.replace(old, replacement)
    scenario = json.loads(text)
    suffix = uuid.uuid4().hex[:12]
    return new[0], [
        (f"{d['svix_id']}-{suffix}", json.dumps(d["body"])) for d in scenario["deliveries"]
    ]


def fresh_deliveries() -> Iterator[tuple[str, str]]:
    while True:
        yield from fresh_scenario()[1]


def p50(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def code_of(exc: grpc.aio.AioRpcError) -> str:
    return exc.code().name


class Caller:
    """Sends one IngestEvent at a time; counts answers by code and keeps latencies."""

    def __init__(self, stub: pb_grpc.TransactionServiceStub, timeout: float = 10.0) -> None:
        self.stub = stub
        self.timeout = timeout
        self.codes: Counter[str] = Counter()
        self.latencies: list[float] = []

    async def send(self, event_id: str, body: str) -> str:
        started = time.perf_counter()
        try:
            await self.stub.IngestEvent(
                pb.IngestEventRequest(event_id=event_id, payload_json=body), timeout=self.timeout
            )
            code = "OK"
            self.latencies.append(time.perf_counter() - started)
        except grpc.aio.AioRpcError as exc:
            code = code_of(exc)
        self.codes[code] += 1
        return code

    async def loop(self, deliveries: Iterator[tuple[str, str]], until: float) -> None:
        while time.monotonic() < until:
            event_id, body = next(deliveries)
            if await self.send(event_id, body) != "OK":
                await asyncio.sleep(0.05)  # a refused caller waits a little, as a client would


class WebhookSender:
    def __init__(self, session: aiohttp.ClientSession, port: int) -> None:
        self.session = session
        self.url = f"http://127.0.0.1:{port}{WEBHOOK_PATH}"
        self.statuses: Counter[int] = Counter()
        self.latencies: list[float] = []

    async def loop(self, until: float) -> None:
        deliveries = fresh_deliveries()
        while time.monotonic() < until:
            event_id, body = next(deliveries)
            raw = body.encode()
            started = time.perf_counter()
            try:
                async with self.session.post(
                    self.url,
                    data=raw,
                    headers=signed_headers(SECRET, event_id, raw),
                    timeout=aiohttp.ClientTimeout(total=15),  # Svix gives up after 15 s
                ) as response:
                    await response.read()
                    status = response.status
            except TimeoutError:
                status = 0
            self.statuses[status] += 1
            if status == 200:
                self.latencies.append(time.perf_counter() - started)
            else:
                await asyncio.sleep(0.05)


async def flood(stub: pb_grpc.TransactionServiceStub, until: float) -> int:
    """One IngestEvents stream that writes as fast as the server lets it and never reads."""
    call = stub.IngestEvents()
    deliveries = fresh_deliveries()
    sent = 0
    try:
        while time.monotonic() < until:
            event_id, body = next(deliveries)
            await call.write(pb.IngestEventRequest(event_id=event_id, payload_json=body))
            sent += 1
    except (grpc.aio.AioRpcError, asyncio.CancelledError):
        pass
    finally:
        call.cancel()
    return sent


async def metrics_text(session: aiohttp.ClientSession, port: int) -> str:
    async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
        return await response.text()


async def fairness(seconds: float, streams: int, workdir: Path) -> None:
    env = server_env(TRANSACTION_SERVICE_WEBHOOK_SECRETS=SECRET)
    with running_server(workdir, "--grpc-port", "0", "--db", str(workdir / "f.db"), env=env) as s:
        async with (
            grpc.aio.insecure_channel(s.address) as unary_channel,
            aiohttp.ClientSession() as session,
        ):
            stub = pb_grpc.TransactionServiceStub(unary_channel)
            rows = []
            for phase in ("alone", f"{streams} non-reading streams"):
                until = time.monotonic() + seconds
                caller = Caller(stub)
                sender = WebhookSender(session, s.http_port)
                floods: list[asyncio.Task[int]] = []
                channels = []
                if phase != "alone":
                    for _ in range(streams):
                        # A channel each, as separate attackers would have.
                        channel = grpc.aio.insecure_channel(s.address)
                        channels.append(channel)
                        floods.append(
                            asyncio.create_task(
                                flood(pb_grpc.TransactionServiceStub(channel), until + 5)
                            )
                        )
                await asyncio.gather(caller.loop(fresh_deliveries(), until), sender.loop(until))
                for task in floods:
                    task.cancel()
                sent = sum(r for r in await asyncio.gather(*floods) if isinstance(r, int))
                for channel in channels:
                    await channel.close()
                rows.append((phase, caller, sender, sent))
            text = await metrics_text(session, s.http_port)
    print(f"fairness (SQLite), {seconds:g} s per phase")
    base = rows[0]
    for phase, caller, sender, sent in rows:
        print(
            f"  {phase:28s} unary acked {caller.codes['OK']:5d}"
            f" ({caller.codes['OK'] / max(base[1].codes['OK'], 1):.2f} of alone),"
            f" p50 {p50(caller.latencies) * 1000:7.1f} ms,"
            f" other {dict(caller.codes - Counter(OK=caller.codes['OK']))};"
            f" webhooks 200 {sender.statuses[200]:5d}"
            f" ({sender.statuses[200] / max(base[2].statuses[200], 1):.2f} of alone),"
            f" p50 {p50(sender.latencies) * 1000:7.1f} ms,"
            f" other {dict(sender.statuses - Counter({200: sender.statuses[200]}))};"
            f" stream requests written {sent}"
        )
    for name in ("transaction_service_ingest_dropped_total", "transaction_service_events_total"):
        lines = [
            line
            for line in text.splitlines()
            if line.startswith(name) and not line.endswith(" 0.0")
        ]
        if lines:
            print("  " + "; ".join(lines))


@contextlib.asynccontextmanager
async def pg_schema() -> AsyncIterator[str]:
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(base_url())
    await conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield with_schema(base_url(), schema)
    finally:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await conn.close()


async def poison(seconds: float, workdir: Path) -> None:
    async with pg_schema() as url:
        with running_server(workdir, "--grpc-port", "0", "--db", url) as s:
            async with grpc.aio.insecure_channel(s.address) as channel:
                stub = pb_grpc.TransactionServiceStub(channel)
                until = time.monotonic() + seconds
                good = [Caller(stub) for _ in range(20)]
                bad = Caller(stub)

                def poisoned() -> Iterator[tuple[str, str]]:
                    while True:
                        event_id, text = fresh_scenario()[1][0]
                        value = json.loads(text)
                        value["data"]["id"] = "poison\u0000" + uuid.uuid4().hex
                        yield event_id, json.dumps(value)

                await asyncio.gather(
                    *(c.loop(fresh_deliveries(), until) for c in good), bad.loop(poisoned(), until)
                )
    total: Counter[str] = Counter()
    for c in good:
        total.update(c.codes)
    failed = sum(v for k, v in total.items() if k != "OK")
    print(f"poison (PostgreSQL), {seconds:g} s, 20 good callers and 1 poison caller")
    print(
        f"  good deliveries acknowledged {total['OK']}, failed {failed} "
        f"({failed / max(sum(total.values()), 1):.1%}): {dict(total)}; poison got {dict(bad.codes)}"
    )


async def health_status(channel: grpc.aio.Channel) -> str:
    try:
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=2
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    except grpc.aio.AioRpcError as exc:
        return code_of(exc)


async def sample_health(channel: grpc.aio.Channel, until: float, seen: list[str]) -> None:
    while time.monotonic() < until:
        seen.append(await health_status(channel))
        await asyncio.sleep(0.25)


def flips(seen: list[str]) -> int:
    return sum(1 for a, b in itertools.pairwise(seen) if a != b)


async def seed(stub: pb_grpc.TransactionServiceStub, count: int) -> list[tuple[str, list]]:
    scenarios = [fresh_scenario() for _ in range(count)]
    caller = Caller(stub)
    for _, deliveries in scenarios:
        await caller.send(*deliveries[0])
    assert caller.codes["OK"] == count, caller.codes
    return scenarios


async def rowlocks(seconds: float, workdir: Path) -> None:
    async with pg_schema() as url:
        with running_server(workdir, "--grpc-port", "0", "--db", url) as s:
            async with grpc.aio.insecure_channel(s.address) as channel:
                stub = pb_grpc.TransactionServiceStub(channel)
                scenarios = await seed(stub, 250)
                locked, free = scenarios[:100], scenarios[100:]
                # The deliveries after the first change the state: each is a real write.
                # Answered fast once refused: sent again and again, as a retrying client would.
                to_locked = itertools.cycle([d for _, ds in locked for d in ds[1:]])
                to_free = iter([d for _, ds in free for d in ds[1:]])

                def unrelated() -> Iterator[tuple[str, str]]:
                    # The other transactions' remaining deliveries, then new transactions.
                    yield from to_free
                    yield from fresh_deliveries()

                mixed_free = unrelated()
                quiet = [Caller(stub) for _ in range(4)]
                until = time.monotonic() + min(seconds, 5)
                await asyncio.gather(*(c.loop(fresh_deliveries(), until) for c in quiet))
                outside = await asyncpg.connect(url)
                seen: list[str] = []
                try:
                    transaction = outside.transaction()
                    await transaction.start()
                    rows = await outside.fetch(
                        "SELECT id FROM transactions WHERE id = ANY($1::text[]) FOR UPDATE",
                        [t for t, _ in locked],
                    )
                    until = time.monotonic() + seconds
                    to_them = [Caller(stub) for _ in range(4)]
                    others = [Caller(stub) for _ in range(4)]
                    await asyncio.gather(
                        *(c.loop(to_locked, until) for c in to_them),
                        *(c.loop(mixed_free, until) for c in others),
                        sample_health(channel, until, seen),
                    )
                    await transaction.rollback()
                finally:
                    await outside.close()
    quiet_p50 = p50([x for c in quiet for x in c.latencies])
    other_lat = [x for c in others for x in c.latencies]
    them: Counter[str] = Counter()
    other: Counter[str] = Counter()
    for c in to_them:
        them.update(c.codes)
    for c in others:
        other.update(c.codes)
    print(f"rowlocks (PostgreSQL), {len(rows)} of 250 transactions row-locked for {seconds:g} s")
    print(
        f"  unrelated ingests: p50 {quiet_p50 * 1000:.1f} ms before the locks, "
        f"{p50(other_lat) * 1000:.1f} ms during them; answers during {dict(other)}"
    )
    print(f"  ingests to the locked transactions: {dict(them)}")
    print(f"  health during the locks: {dict(Counter(seen))}, {flips(seen)} flips")


async def tablelock(seconds: float, workdir: Path) -> None:
    async with pg_schema() as url:
        with running_server(workdir, "--grpc-port", "0", "--db", url) as s:
            async with grpc.aio.insecure_channel(s.address) as channel:
                stub = pb_grpc.TransactionServiceStub(channel)
                await seed(stub, 10)
                outside = await asyncpg.connect(url)
                seen: list[str] = []
                callers = [Caller(stub, timeout=5) for _ in range(4)]
                try:
                    transaction = outside.transaction()
                    await transaction.start()
                    await outside.execute("LOCK TABLE transactions IN ACCESS EXCLUSIVE MODE")
                    locked_at = time.monotonic()
                    until = locked_at + seconds
                    await asyncio.gather(
                        *(c.loop(fresh_deliveries(), until) for c in callers),
                        sample_health(channel, until, seen),
                    )
                    await transaction.rollback()
                    released = time.monotonic()
                finally:
                    await outside.close()
                first_ack = None
                serving = None
                after: list[str] = []
                probe = Caller(stub, timeout=5)
                deliveries = fresh_deliveries()
                while time.monotonic() - released < 30 and (first_ack is None or serving is None):
                    if first_ack is None and await probe.send(*next(deliveries)) == "OK":
                        first_ack = time.monotonic() - released
                    status = await health_status(channel)
                    after.append(status)
                    if serving is None and status == "SERVING":
                        serving = time.monotonic() - released
                    await asyncio.sleep(0.1)
                log = s.log_text()
    answers: Counter[str] = Counter()
    for c in callers:
        answers.update(c.codes)
    print(f"tablelock (PostgreSQL), ACCESS EXCLUSIVE on transactions for {seconds:g} s")
    print(f"  health during the lock: {dict(Counter(seen))}, {flips(seen)} flips")
    print(f"  ingests during the lock (5 s deadline): {dict(answers)}")
    print(
        f"  after the release: first acknowledgement after "
        f"{first_ack if first_ack is None else round(first_ack, 2)} s, SERVING after "
        f"{serving if serving is None else round(serving, 2)} s"
    )
    causes = [line.strip()[:200] for line in log.splitlines() if "store" in line and "writ" in line]
    print(f"  store log lines: {len(causes)}; first: {causes[:1]}; last: {causes[-1:]}")
    print(f"  tracebacks in the log: {log.count('Traceback')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", choices=("fairness", "poison", "rowlocks", "tablelock"))
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp"))
    args = parser.parse_args()
    random.seed(16)
    workdir = args.workdir / f"abuse-{uuid.uuid4().hex[:8]}"
    workdir.mkdir(parents=True)
    if args.case == "fairness":
        asyncio.run(fairness(args.seconds, args.streams, workdir))
    elif args.case == "poison":
        asyncio.run(poison(args.seconds, workdir))
    elif args.case == "rowlocks":
        asyncio.run(rowlocks(args.seconds, workdir))
    else:
        asyncio.run(tablelock(args.seconds, workdir))


if __name__ == "__main__":
    main()
