"""Faults, operator mistakes and abuse, against the real server process.

Each test starts its own `transaction-service serve` (see tests/process.py) and checks what
an operator or a client would see: exit codes and the one line a startup mistake prints, gRPC
status codes, health, the log, and what survives a restart.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2

from tests.conftest import BODY_LIMIT, SCENARIOS
from tests.harness import error_info, separate_channels, violated_fields
from tests.process import (
    GRPCURL,
    SERVICE,
    Client,
    Server,
    ingest_all,
    running_server,
    server_env,
    startup_error,
    wait_until,
)
from tests.scenario_tools import with_fresh_ids
from tests.test_grpc_api import BAD_INPUTS
from transactions.v1 import transactions_pb2 as pb
from transactions.v1 import transactions_pb2_grpc as pb_grpc

DEADLINE = 60.0
UNAVAILABLE = "Unavailable"
REDRAW = next(s for s in SCENARIOS if s["scenario"] == "redraw_completed")


def health(server: Server) -> str:
    result = server.grpcurl("grpc.health.v1.Health/Check", request={})
    if result.returncode != 0:
        return result.stderr
    return json.loads(result.stdout)["status"]


def readyz(server: Server) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/readyz") as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def try_ingest(server: Server, delivery: dict[str, Any]) -> tuple[str, str]:
    """('ok', outcome) or (grpcurl's code name, its whole output)."""
    result = server.grpcurl(
        f"{SERVICE}/IngestEvent",
        request={"event_id": delivery["svix_id"], "payload": delivery["body"]},
    )
    if result.returncode == 0:
        return "ok", json.loads(result.stdout)["outcome"]
    match = re.search(r"Code: (\w+)", result.stderr)
    return (match.group(1) if match else "?"), result.stderr


def stored_event_ids(db: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return {row[0] for row in conn.execute("SELECT event_id FROM events")}


def fresh_deliveries(count: int) -> Iterator[dict[str, Any]]:
    while count > 0:
        for d in with_fresh_ids(REDRAW)["deliveries"]:
            if count == 0:
                return
            count -= 1
            yield d


# -- one owner per database, one server per port ------------------------------------------------


def test_a_second_server_on_the_same_database_exits_naming_it_and_the_holder(
    tmp_path: Path,
) -> None:
    db = tmp_path / "x.db"
    with running_server(tmp_path, "--grpc-port", "0", "--db", str(db)) as first:
        line = startup_error(tmp_path, "--grpc-port", "0", "--db", str(db))
        assert str(db) in line
        assert f"pid {first.process.pid}" in line
        # The first server is untouched.
        assert health(first) == "SERVING"


def test_a_second_server_on_the_same_port_exits_with_one_line(tmp_path: Path) -> None:
    with running_server(tmp_path, "--grpc-port", "0", "--db", str(tmp_path / "a.db")) as first:
        line = startup_error(
            tmp_path, "--grpc-port", str(first.port), "--db", str(tmp_path / "b.db")
        )
    assert f":{first.port}" in line
    assert "in use" in line


# -- the database file at start ----------------------------------------------------------------


def _not_a_database(db: Path) -> None:
    db.write_bytes(b"these are somebody's notes, not a database\n" * 100)


def _corrupt(db: Path) -> None:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE t (x TEXT)")
        conn.executemany("INSERT INTO t VALUES (?)", [("x" * 500,)] * 200)
        conn.execute("CREATE INDEX t_x ON t (x)")
        conn.commit()
    data = bytearray(db.read_bytes())
    page = 4096
    for at in range(3 * page, len(data), page):  # scribble over the b-tree pages
        data[at : at + 64] = b"\xff" * 64
    db.write_bytes(bytes(data))


def _newer_schema(db: Path) -> None:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("PRAGMA user_version = 999")


def _someone_elses(db: Path) -> None:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (_not_a_database, "is not a SQLite database"),
        (_corrupt, "restore it from a backup"),
        (_newer_schema, "newer than this service knows"),
        (_someone_elses, "of something else"),
    ],
    ids=["not-a-database", "corrupt", "newer-schema", "another-apps"],
)
def test_a_database_file_that_is_not_ours_or_not_healthy_is_refused_at_start(
    tmp_path: Path, make: Any, problem: str
) -> None:
    db = tmp_path / "x.db"
    make(db)
    line = startup_error(tmp_path, "--grpc-port", "0", "--db", str(db))
    assert str(db) in line
    assert problem in line


