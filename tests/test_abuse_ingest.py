"""Issue 16, items 3, 4 and 7: the ingest path under abuse and database faults, against real
server processes (SQLite, and PostgreSQL where the store matters).

- Admission: 20 IngestEvents streams that never read their answers do not stop webhooks and
  unary calls; a full share of the ingest queue is answered RESOURCE_EXHAUSTED (with a retry
  hint) or 503 with Retry-After; deliveries whose callers gave up are dropped before the commit,
  counted and logged.
- One bad delivery: a NUL in an id is refused by validation, naming the field, alike on both
  stores, and the good deliveries sent with it all commit. (The commit path's own isolation of
  a delivery the store refuses is proved with a store double in tests/test_admission.py.)
- The store under faults (PostgreSQL): a lock held from outside on a table turns health
  NOT_SERVING within the lock timeout, names the lock wait in the log once, and health comes
  back after the release; row locks on some transactions refuse only the deliveries to those.

Shares, not times, are asserted where load is involved: the machine is shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from tests.conftest import SCENARIOS, database
from tests.harness import error_info, violated_fields
from tests.process import Server, running_server, server_env
from tests.scenario_tools import with_fresh_ids
from tests.test_faults import readyz
from tests.webhook_tools import SECRET, WEBHOOK_PATH, metric, signed_headers
from transactions.v1 import transactions_pb2 as pb
from transactions.v1 import transactions_pb2_grpc as pb_grpc

REDRAW = next(s for s in SCENARIOS if s["scenario"] == "redraw_completed")
DEADLINE = 60.0


def fresh() -> Iterator[tuple[str, str]]:
    """(event id, body text) of new deliveries, endlessly."""
    while True:
        for d in with_fresh_ids(REDRAW)["deliveries"]:
            yield d["svix_id"], json.dumps(d["body"])


def request(event_id: str, body: str) -> pb.IngestEventRequest:
    return pb.IngestEventRequest(event_id=event_id, payload_json=body)


def metrics_text(server: Server) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics") as response:
        return response.read().decode()


async def until(condition: Any, what: str, timeout: float = DEADLINE) -> None:
    """Wait for `condition()` (sync or async) with a deadline; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.1)


async def health(channel: grpc.aio.Channel) -> str:
    answer = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=10
    )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


def retry_delay(error: grpc.aio.AioRpcError) -> float:
    """The google.rpc.RetryInfo delay of an error's rich status, in seconds."""
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info.retry_delay.ToNanoseconds() / 1e9
    pytest.fail(f"no RetryInfo in {status}")


class Webhooks:
    """Signed webhooks to a server, as Svix sends them (gives up after 15 s)."""

    def __init__(self, session: aiohttp.ClientSession, server: Server) -> None:
        self.session = session
        self.url = f"http://127.0.0.1:{server.http_port}{WEBHOOK_PATH}"

    async def send(self, event_id: str, body: str) -> tuple[int, dict[str, str], Any]:
        raw = body.encode()
        async with self.session.post(
            self.url,
            data=raw,
            headers=signed_headers(SECRET, event_id, raw),
            timeout=aiohttp.ClientTimeout(total=DEADLINE),
        ) as response:
            return response.status, dict(response.headers), await response.json()


@contextlib.asynccontextmanager
async def clients(server: Server) -> AsyncIterator[tuple[pb_grpc.TransactionServiceStub, Webhooks]]:
    async with (
        grpc.aio.insecure_channel(server.address) as channel,
        aiohttp.ClientSession() as session,
    ):
        yield pb_grpc.TransactionServiceStub(channel), Webhooks(session, server)


# -- 3. admission and fairness (SQLite) -----------------------------------------------------------

PHASE_SECONDS = 8.0
STREAMS = 20
# Before the fix 20 such streams left a unary caller 0.2 % of its acknowledgements alone (8 of
# 3,865 in 30 s; webhooks alike); after it they keep about 20 %. 3 % fails the old behaviour by
# a factor of ten and leaves the new one a wide margin on a loaded machine.
MIN_SHARE = 0.03


