"""Issue 16 item 7: each fault is logged once when it starts and once when it ends, in the
configured format, without a traceback; and each gets its documented code.

Against real server processes in JSON log mode, where every line must parse:

- PostgreSQL goes away (the server ends every session of the service and refuses new ones,
  through a proxy the test cuts) and comes back: ingest is UNAVAILABLE (`STORE_UNAVAILABLE`,
  "database unreachable"), health NOT_SERVING and back; the store, the change feed and the change
  notifications each log one line when it starts and one when it ends (before: 65 tracebacks in
  a 30 s outage, from the change feed and asyncpg's pool);
- clients cancelling calls of every kind: no traceback, no ERROR;
- a header over aiohttp's 8 KiB line limit: answered, no traceback;
- failed TLS handshakes: one line when they start, one with the count when they stop, in the
  configured format (before: grpc-core's own line for each, in its own format in text mode).

Faults that cannot be caused at will from outside (asyncpg's InternalClientError after a server
stop, grpc.aio's ExecuteBatchError when a cancel races the last send) are checked where they are
handled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import SCENARIOS
from tests.harness import error_info
from tests.pg import base_url, fresh_database, run_sync
from tests.process import Server, running_server, server_env, wait_until
from tests.scenario_tools import with_fresh_ids
from transaction_service.logs import LibraryNoise
from transaction_service.store.base import StoreUnavailable
from transaction_service.store.postgres import PostgresStore, _fault_kind
from transactions.v1 import transactions_pb2 as pb
from transactions.v1 import transactions_pb2_grpc as pb_grpc

DEADLINE = 60.0
REDRAW = next(s for s in SCENARIOS if s["scenario"] == "redraw_completed")


def deliveries() -> Iterator[pb.IngestEventRequest]:
    while True:
        for d in with_fresh_ids(REDRAW)["deliveries"]:
            yield pb.IngestEventRequest(event_id=d["svix_id"], payload_json=json.dumps(d["body"]))


def json_lines(server: Server) -> list[dict[str, Any]]:
    """Every line of the log, each of which must be a JSON object."""
    lines = []
    for line in server.log_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"a log line that is not JSON: {line!r}\n{server.log_text()}")
    return lines


def no_traceback(server: Server) -> list[dict[str, Any]]:
    lines = json_lines(server)
    assert "Traceback" not in server.log_text(), server.log_text()
    assert not [line for line in lines if "exception" in line], server.log_text()
    return lines


def messages(lines: list[dict[str, Any]], *words: str) -> list[str]:
    return [line["message"] for line in lines if all(w in line["message"] for w in words)]


def health(channel: grpc.Channel) -> str:
    answer = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=DEADLINE
    )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


# -- PostgreSQL goes away and comes back ---------------------------------------------------------


class Proxy:
    """A TCP proxy to PostgreSQL, in a thread of its own, that the test can cut: every
    connection through it closed and new ones refused, as when the database server stops."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.up = True
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.port = 0

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            server = self._loop.run_until_complete(
                asyncio.start_server(self._handle, "127.0.0.1", 0)
            )
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        ready.wait()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.transport.abort()
            return
        try:
            upstream_reader, upstream = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, upstream)
        self._pairs.add(pair)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, RuntimeError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, upstream), pipe(upstream_reader, writer))
        self._pairs.discard(pair)

    def refuse(self) -> None:
        self.up = False

    def cut(self) -> None:
        def abort() -> None:
            for client, upstream in list(self._pairs):
                client.transport.abort()
                upstream.transport.abort()

        self._loop.call_soon_threadsafe(abort)

    def restore(self) -> None:
        self.up = True


def terminate_sessions(application_name: str) -> int:
    """End every PostgreSQL session of that application, as a server stop does (57P01)."""

    async def terminate() -> int:
        conn = await asyncpg.connect(base_url())
        try:
            rows = await conn.fetch(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = $1",
                application_name,
            )
            return len(rows)
        finally:
            await conn.close()

    return run_sync(terminate())