def test_a_database_in_a_folder_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    line = startup_error(tmp_path, "--grpc-port", "0", "--db", str(blocker / "x.db"))
    assert str(blocker) in line


# -- the database file while serving ----------------------------------------------------------


def test_a_deleted_database_is_never_written_to_and_reports_not_serving(tmp_path: Path) -> None:
    """Writing into a deleted file would acknowledge events a restart cannot find."""
    db = tmp_path / "x.db"
    deliveries = list(fresh_deliveries(6))
    with running_server(tmp_path, "--grpc-port", "0", "--db", str(db)) as server:
        assert try_ingest(server, deliveries[0]) == ("ok", "INGEST_OUTCOME_APPLIED")
        for path in tmp_path.glob("x.db*"):
            if not path.name.endswith(".lock"):
                path.unlink()
        for d in deliveries[1:]:
            code, text = try_ingest(server, d)
            assert code == UNAVAILABLE, text
            assert "was not stored" in text
        wait_until(lambda: health(server) == "NOT_SERVING", "health NOT_SERVING")
        log = server.log_text()
    # One line for the fault, not one (or a traceback) per call.
    faults = [line for line in log.splitlines() if "cannot write" in line]
    assert len(faults) == 1, log
    assert "database file deleted" in faults[0]
    assert "Traceback" not in log