async def _sequential(
    stub: pb_grpc.TransactionServiceStub, webhooks: Webhooks, seconds: float
) -> tuple[int, int]:
    """Acknowledgements (unary, webhook) of one caller of each, one delivery at a time."""
    until_ = time.monotonic() + seconds
    counts = [0, 0]

    async def unary() -> None:
        deliveries = fresh()
        while time.monotonic() < until_:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.IngestEvent(request(*next(deliveries)), timeout=10)
                counts[0] += 1

    async def webhook() -> None:
        deliveries = fresh()
        while time.monotonic() < until_:
            status, _, _ = await webhooks.send(*next(deliveries))
            counts[1] += status == 200

    await asyncio.gather(unary(), webhook())
    return counts[0], counts[1]


async def _flood(address: str, stop: asyncio.Event) -> None:
    """An IngestEvents stream that writes as fast as it is let and never reads an answer."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.TransactionServiceStub(channel).IngestEvents()
        deliveries = fresh()
        with contextlib.suppress(grpc.aio.AioRpcError):
            while not stop.is_set():
                await call.write(request(*next(deliveries)))
        call.cancel()


async def test_streams_that_never_read_leave_webhooks_and_unary_calls_their_share(
    tmp_path: Path,
) -> None:
    env = server_env(TRANSACTION_SERVICE_WEBHOOK_SECRETS=SECRET)
    with running_server(tmp_path, "--grpc-port", "0", "--db", str(tmp_path / "x.db"), env=env) as s:
        async with clients(s) as (stub, webhooks):
            alone = await _sequential(stub, webhooks, PHASE_SECONDS)
            stop = asyncio.Event()
            floods = [asyncio.create_task(_flood(s.address, stop)) for _ in range(STREAMS)]
            try:
                # The streams are under way: their deliveries wait in the queue.
                await until(
                    lambda: (
                        metric(
                            metrics_text(s), "transaction_service_ingest_queue_depth", lane="stream"
                        )
                        > 0
                    ),
                    "stream deliveries queued",
                )
                attacked = await _sequential(stub, webhooks, PHASE_SECONDS)
            finally:
                stop.set()
                await asyncio.gather(*floods, return_exceptions=True)
    assert alone[0] > 20, alone
    assert alone[1] > 20, alone
    assert attacked[0] >= MIN_SHARE * alone[0], (alone, attacked)
    assert attacked[1] >= MIN_SHARE * alone[1], (alone, attacked)


@contextlib.contextmanager
def write_lock(db: Path) -> Iterator[None]:
    """Hold SQLite's write lock from another connection, as an outside process could."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