def test_a_postgresql_outage_is_logged_once_when_it_starts_and_once_when_it_ends(
    tmp_path: Path,
) -> None:
    application = f"ts_faults_{uuid.uuid4().hex[:8]}"
    with fresh_database() as url:
        host, port = url.split("@", 1)[1].split("/", 1)[0].rsplit(":", 1)
        proxy = Proxy((host, int(port)))
        through_proxy = url.replace(f"{host}:{port}", f"127.0.0.1:{proxy.port}")
        env = server_env(TRANSACTION_SERVICE_LOG_FORMAT="json")
        db = f"{through_proxy}&application_name={application}"
        with (
            running_server(tmp_path, "--grpc-port", "0", "--db", db, env=env) as server,
            grpc.insecure_channel(server.address) as channel,
        ):
            stub = pb_grpc.TransactionServiceStub(channel)
            sent = deliveries()
            stub.IngestEvent(next(sent), timeout=DEADLINE)
            assert health(channel) == "SERVING"

            # The database server stops: every session ended, new connections refused.
            proxy.refuse()
            assert terminate_sessions(application) >= 1
            proxy.cut()
            with pytest.raises(grpc.RpcError) as refused:
                stub.IngestEvent(next(sent), timeout=DEADLINE)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_info(refused.value).reason == "STORE_UNAVAILABLE"
            assert "database unreachable" in refused.value.details()
            wait_until(lambda: health(channel) == "NOT_SERVING", "health NOT_SERVING")
            # Every part that reads or writes has met the fault, and keeps retrying meanwhile.
            wait_until(lambda: "change feed: cannot read" in server.log_text(), "feed fault")
            wait_until(lambda: "lost the change notification" in server.log_text(), "listen")
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                with contextlib.suppress(grpc.RpcError):
                    stub.IngestEvent(next(sent), timeout=DEADLINE)
                time.sleep(0.5)

            proxy.restore()
            wait_until(lambda: health(channel) == "SERVING", "health SERVING again")
            stub.IngestEvent(next(sent), timeout=DEADLINE)
            for what in (
                "writes again after",
                "change feed: reading the change log again",
                "change notifications from",
            ):
                server.wait_for_log(re.compile(re.escape(what)), DEADLINE)
            server.stop()
        lines = no_traceback(server)
    # The store: once when it starts, naming the cause, and once when it ends, with a count.
    assert len(messages(lines, "cannot write")) == 1, messages(lines, "cannot write")
    assert "database unreachable" in messages(lines, "cannot write")[0]
    assert len(messages(lines, "writes again after database unreachable")) == 1
    # The change feed and its notifications, likewise.
    assert len(messages(lines, "change feed: cannot read the change log")) == 1
    assert len(messages(lines, "change feed: reading the change log again")) == 1
    assert len(messages(lines, "lost the change notification connection")) == 1
    assert len(messages(lines, "change notifications from")) == 1
    # asyncpg's pool retrying its connections says nothing of its own.
    assert not [line for line in lines if line["logger"].startswith("asyncpg")]


def test_errors_of_a_stopping_database_server_are_classified_as_unreachable() -> None:
    """asyncpg reports a server stop as 57P01 on each session, and may then report a pooled
    connection in an unexpected state as an InternalClientError: both are the database being
    unreachable (UNAVAILABLE STORE_UNAVAILABLE), not an unclassified error (INTERNAL)."""
    assert _fault_kind(asyncpg.AdminShutdownError()) == "database unreachable"
    assert _fault_kind(asyncpg.CrashShutdownError()) == "database unreachable"
    assert _fault_kind(asyncpg.InternalClientError("got result for unknown protocol state 3")) == (
        "database unreachable"
    )
    # A statement timeout is class 57 too, and keeps its own name.
    assert _fault_kind(asyncpg.QueryCanceledError()).startswith("statement timed out")


async def test_an_internal_client_error_fails_the_write_as_store_unavailable() -> None:
    """The store's write path, with a pool whose connection fails with InternalClientError:
    StoreUnavailable naming the cause (UNAVAILABLE to callers), and health NOT_SERVING."""

    class BrokenPool:
        def acquire(self) -> Any:
            raise asyncpg.InternalClientError("cannot switch to state 12")

    store = PostgresStore("postgresql://nobody@127.0.0.1:1/none")
    store._pool = BrokenPool()  # type: ignore[assignment]
    with pytest.raises(StoreUnavailable) as caught:
        await store.write(None, None)  # type: ignore[arg-type]
    assert "database unreachable" in caught.value.message
    assert store.health.failing == {"database unreachable": 1}
    store._pool = None


# -- clients cancelling ---------------------------------------------------------------------------


async def _cancel_everything(address: str, rounds: int) -> None:
    """Calls of every kind, each cancelled at a random moment, many at once."""
    sent = deliveries()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.TransactionServiceStub(channel)
        for _ in range(20):
            await stub.IngestEvent(next(sent), timeout=DEADLINE)
        for _ in range(rounds):
            calls: list[Any] = [stub.IngestEvent(next(sent)) for _ in range(5)]
            calls += [stub.GetTransaction(pb.GetTransactionRequest(order_id="x")) for _ in range(5)]
            calls += [stub.ListTransactions(pb.ListTransactionsRequest()) for _ in range(3)]
            calls += [
                stub.WatchTransactions(pb.WatchTransactionsRequest(start_revision=0))
                for _ in range(3)
            ]
            stream = stub.IngestEvents()
            calls.append(stream)
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                for _ in range(5):
                    await stream.write(next(sent))
            await asyncio.sleep(random.random() * 0.02)
            for call in calls:
                call.cancel()