def test_a_database_moved_away_and_back_recovers_by_itself(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    aside = tmp_path / "aside.db"
    first, second, third = fresh_deliveries(3)
    with running_server(tmp_path, "--grpc-port", "0", "--db", str(db)) as server:
        assert try_ingest(server, first)[0] == "ok"
        db.rename(aside)
        assert try_ingest(server, second)[0] == UNAVAILABLE
        wait_until(lambda: health(server) == "NOT_SERVING", "health NOT_SERVING")
        status, ready = readyz(server)
        assert status == 503
        assert ready["reason"] == "the store cannot write (database file deleted)"
        aside.rename(db)
        # Nothing is sent meanwhile: the service notices by itself that it can write again.
        wait_until(lambda: health(server) == "SERVING", "health SERVING again")
        assert readyz(server)[0] == 200
        assert try_ingest(server, second) == ("ok", "INGEST_OUTCOME_APPLIED")
        assert try_ingest(server, third)[0] == "ok"
        assert "writes again after database file deleted" in server.log_text()
    assert {first["svix_id"], second["svix_id"], third["svix_id"]} <= stored_event_ids(db)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 6 MiB tmpfs, where the machine allows mounting one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_unavailable_logged_once_and_recovers_by_itself(small_disk: Path) -> None:
    db = small_disk / "x.db"
    filler = small_disk / "filler"
    acknowledged: set[str] = set()
    deliveries = fresh_deliveries(3000)
    with running_server(small_disk, "--grpc-port", "0", "--db", str(db)) as server:
        assert try_ingest(server, next(deliveries))[0] == "ok"
        with contextlib.suppress(OSError), filler.open("wb") as out:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        failures = 0
        for d in deliveries:
            code, text = try_ingest(server, d)
            if code == "ok":
                acknowledged.add(d["svix_id"])
                continue
            assert code == UNAVAILABLE, text
            assert "disk" not in text.split("Message:")[-1].lower() or "disk full" in text
            failures += 1
            if failures == 3:
                break
        assert failures == 3, "the disk never filled up"
        wait_until(lambda: health(server) == "NOT_SERVING", "health NOT_SERVING")
        faults = [line for line in server.log_text().splitlines() if "cannot write" in line]
        assert len(faults) == 1
        assert "disk full" in faults[0]
        filler.unlink()
        wait_until(lambda: health(server) == "SERVING", "health SERVING again")
        later = next(deliveries)
        assert try_ingest(server, later)[0] == "ok"
        acknowledged.add(later["svix_id"])
        assert "Traceback" not in server.log_text()
    with running_server(small_disk, "--grpc-port", "0", "--db", str(db)):
        pass
    assert acknowledged <= stored_event_ids(db)


# -- many watchers, frozen watchers ------------------------------------------------------------


async def _open_watches(address: str, count: int) -> collections.Counter[str]:
    channels = separate_channels(address, count)
    calls = []

    async def one(i: int) -> str:
        stub = pb_grpc.TransactionServiceStub(channels[i % len(channels)])
        call = stub.WatchTransactions(pb.WatchTransactionsRequest())
        calls.append(call)
        try:
            message = await asyncio.wait_for(call.read(), DEADLINE)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        return message.WhichOneof("event")

    try:
        return collections.Counter(await asyncio.gather(*(one(i) for i in range(count))))
    finally:
        for call in calls:
            call.cancel()
        for channel in channels:
            await channel.close()


def test_two_thousand_watches_opened_at_once_all_succeed(tmp_path: Path) -> None:
    """What every client does after a restart or a failover."""
    with running_server(tmp_path, "--grpc-port", "0", "--db", str(tmp_path / "x.db")) as server:
        opened = asyncio.run(_open_watches(f"127.0.0.1:{server.port}", 2000))
    assert opened == {"progress": 2000}


FROZEN_CLIENT = """
import sys, time, grpc
from transactions.v1 import transactions_pb2 as pb, transactions_pb2_grpc as pb_grpc
channel = grpc.insecure_channel(sys.argv[1])
stub = pb_grpc.TransactionServiceStub(channel)
calls = [stub.WatchTransactions(pb.WatchTransactionsRequest()) for _ in range(20)]
for call in calls:
    next(call)
print("watching", flush=True)
time.sleep(3600)
"""


def open_watch_streams(server: Server) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics") as response:
        text = response.read().decode()
    match = re.search(r"^transaction_service_watch_streams (\S+)$", text, re.M)
    assert match, text
    return float(match.group(1))


def test_a_frozen_watcher_is_dropped_by_keepalive(tmp_path: Path) -> None:
    """A client that stops reading and answering (SIGSTOP: a hung VM, a debugger) holds no
    subscriptions past keepalive + its timeout."""
    args = ("--grpc-port", "0", "--db", str(tmp_path / "x.db"))
    keepalive = ("--keepalive-seconds", "1", "--keepalive-timeout-seconds", "1")
    with (
        running_server(tmp_path, *args, *keepalive) as server,
        Client(sys.executable, "-c", FROZEN_CLIENT, f"127.0.0.1:{server.port}") as client,
    ):
        client.wait_for(lambda: "watching" in client.stdout, "the client's watches")
        assert open_watch_streams(server) == 20
        os.kill(client.process.pid, signal.SIGSTOP)
        try:
            wait_until(lambda: open_watch_streams(server) == 0, "frozen watches dropped", 20)
        finally:
            os.kill(client.process.pid, signal.SIGCONT)


# -- the largest transaction the limits allow ---------------------------------------------------


def largest_body(orders: int, length: int) -> dict[str, Any]:
    """A delivery whose transaction block lists `orders` orders, every kept string `length`
    characters long."""
    body = copy.deepcopy(REDRAW["deliveries"][-1]["body"])
    tag = os.urandom(4).hex()
    block = body["data"]["order_transaction"]
    block["id"] = f"txn-{tag}-".ljust(length, "t")
    template = block["orders"][0]
    block["orders"] = []
    for i in range(orders):
        entry = copy.deepcopy(template)
        entry["id"] = f"order-{tag}-{i}-".ljust(length, "o")
        entry["low_level_status"] = "x".ljust(length, "s")
        entry["parent_id"] = None
        block["orders"].append(entry)
    body["data"]["id"] = block["orders"][0]["id"]
    return body


def test_the_largest_allowed_transaction_is_read_listed_watched_and_replayed(
    tmp_path: Path,
) -> None:
    body = largest_body(orders=50, length=1024)
    with running_server(tmp_path, "--grpc-port", "0", "--db", str(tmp_path / "x.db")) as server:
        ingested = server.call(f"{SERVICE}/IngestEvent", {"event_id": "largest", "payload": body})
        assert ingested["outcome"] == "INGEST_OUTCOME_APPLIED"
        txn_id = ingested["transaction"]["id"]
        got = server.call(f"{SERVICE}/GetTransaction", {"transaction_id": txn_id})
        assert len(got["transaction"]["orders"]) == 50
        listed = server.call(f"{SERVICE}/ListTransactions", {})
        assert [t["id"] for t in listed["transactions"]] == [txn_id]
        for method, request in (
            ("WatchTransaction", {"transaction_id": txn_id}),
            ("WatchTransaction", {"transaction_id": txn_id, "start_revision": 0}),
            ("WatchTransactions", {"start_revision": 0}),
        ):
            stream = ["-max-time", "3", "-d", json.dumps(request), server.address]
            watch = subprocess.run(
                [str(GRPCURL), "-plaintext", *stream, f"{SERVICE}/{method}"],
                capture_output=True,
                text=True,
                timeout=DEADLINE,
                check=False,
            )
            assert '"orders"' in watch.stdout, watch.stderr
            assert watch.stdout.count(f'"id": "{txn_id}"') >= 1
        # One more order is over the limit: refused, naming it, and nothing stored.
        over = largest_body(orders=51, length=10)
        refused = server.call_error(f"{SERVICE}/IngestEvent", {"event_id": "over", "payload": over})
        assert "InvalidArgument" in refused
        assert "50" in refused


# -- malformed input and the watch contract, over the wire ----------------------------------------


def test_every_malformed_input_is_invalid_argument_and_stores_nothing(tmp_path: Path) -> None:
    """The in-process cases of test_grpc_api (deep JSON and Struct, NaN/Infinity, timestamps off
    the calendar, blank ids, oversize state...) against the real process: the same codes and
    field violations, nothing stored, no traceback in the log."""
    db = tmp_path / "x.db"
    first = REDRAW["deliveries"][0]
    limit = ("--max-body-bytes", str(BODY_LIMIT))  # as in process, so the same cases apply
    with (
        running_server(tmp_path, "--grpc-port", "0", "--db", str(db), *limit) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.TransactionServiceStub(channel)
        stub.IngestEvent(
            pb.IngestEventRequest(event_id=first["svix_id"], payload_json=json.dumps(first["body"]))
        )
        before = stored_event_ids(db)
        for name, request, field, words in BAD_INPUTS:
            with pytest.raises(grpc.RpcError) as caught:
                stub.IngestEvent(request, timeout=DEADLINE)
            error = caught.value
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, error.details())
            assert words in error.details(), name
            assert field in violated_fields(error), name
        for seconds in (-(10**15), 10**15):
            listing = pb.ListTransactionsRequest(
                updated_since=timestamp_pb2.Timestamp(seconds=seconds)
            )
            with pytest.raises(grpc.RpcError) as caught:
                stub.ListTransactions(listing, timeout=DEADLINE)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert violated_fields(caught.value) == ["updated_since"]
        assert stored_event_ids(db) == before
        log = server.log_text()
    assert "Traceback" not in log


def test_a_start_revision_in_the_future_is_out_of_range_naming_the_head(tmp_path: Path) -> None:
    # Progress every 0.2 s: a watch from the head begins with one, not 10 s later.
    env = server_env(TRANSACTION_SERVICE_WATCH_PROGRESS_SECONDS="0.2")
    db = str(tmp_path / "x.db")
    with running_server(tmp_path, "--grpc-port", "0", "--db", db, env=env) as server:
        head = max(ingest_all(server, with_fresh_ids(REDRAW)["deliveries"][:2]))
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.TransactionServiceStub(channel)
            for call in (
                stub.WatchTransactions(pb.WatchTransactionsRequest(start_revision=head + 1)),
                stub.WatchTransaction(
                    pb.WatchTransactionRequest(order_id="any", start_revision=head + 1)
                ),
            ):
                with pytest.raises(grpc.RpcError) as caught:
                    next(call)
                assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
                info = error_info(caught.value)
                assert info.reason == "REVISION_IN_FUTURE"
                assert info.metadata["head_revision"] == str(head)
            # The head itself is a valid place to start.
            call = stub.WatchTransactions(pb.WatchTransactionsRequest(start_revision=head))
            assert next(call).WhichOneof("event") == "progress"
            call.cancel()
        # And grpcurl users see the reason too.
        request = {"start_revision": head + 1}
        shown = server.call_error(f"{SERVICE}/WatchTransactions", request)
        assert "OutOfRange" in shown


# -- settings ------------------------------------------------------------------------------------


def test_a_mistyped_setting_variable_is_warned_about_with_the_closest_name(tmp_path: Path) -> None:
    env = server_env(TRANSACTION_SERVICE_WEBHOOK_SECRET="whsec_x", TRANSACTION_SERVICE_FOO="1")
    with running_server(tmp_path, "--grpc-port", "0", "--db", str(tmp_path / "x.db"), env=env) as s:
        log = s.log_text()
    assert (
        "TRANSACTION_SERVICE_WEBHOOK_SECRET is not a setting and is ignored "
        "(did you mean TRANSACTION_SERVICE_WEBHOOK_SECRETS?)"
    ) in log
    assert "TRANSACTION_SERVICE_FOO is not a setting" in log
    assert "whsec_x" not in log