async def test_a_full_queue_is_refused_with_a_retry_hint_and_expired_deliveries_are_dropped(
    tmp_path: Path,
) -> None:
    db = tmp_path / "x.db"
    env = server_env(TRANSACTION_SERVICE_WEBHOOK_SECRETS=SECRET)
    args = ["--grpc-port", "0", "--db", str(db), "--ingest-queue-limit", "8"]
    # A commit waits for the outside lock as long as the test needs (and says it stalls after
    # 0.5 s, which tells the test it is stuck); webhooks give up after 5 s.
    args += ["--db-lock-timeout-seconds", "120", "--store-stall-seconds", "0.5"]
    args += ["--webhook-deadline-seconds", "5"]
    with running_server(tmp_path, *args, env=env) as s:
        async with clients(s) as (stub, webhooks):
            deliveries = fresh()
            kept = next(deliveries)
            await stub.IngestEvent(request(*kept), timeout=DEADLINE)

            def depth(lane: str) -> float:
                return metric(metrics_text(s), "transaction_service_ingest_queue_depth", lane=lane)

            with write_lock(db):
                # The first delivery is taken into a commit that waits for the lock ...
                stuck = asyncio.ensure_future(stub.IngestEvent(request(*next(deliveries))))
                await until(lambda: readyz(s)[0] == 503, "a stalled commit")
                assert "commits stalled" in readyz(s)[1]["reason"]
                # ... the unary lane holds 8 // 4 = 2 more ...
                queued = [
                    asyncio.ensure_future(stub.IngestEvent(request(*next(deliveries))))
                    for _ in range(2)
                ]
                await until(lambda: depth("unary") == 2, "two unary calls queued")
                # ... and the next is refused at once, with a retry hint.
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.IngestEvent(request(*next(deliveries)), timeout=DEADLINE)
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                info = error_info(refused.value)
                assert info.reason == "INGEST_QUEUE_FULL"
                assert info.metadata["lane"] == "unary"
                assert retry_delay(refused.value) == 1.0
                # Webhooks have a lane of their own: two wait, the third gets 503 at once.
                hooks = [asyncio.ensure_future(webhooks.send(*next(deliveries))) for _ in range(2)]
                await until(lambda: depth("webhook") == 2, "two webhooks queued")
                status, headers, body = await webhooks.send(*next(deliveries))
                assert status == 503
                assert headers["Retry-After"] == "1"
                assert body["error"]["code"] == "RESOURCE_EXHAUSTED"
                assert body["error"]["reason"] == "INGEST_QUEUE_FULL"
                # Svix gives up; so does the service: the queued webhooks are dropped unstored.
                dropped = await asyncio.gather(*hooks)
                for status, headers, body in dropped:
                    assert status == 503
                    assert body["error"]["reason"] == "DEADLINE_PASSED"
                    assert "Retry-After" in headers
            # The lock is gone: what was queued is committed, what was dropped is not stored.
            await stuck
            for call in queued:
                await call
            text = metrics_text(s)
            dropped_total = "transaction_service_ingest_dropped_total"
            assert metric(text, dropped_total, source="webhook", reason="deadline") == 2
            for source in ("grpc", "webhook"):
                events = "transaction_service_events_total"
                assert metric(text, events, source=source, outcome="overloaded") == 1
            await until(lambda: "dropped" in s.log_text(), "the drops logged")
    with sqlite3.connect(db) as conn:
        stored = {row[0] for row in conn.execute("SELECT event_id FROM events")}
    assert kept[0] in stored
    assert len(stored) == 4  # kept, stuck and the two queued unary calls
    assert "Traceback" not in s.log_text()


# -- 4. one bad delivery (both stores) ------------------------------------------------------------


def _poisoned(field: str) -> tuple[str, str]:
    event_id, body = next(fresh())
    value = json.loads(body)
    if field == "data.id":
        value["data"]["id"] = "poison\u0000" + uuid.uuid4().hex
    else:
        value["data"]["patient_details"]["first_name"] = "Ja\u0000ne"
    return event_id, json.dumps(value)


@pytest.mark.parametrize("store_kind", ["sqlite", "postgres"])
async def test_a_nul_is_refused_naming_the_field_and_the_good_deliveries_all_commit(
    tmp_path: Path, store_kind: str
) -> None:
    env = server_env(TRANSACTION_SERVICE_WEBHOOK_SECRETS=SECRET)
    with (
        database(store_kind, tmp_path) as db,
        running_server(tmp_path, "--grpc-port", "0", "--db", db, env=env) as s,
    ):
        async with clients(s) as (stub, webhooks):
            good = [next(fresh()) for _ in range(20)]
            poison = _poisoned("data.id")

            async def send_poison() -> grpc.aio.AioRpcError:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.IngestEvent(request(*poison), timeout=DEADLINE)
                return refused.value

            results = await asyncio.gather(
                *(stub.IngestEvent(request(*d), timeout=DEADLINE) for d in good),
                send_poison(),
                return_exceptions=True,
            )
            error = results.pop()
            assert all(isinstance(r, pb.IngestEventResponse) for r in results), results
            assert isinstance(error, grpc.aio.AioRpcError)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert violated_fields(error) == ["payload_json.data.id"]
            # Any string of the body, over HTTP too.
            status, _, body = await webhooks.send(*_poisoned("name"))
            assert status == 400
            fields = [v["field"] for v in body["error"]["field_violations"]]
            assert fields == ["body.data.patient_details.first_name"]


# -- 7. the store under faults (PostgreSQL) -------------------------------------------------------