def test_clients_cancelling_calls_leave_no_traceback_and_no_error(tmp_path: Path) -> None:
    env = server_env(TRANSACTION_SERVICE_LOG_FORMAT="json")
    with running_server(tmp_path, "--grpc-port", "0", "--db", "x.db", env=env) as server:
        asyncio.run(_cancel_everything(f"127.0.0.1:{server.port}", rounds=60))
        server.stop()
    lines = no_traceback(server)
    assert not [line for line in lines if line["level"] in ("ERROR", "CRITICAL")]
    assert "ExecuteBatchError" not in server.log_text()
    cancelled = [
        line
        for line in lines
        if line["logger"] == "transaction_service.access" and line.get("code") == "CANCELLED"
    ]
    assert cancelled  # the access lines say what happened


def test_library_noise_about_faults_the_service_reports_itself_is_dropped() -> None:
    """grpc.aio's ExecuteBatchError (a cancel racing the call's last send) as asyncio logs it,
    and asyncpg's pool retrying its connections: dropped; anything else is kept."""

    class ExecuteBatchError(Exception):  # grpc._cython.cygrpc's, by name
        pass

    def record(name: str, msg: str, exc: BaseException | None = None) -> logging.LogRecord:
        exc_info = (type(exc), exc, None) if exc is not None else None
        return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, None, exc_info)

    noise = LibraryNoise()
    assert not noise.filter(
        record("asyncio", "Task exception was never retrieved", ExecuteBatchError("execute_batch"))
    )
    assert not noise.filter(
        record("asyncpg.pool", "Failed to restore the pool connection floor; retrying", OSError())
    )
    assert noise.filter(record("asyncio", "Task exception was never retrieved", ValueError()))
    assert noise.filter(record("transaction_service.store", "store x cannot write: disk full"))


# -- a header over 8 KiB -------------------------------------------------------------------------


def test_a_header_over_8_kib_is_answered_and_logged_as_json_without_a_traceback(
    tmp_path: Path,
) -> None:
    """aiohttp's own limit on a header line is 8 KiB; past it, it logged an ERROR with a
    traceback. Now a head up to 16 KiB is served and a larger one is 431, logged as JSON."""
    env = server_env(TRANSACTION_SERVICE_LOG_FORMAT="json")
    with running_server(tmp_path, "--grpc-port", "0", "--db", "x.db", env=env) as server:
        for size, status in ((9_000, 200), (20_000, 431)):
            request = urllib.request.Request(
                f"http://127.0.0.1:{server.http_port}/healthz", headers={"X-Big": "b" * size}
            )
            try:
                with urllib.request.urlopen(request, timeout=DEADLINE) as response:
                    got = response.status
            except urllib.error.HTTPError as error:
                got = error.code
            assert got == status, size
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=DEADLINE) as raw:
            raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9_000 + b"\r\n\r\n")
            assert raw.recv(64).startswith(b"HTTP/1.1 200")
        server.stop()
    lines = no_traceback(server)
    assert not [line for line in lines if line["level"] in ("ERROR", "CRITICAL")]


# -- failed TLS handshakes -----------------------------------------------------------------------

TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) "
)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_failed_tls_handshakes_are_logged_once_when_they_start_and_once_when_they_stop(
    tmp_path: Path, log_format: str
) -> None:
    """grpc-core logs every failed handshake itself (on stderr, in its own format; a plaintext
    client's call failed 2 handshakes). Now: one line in the configured format when they start,
    one with the count once none has failed for 10 s."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_pem.write_to_path(tmp_path / "key.pem")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    tls = ["--log-format", log_format, "--tls-cert", "cert.pem", "--tls-key", "key.pem"]
    with running_server(tmp_path, "--grpc-port", "0", "--db", "x.db", *tls) as server:
        for _ in range(10):
            with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError):
                pb_grpc.TransactionServiceStub(channel).GetTransaction(
                    pb.GetTransactionRequest(transaction_id="x"), timeout=2
                )
        server.wait_for_log(re.compile(r"TLS handshakes: none failed for 10s; \d+ failed"), 120)
        server.stop()
    log = server.log_text()
    assert log.count("TLS handshakes failing: Handshake failed") == 1, log
    assert log.count("TLS handshakes: none failed") == 1, log
    assert "Traceback" not in log
    if log_format == "json":
        json_lines(server)
    else:
        assert all(TEXT_LINE.match(line) for line in log.splitlines()), log
