"""Privacy of the SQLite store and the safe defaults (issue 16, item 6), against real server
processes: after the body retention erases webhook bodies, no copy of a patient's name is left in
any file of the store, while the server runs and after it stops; the store's files are readable by
their owner only; and a start that leaves gRPC open to the network says so with a WARNING in JSON
log mode too.

Before: 12 copies of the name stayed in the `-wal` (11 deliveries), and with 2,200 deliveries 152
in the database file itself (freed space is not zeroed); the files were 0644.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SCENARIOS
from tests.process import Server, running_server, server_env, startup_error
from tests.test_store_contract import HOUR, T0, Plan, commit, digest, view
from transaction_service.store.base import ResultsWrite
from transaction_service.store.sqlite import SqliteStore

# Made up for these tests: it occurs nowhere but in the bodies they ingest.
LAST_NAME = "Quixotefeld"
NAME = LAST_NAME.encode()
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
ERASED = re.compile(r"erased (\d+) webhook bodies")
WAIT = 120.0


def deliveries(copies: int) -> list[dict[str, Any]]:
    """Every fixture delivery `copies` times, each copy with fresh ids, the patient's last name
    (in `last_name` and in `receiver_name`) made distinctive."""
    out = []
    for i in range(copies):
        for scenario in SCENARIOS:
            text = json.dumps(scenario["deliveries"]).replace('Doe"', f'{LAST_NAME}"')
            for found in set(UUID.findall(text)):
                text = text.replace(found, str(uuid.uuid4()))
            for d in json.loads(text):
                out.append({"event_id": f"{d['svix_id']}-{i}", "body": json.dumps(d["body"])})
    return out


def ingest_all(server: Server, items: list[dict[str, Any]], folder: Path) -> None:
    lines = folder / "deliveries.jsonl"
    lines.write_text("".join(json.dumps(item) + "\n" for item in items))
    command = ["ingest", "--address", server.address, str(lines)]
    result = subprocess.run(
        [sys.executable, "-m", "transaction_service", *command],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(items)} applied" in result.stdout, result.stdout


def copies(folder: Path) -> dict[str, int]:
    """How many times the name occurs in each file of the folder."""
    return {p.name: p.read_bytes().count(NAME) for p in sorted(folder.iterdir()) if p.is_file()}


def modes(folder: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir() if p.is_file()}


def erased_so_far(server: Server) -> int:
    return sum(int(n) for n in ERASED.findall(server.log_text()))


def wait_until_erased(server: Server, count: int) -> None:
    deadline = time.monotonic() + WAIT
    while erased_so_far(server) < count:
        assert server.process.poll() is None, server.log_text()
        assert time.monotonic() < deadline, f"never erased {count} bodies:\n{server.log_text()}"
        time.sleep(0.2)


def serve(store: Path, **settings: str) -> Any:
    env = server_env(**{f"TRANSACTION_SERVICE_{k.upper()}": v for k, v in settings.items()})
    return running_server(store.parent, "--grpc-port", "0", "--db", str(store / "t.db"), env=env)


def test_erased_bodies_leave_no_copy_in_any_file_of_the_store(tmp_path: Path) -> None:
    """Enough deliveries that the WAL is checkpointed into the database file before they are
    erased (the case `secure_delete` is for), erased by the body retention of a running server:
    no copy of the name in the database, its `-wal` or `-shm`, while the server runs (the
    erasure is followed by a TRUNCATE checkpoint) and after a clean stop."""
    store = tmp_path / "store"
    items = deliveries(60)
    with serve(store) as server:
        ingest_all(server, items, tmp_path)
        assert set(modes(store).values()) == {0o600}, modes(store)
        assert server.stop() == 0
    kept = copies(store)
    assert sum(kept.values()) >= len(items), kept  # each body holds the name twice

    with serve(store, body_retention_seconds="1", change_trim_interval_seconds="1") as server:
        wait_until_erased(server, len(items))
        assert sum(copies(store).values()) == 0, copies(store)
        assert set(modes(store).values()) == {0o600}, modes(store)
        assert server.stop() == 0
    assert sum(copies(store).values()) == 0, copies(store)
    assert set(modes(store).values()) == {0o600}, modes(store)


def test_the_store_files_are_owner_only_and_wider_ones_are_tightened(tmp_path: Path) -> None:
    """Created 0600 (SQLite gives the `-wal` and `-shm` the database's mode); files found wider
    are tightened at start, with one WARNING naming them."""
    store = tmp_path / "store"
    with serve(store) as server:
        assert modes(store) == {n: 0o600 for n in ("t.db", "t.db-wal", "t.db-shm", "t.db.lock")}
        assert "readable by others" not in server.log_text()
        assert server.stop() == 0
    for path in store.iterdir():
        path.chmod(0o664)
    with serve(store) as server:
        assert set(modes(store).values()) == {0o600}, modes(store)
        warning = re.search(r"WARNING .*files of .* were readable by others.*", server.log_text())
        assert warning, server.log_text()
        assert "t.db (was 0664)" in warning.group(0)
        assert "t.db.lock (was 0664)" in warning.group(0)


def test_a_store_that_erased_bodies_before_secure_delete_is_zeroed_once(tmp_path: Path) -> None:
    """A database that erased bodies before `secure_delete` was on keeps them in its free
    space: its first start with it on rewrites the file (VACUUM), once."""
    store = tmp_path / "store"
    items = deliveries(2)
    with serve(store) as server:
        ingest_all(server, items, tmp_path)
    # What an earlier version did: erase without zeroing.
    with contextlib.closing(sqlite3.connect(store / "t.db", isolation_level=None)) as conn:
        conn.execute("PRAGMA secure_delete = OFF")
        conn.execute("UPDATE events SET body = NULL")
        conn.execute("DELETE FROM meta WHERE key = 'secure_delete'")
    assert not (store / "t.db-wal").exists()  # checkpointed into the file on close
    assert copies(store)["t.db"] > 0

    with serve(store) as server:
        assert server.stop() == 0
    assert "zeroing the free space" in server.log_text()
    assert sum(copies(store).values()) == 0, copies(store)
    with serve(store) as server:
        assert server.stop() == 0
    assert "zeroing the free space" not in server.log_text()


def test_an_open_grpc_port_and_unsigned_webhooks_are_warned_about_in_json_logs(
    tmp_path: Path,
) -> None:
    """The default (every interface, no tokens, no mutual TLS) is open to anyone who can reach
    the port: a WARNING record says so in JSON log mode as in text."""
    args = ("--grpc-port", "0", "--db", "x.db", "--log-format", "json", "--webhook-allow-unsigned")
    with running_server(tmp_path, *args) as server:
        assert server.stop() == 0
    records = [json.loads(line) for line in server.log_text().splitlines()]
    warnings = [r["message"] for r in records if r["level"] == "WARNING"]
    assert any(m.startswith("grpc: OPEN TO THE NETWORK") for m in warnings), warnings
    assert any(m.startswith("webhooks: UNSIGNED WEBHOOKS ACCEPTED") for m in warnings), warnings


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"INGEST_TOKENS": "long-enough-token-0123,short-tok"}, "token #2 is shorter than 16"),
        (
            {"INGEST_TOKENS": "shared-token-0123456789", "READ_TOKENS": "shared-token-0123456789"},
            "a token is given both as an ingest token and as a read token",
        ),
    ],
    ids=["short", "both-roles"],
)
def test_bad_tokens_in_the_environment_stop_the_start_with_one_line(
    tmp_path: Path, settings: dict[str, str], message: str
) -> None:
    """As with the flags (test_http_process.py): one line without the token, no traceback, exit
    code 2, no database created."""
    env = server_env(**{f"TRANSACTION_SERVICE_{k}": v for k, v in settings.items()})
    line = startup_error(tmp_path, "--grpc-port", "0", "--db", "x.db", env=env)
    assert message in line
    assert not any(token in line for value in settings.values() for token in value.split(","))
    assert not (tmp_path / "x.db").exists()


async def test_erased_large_bodies_and_results_leave_no_copy(tmp_path: Path) -> None:
    """Bodies and combined results larger than a page live in overflow pages, which an erasure
    puts on the free list: `secure_delete` zeroes them there. Both kinds erased, no copy in any
    file, with the store open and after it closes."""
    store = SqliteStore(tmp_path / "store" / "t.db", synchronous="NORMAL")
    await store.open()
    try:
        big = b'{"patient": "' + NAME + b'", "pad": "' + b"x" * 20_000 + b'"}'
        plan = Plan()
        change = plan.change(view("t1", "o1"), "e1", order_id="o1", received_at=T0, body=big)
        plan.plan.results.append(ResultsWrite("t1", "final", digest(big), big, T0, change))
        await commit(store, plan)
        before = sum(copies(tmp_path / "store").values())
        assert before >= 2, copies(tmp_path / "store")
        assert await store.erase_bodies(T0 + HOUR) == 1
        assert await store.erase_results(T0 + HOUR) == 1
        assert sum(copies(tmp_path / "store").values()) == 0, copies(tmp_path / "store")
    finally:
        await store.close()
    assert sum(copies(tmp_path / "store").values()) == 0, copies(tmp_path / "store")


async def test_a_reader_in_the_way_is_warned_about_and_the_next_pass_scrubs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A reader (a backup, an `sqlite3` shell) keeps the checkpoint after an erasure from
    completing: the erased body stays in the database file as well as in the `-wal` (the zeroed
    pages could not be copied back), and the WARNING names both; the next pass scrubs them."""
    folder = tmp_path / "store"
    store = SqliteStore(folder / "t.db", synchronous="NORMAL")
    await store.open()
    try:
        body = b'{"patient": "' + NAME + b'"}'
        plan = Plan()
        plan.change(view("t1", "o1"), "e1", order_id="o1", received_at=T0, body=body)
        await commit(store, plan)
        outside = sqlite3.connect(folder / "t.db", isolation_level=None)
        try:
            outside.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the body into the file
            outside.execute("BEGIN")
            outside.execute("SELECT count(*) FROM events").fetchone()
            with caplog.at_level("WARNING", logger="transaction_service.store.sqlite"):
                assert await store.erase_bodies(T0 + HOUR) == 1
            assert copies(folder).get("t.db", 0) >= 1, copies(folder)
            warned = [r.getMessage() for r in caplog.records if "may stay" in r.getMessage()]
            assert len(warned) == 1, caplog.text
            assert f"{folder / 't.db'} and its -wal" in warned[0]
        finally:
            outside.close()
        assert await store.erase_bodies(T0 + HOUR) == 0  # the next pass
        assert sum(copies(folder).values()) == 0, copies(folder)
    finally:
        await store.close()