@contextlib.contextmanager
def postgres_server(tmp_path: Path) -> Iterator[tuple[str, Server]]:
    """A server process on a fresh PostgreSQL schema: (the schema's URL, the server)."""
    with (
        database("postgres", tmp_path) as url,
        running_server(tmp_path, "--grpc-port", "0", "--db", url) as server,
    ):
        yield url, server


async def test_an_outside_table_lock_turns_health_not_serving_naming_it_and_it_comes_back(
    tmp_path: Path,
) -> None:
    with postgres_server(tmp_path) as (url, s):
        async with grpc.aio.insecure_channel(s.address) as channel:
            stub = pb_grpc.TransactionServiceStub(channel)
            deliveries = fresh()
            await stub.IngestEvent(request(*next(deliveries)), timeout=DEADLINE)
            assert await health(channel) == "SERVING"
            outside = await asyncpg.connect(url)
            try:
                async with outside.transaction():
                    await outside.execute("LOCK TABLE transactions IN ACCESS EXCLUSIVE MODE")
                    # Refused within the lock timeout (2 s), not at the caller's deadline.
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await stub.IngestEvent(request(*next(deliveries)), timeout=DEADLINE)
                    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                    assert "lock wait" in refused.value.details()
                    await until(lambda: _is(channel, "NOT_SERVING"), "health NOT_SERVING")
                    status, ready = readyz(s)
                    assert status == 503
                    assert "lock wait" in ready["reason"]
            finally:
                await outside.close()
            await until(lambda: _is(channel, "SERVING"), "health SERVING again")
            await stub.IngestEvent(request(*next(deliveries)), timeout=DEADLINE)
            log = s.log_text()
    starts = [line for line in log.splitlines() if "cannot write" in line]
    assert len(starts) == 1, log
    assert "lock wait" in starts[0]
    assert "unreachable" not in starts[0]
    ends = [line for line in log.splitlines() if "writes again after" in line]
    assert len(ends) == 1, log
    assert "lock wait" in ends[0]
    assert "Traceback" not in log


async def _is(channel: grpc.aio.Channel, status: str) -> bool:
    return await health(channel) == status


async def test_row_locks_on_some_transactions_refuse_only_their_deliveries(
    tmp_path: Path,
) -> None:
    with postgres_server(tmp_path) as (url, s):
        async with grpc.aio.insecure_channel(s.address) as channel:
            stub = pb_grpc.TransactionServiceStub(channel)
            scenarios = [with_fresh_ids(REDRAW) for _ in range(6)]
            for scenario in scenarios:
                first = scenario["deliveries"][0]
                await stub.IngestEvent(
                    request(first["svix_id"], json.dumps(first["body"])), timeout=DEADLINE
                )
            locked, free = scenarios[:3], scenarios[3:]
            outside = await asyncpg.connect(url)
            try:
                async with outside.transaction():
                    rows = await outside.fetch(
                        "SELECT id FROM transactions WHERE id = ANY($1::text[]) FOR UPDATE",
                        [sc["expect"]["transaction_id"] for sc in locked],
                    )
                    assert len(rows) == 3

                    async def send(delivery: dict[str, Any]) -> str:
                        try:
                            await stub.IngestEvent(
                                request(delivery["svix_id"], json.dumps(delivery["body"])),
                                timeout=DEADLINE,
                            )
                            return "OK"
                        except grpc.aio.AioRpcError as exc:
                            return f"{exc.code().name} {error_info(exc).reason}"

                    to_locked = [sc["deliveries"][1] for sc in locked]
                    to_free = [d for sc in free for d in sc["deliveries"][1:]]
                    results = await asyncio.gather(*(send(d) for d in [*to_locked, *to_free]))
                    assert results[:3] == ["UNAVAILABLE TRANSACTION_LOCKED"] * 3
                    assert results[3:] == ["OK"] * len(to_free)
                    # Some transactions locked is no fault of the store.
                    assert await health(channel) == "SERVING"
            finally:
                await outside.close()
            # Released: the refused deliveries go through when sent again.
            assert [await send(d) for d in to_locked] == ["OK"] * 3
    assert "Traceback" not in s.log_text()
