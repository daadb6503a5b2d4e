"""End to end: the real `transaction-service serve` process, driven with grpcurl as users do.

Every test starts its own server on a free port and a fresh database in tmp_path, and stops it
afterwards (SIGTERM, then SIGKILL if it does not exit), whatever the test's outcome.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from tests.conftest import SCENARIOS
from tests.harness import check_expect
from tests.scenario_tools import with_fresh_ids
from transactions.v1 import transactions_pb2 as pb
from transactions.v1 import transactions_pb2_grpc as pb_grpc

GRPCURL = Path(sys.executable).parent / "grpcurl"
SERVICE = "transactions.v1.TransactionService"
LISTENING = re.compile(r"transaction-service listening on \[::\]:(\d+)")
# Logged before LISTENING: once that is there, so is this.
HTTP_LISTENING = re.compile(r"http listening on \S+:(\d+)")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
CALL_TIMEOUT = 60.0
MiB = 1024 * 1024

# The scenario with the most deliveries: the richest one to replay in the single-scenario tests.
RICHEST = max(SCENARIOS, key=lambda s: len(s["deliveries"]))


class Server:
    """A running server process. A thread collects its stderr (the log) line by line."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.port = 0
        self.http_port = 0
        self.log: list[str] = []
        self._eof = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                self.log.append(line)
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def log_text(self) -> str:
        with self._changed:
            return "".join(self.log)

    def wait_for_log(self, pattern: re.Pattern[str], timeout: float = START_TIMEOUT) -> re.Match:
        """The first log line matching `pattern`; fails if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.log[seen:]:
                    if match := pattern.search(line):
                        return match
                seen = len(self.log)
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    break
                self._changed.wait(left)
        if self._eof:  # the log closed: the process is exiting; let it, to report its exit code
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(STOP_TIMEOUT)
        pytest.fail(
            f"server never logged {pattern.pattern!r} "
            f"(exit code {self.process.poll()}); its log:\n{self.log_text()}"
        )

    def stop(self, timeout: float = STOP_TIMEOUT, sig: signal.Signals = signal.SIGTERM) -> int:
        """Send `sig`, wait for the exit, SIGKILL if it takes longer than `timeout`. Idempotent."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout)
        return self.process.returncode

    @property
    def address(self) -> str:
        return f"localhost:{self.port}"

    def grpcurl(self, *args: str, request: Any = None) -> subprocess.CompletedProcess[str]:
        """Run grpcurl against this server; `request` (if any) goes as JSON on stdin (`-d @`)."""
        data = ["-d", "@"] if request is not None else []
        limit = ["-max-time", str(CALL_TIMEOUT)]
        return subprocess.run(
            [str(GRPCURL), "-plaintext", *limit, *data, self.address, *args],
            input=json.dumps(request) if request is not None else None,
            capture_output=True,
            text=True,
            timeout=CALL_TIMEOUT + 10,
            check=False,
        )

    def call(self, method: str, request: Any) -> dict[str, Any]:
        """Call a method that must succeed; its response as proto3 JSON (camelCase, no defaults)."""
        result = self.grpcurl(method, request=request)
        assert result.returncode == 0, f"{method} failed:\n{result.stderr}"
        return json.loads(result.stdout)

    def call_error(self, method: str, request: Any) -> str:
        """Call a method that must fail; grpcurl's whole output (code, message, details)."""
        result = self.grpcurl(method, request=request)
        assert result.returncode != 0, f"{method} unexpectedly succeeded:\n{result.stdout}"
        return result.stdout + result.stderr


def server_env(**settings: str) -> dict[str, str]:
    """This environment without any TRANSACTION_SERVICE_* setting, plus an HTTP listener on any
    free port (so that servers never compete for 8080), plus `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSACTION_SERVICE_")}
    return env | {"TRANSACTION_SERVICE_HTTP_PORT": "0"} | settings


@contextmanager
def running_server(
    workdir: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[Server]:
    """Start `transaction-service serve ARGS` in `workdir`, yield it once it listens, stop it."""
    process = subprocess.Popen(
        [sys.executable, "-m", "transaction_service", "serve", *args],
        cwd=workdir,
        env=env if env is not None else server_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    server = Server(process)
    try:
        server.port = int(server.wait_for_log(LISTENING).group(1))
        server.http_port = int(server.wait_for_log(HTTP_LISTENING).group(1))
        yield server
    finally:
        server.stop()


def serve_db(db: Path) -> Any:
    """`running_server` with a free port and the database `db`."""
    return running_server(db.parent, "--grpc-port", "0", "--db", str(db))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with serve_db(tmp_path / "x.db") as running:
        yield running


def ingest(server: Server, delivery: dict[str, Any], *, as_json: bool = False) -> dict[str, Any]:
    """IngestEvent one fixture delivery, its body as a Struct (`payload`) or as text."""
    request: dict[str, Any] = {"event_id": delivery["svix_id"]}
    if as_json:
        request["payload_json"] = json.dumps(delivery["body"])
    else:
        request["payload"] = delivery["body"]
    return server.call(f"{SERVICE}/IngestEvent", request)


def get_transaction(server: Server, **lookup: str) -> dict[str, Any]:
    return server.call(f"{SERVICE}/GetTransaction", lookup)


def summary(transaction: dict[str, Any]) -> dict[str, Any]:
    """A transaction in the shape of a fixture's `expect`, filling in omitted proto3 defaults."""
    return {
        "transaction_id": transaction["id"],
        "status": transaction.get("status", "TRANSACTION_STATUS_UNSPECIFIED"),
        "initial_order_id": transaction.get("initialOrderId", ""),
        "redraw_order_id": transaction.get("redrawOrderId", ""),
        "redraw_available": transaction.get("redrawAvailable", False),
        "current_order_id": transaction.get("currentOrderId", ""),
        "orders": {
            order["id"]: [
                order.get("origin", "ORDER_ORIGIN_UNSPECIFIED"),
                order.get("lowLevelStatus", ""),
            ]
            for order in transaction.get("orders", [])
        },
    }


def assert_served_as_expected(server: Server, scenario: dict[str, Any]) -> dict[str, Any]:
    """GetTransaction by its id and by each order id all give the scenario's expected state."""
    expect = scenario["expect"]
    by_id = get_transaction(server, transaction_id=expect["transaction_id"])
    assert summary(by_id["transaction"]) == expect
    assert int(by_id["revision"]) >= int(by_id["transaction"]["revision"])
    for order_id in expect["orders"]:
        by_order = get_transaction(server, order_id=order_id)
        assert by_order["transaction"] == by_id["transaction"], order_id
    return by_id


def padded_body(size: int) -> str:
    """A valid JSON webhook body of about `size` bytes."""
    return json.dumps({"event_type": "labtest.order.updated", "padding": "x" * size})


WATCH_TIMEOUT = 30.0
APPLIED = "INGEST_OUTCOME_APPLIED"
# Watch streams are ended at once on SIGTERM, so the server stops well within its 10 s grace.
WATCH_SHUTDOWN_LIMIT = 8.0


T = TypeVar("T")


class Client:
    """A long-running client process (a grpcurl stream, the watch CLI). Threads collect its
    stdout and stderr line by line; leaving the `with` block terminates it."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._out: list[str] = []
        self._err: list[str] = []
        self._open_streams = 2
        self._changed = threading.Condition()  # re-entrant: `wait_for` conditions read output
        self._readers = [
            threading.Thread(target=self._read, args=(stream, lines), daemon=True)
            for stream, lines in (
                (self.process.stdout, self._out),
                (self.process.stderr, self._err),
            )
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: Any, lines: list[str]) -> None:
        for line in stream:
            with self._changed:
                lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._open_streams -= 1
            self._changed.notify_all()

    @property
    def stdout(self) -> str:
        with self._changed:
            return "".join(self._out)

    @property
    def stderr(self) -> str:
        with self._changed:
            return "".join(self._err)

    def wait_for(self, found: Callable[[], T], what: str, timeout: float = WATCH_TIMEOUT) -> T:
        """The first truthy result of `found()`, tried whenever output arrives; fails if the
        process closes its output or time runs out first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                if result := found():
                    return result
                left = deadline - time.monotonic()
                if self._open_streams == 0 or left <= 0:
                    break
                self._changed.wait(left)
        pytest.fail(
            f"{what} never came (exit code {self.process.poll()});\n"
            f"stdout:\n{self.stdout}\nstderr:\n{self.stderr}"
        )

    def wait(self, timeout: float = WATCH_TIMEOUT) -> int:
        """Wait for the process to exit by itself; its exit code, with all its output read."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running after {timeout} s; stderr:\n{self.stderr}")
        for reader in self._readers:
            reader.join(STOP_TIMEOUT)
        return self.process.returncode

    def stop(self) -> None:
        """Terminate (then kill) the process if it still runs. Idempotent."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for reader in self._readers:
            reader.join(STOP_TIMEOUT)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def grpcurl_watch(server: Server, method: str, request: dict[str, Any]) -> Client:
    """`grpcurl -d REQUEST ADDRESS SERVICE/METHOD` for a server-streaming method, left running."""
    return Client(
        str(GRPCURL), "-plaintext", "-d", json.dumps(request), server.address, f"{SERVICE}/{method}"
    )


def grpcurl_messages(client: Client) -> list[dict[str, Any]]:
    """The messages grpcurl printed so far: pretty JSON objects one after another. An object
    still being printed is left out."""
    text, decoder, messages, at = client.stdout, json.JSONDecoder(), [], 0
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        try:
            message, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            return messages
        messages.append(message)


def first_grpcurl_message(client: Client) -> dict[str, Any]:
    return client.wait_for(lambda: grpcurl_messages(client)[:1], "a first message")[0]


def changes(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m["change"] for m in messages if "change" in m]


def wait_for_change_of(client: Client, transaction_id: str) -> dict[str, Any]:
    """The first change of `transaction_id` that grpcurl prints."""

    def found() -> dict[str, Any] | None:
        mine = [
            c for c in changes(grpcurl_messages(client)) if c["transaction"]["id"] == transaction_id
        ]
        return mine[0] if mine else None

    return client.wait_for(found, f"a change of transaction {transaction_id}")


def revisions(messages: list[dict[str, Any]]) -> list[int]:
    """The revisions of the changes among the messages (proto3 JSON sends int64 as strings)."""
    return [int(change["revision"]) for change in changes(messages)]


def ingest_all(server: Server, deliveries: list[dict[str, Any]]) -> list[int]:
    """Ingest `deliveries` in order; the revisions of those that were applied."""
    responses = [ingest(server, delivery) for delivery in deliveries]
    return [int(r["revision"]) for r in responses if r["outcome"] == APPLIED]


def cli_watch(address: str, *args: str) -> Client:
    """`transaction-service watch --address ADDRESS ARGS`, left running."""
    return Client(sys.executable, "-m", "transaction_service", "watch", "--address", address, *args)


def cli_messages(client: Client) -> list[dict[str, Any]]:
    """The CLI's output so far: one JSON object per line, each of which must parse."""
    return [json.loads(line) for line in client.stdout.splitlines()]


def serve_db_on_port(stack: contextlib.ExitStack, db: Path, port: int, attempts: int = 5) -> Server:
    """A server on the database `db` and the given port, stopped when `stack` closes. Retried a
    few times in case the port is not free yet."""
    for attempt in range(1, attempts + 1):
        try:
            return stack.enter_context(
                running_server(db.parent, "--grpc-port", str(port), "--db", str(db))
            )
        except pytest.fail.Exception:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def test_reflection_lists_services_and_serves_proto_comments(server: Server) -> None:
    """`grpcurl list` shows our service, health and reflection; `describe` shows the docs."""
    listed = server.grpcurl("list")
    assert listed.returncode == 0, listed.stderr
    services = listed.stdout.split()
    for name in (
        SERVICE,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    ):
        assert name in services

    described = server.grpcurl("describe", "transactions.v1.Transaction")
    assert described.returncode == 0, described.stderr
    assert "The order to follow now" in described.stdout


def test_health_check_says_serving(server: Server) -> None:
    """A load balancer's health check sees SERVING once the server is up."""
    assert server.call("grpc.health.v1.Health/Check", {}) == {"status": "SERVING"}


def test_scenario_out_of_order_with_retries(server: Server, scenario: dict[str, Any]) -> None:
    """Webhooks in reverse order, each delivered twice, still give the expected transaction;
    every retry is answered DUPLICATE."""
    for delivery in reversed(scenario["deliveries"]):
        first = ingest(server, delivery)
        assert first["outcome"] != "INGEST_OUTCOME_DUPLICATE"
        assert first["eventId"] == delivery["svix_id"]
        again = ingest(server, delivery)
        assert again["outcome"] == "INGEST_OUTCOME_DUPLICATE"
        assert again["eventId"] == delivery["svix_id"]

    assert_served_as_expected(server, scenario)


def test_scenario_as_raw_json_text(server: Server) -> None:
    """A forwarder sending the raw body (`payload_json`) in order gets the expected transaction."""
    outcomes = [ingest(server, d, as_json=True)["outcome"] for d in RICHEST["deliveries"]]
    assert outcomes[0] == "INGEST_OUTCOME_APPLIED"
    assert "INGEST_OUTCOME_DUPLICATE" not in outcomes

    assert_served_as_expected(server, RICHEST)


def test_state_survives_restart(tmp_path: Path) -> None:
    """After SIGTERM and a restart on the same database, the transaction, its revision and the
    memory of which events were seen are all still there."""
    db = tmp_path / "x.db"
    with serve_db(db) as first:
        for delivery in RICHEST["deliveries"]:
            ingest(first, delivery)
        before = assert_served_as_expected(first, RICHEST)

        started = time.monotonic()
        exit_code = first.stop()
        assert time.monotonic() - started < STOP_TIMEOUT
        assert exit_code == 0, first.log_text()

    with serve_db(db) as second:
        after = get_transaction(second, transaction_id=RICHEST["expect"]["transaction_id"])
        assert after == before
        resent = ingest(second, RICHEST["deliveries"][0])
        assert resent["outcome"] == "INGEST_OUTCOME_DUPLICATE"


def test_body_that_is_not_json_is_invalid_argument(server: Server) -> None:
    """A body that is not JSON is refused with InvalidArgument naming payload_json."""
    output = server.call_error(f"{SERVICE}/IngestEvent", {"payload_json": "not json"})
    assert "InvalidArgument" in output
    assert "payload_json" in output


def test_unknown_order_is_not_found(server: Server) -> None:
    """Looking up an order no webhook mentioned gives NotFound."""
    output = server.call_error(f"{SERVICE}/GetTransaction", {"order_id": "no-such-order"})
    assert "NotFound" in output


def test_body_over_the_limit_is_invalid_argument(server: Server) -> None:
    """A 2 MiB body fits in a gRPC message but exceeds the body limit: InvalidArgument that
    says what the limit is."""
    output = server.call_error(f"{SERVICE}/IngestEvent", {"payload_json": padded_body(2 * MiB)})
    assert "InvalidArgument" in output
    assert "the limit is 1048576" in output


def test_message_over_grpc_limit_is_resource_exhausted(server: Server) -> None:
    """A 5 MiB request exceeds gRPC's 4 MiB message limit: ResourceExhausted, and the server
    keeps serving."""
    output = server.call_error(f"{SERVICE}/IngestEvent", {"payload_json": padded_body(5 * MiB)})
    assert "ResourceExhausted" in output
    assert server.call("grpc.health.v1.Health/Check", {}) == {"status": "SERVING"}


def test_settings_from_environment(tmp_path: Path) -> None:
    """With no flags, TRANSACTION_SERVICE_GRPC_PORT and TRANSACTION_SERVICE_DB are used: the
    server serves and creates that database file (and its folder)."""
    db = tmp_path / "from-env" / "env.db"
    env = server_env(TRANSACTION_SERVICE_GRPC_PORT="0", TRANSACTION_SERVICE_DB=str(db))
    with running_server(tmp_path, env=env) as server:
        assert server.call("grpc.health.v1.Health/Check", {}) == {"status": "SERVING"}
        assert db.is_file()
        assert not (tmp_path / "var").exists(), "the default database path was used"


def readme_grpcurl_commands() -> list[str]:
    """The grpcurl lines of the README's "Try it with grpcurl" block, continuations joined."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("## Try it with grpcurl", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    commands = block.replace("\\\n", " ").splitlines()
    return [c.strip() for c in commands if c.strip().startswith("grpcurl ")]


def test_readme_grpcurl_examples_work_as_written(server: Server) -> None:
    """Every grpcurl line of the README runs against a fresh server and succeeds, in order."""
    commands = readme_grpcurl_commands()
    assert len(commands) >= 8
    env = {**os.environ, "PATH": f"{GRPCURL.parent}{os.pathsep}{os.environ['PATH']}"}
    root = Path(__file__).resolve().parent.parent
    outputs = []
    for command in commands:
        command = command.replace("localhost:50051", server.address)
        result = subprocess.run(
            ["bash", "-c", command],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=CALL_TIMEOUT,
        )
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        outputs.append(result.stdout)
    # The last GetTransaction before the completion shows the redraw; the list shows it completed.
    assert "ORDER_ORIGIN_REDRAW" in outputs[4]
    listed = json.loads(outputs[-2])
    assert [t["status"] for t in listed["transactions"]] == ["TRANSACTION_STATUS_COMPLETED"]


def test_ctrl_c_stops_the_server_cleanly(server: Server) -> None:
    """SIGINT (Ctrl-C under `make run`) drains and exits 0, like SIGTERM."""
    ingest(server, RICHEST["deliveries"][0])
    assert server.stop(sig=signal.SIGINT) == 0
    assert "stopped" in server.log_text()
    assert "Traceback" not in server.log_text()


def test_grpcurl_watch_sees_a_change_ingested_after_it_started(server: Server) -> None:
    """A grpcurl watch of the whole feed, and one of an order no webhook has mentioned yet, each
    open with a progress message; a webhook ingested afterwards shows up on both as the
    transaction's creation."""
    delivery = RICHEST["deliveries"][0]
    transaction_id = RICHEST["expect"]["transaction_id"]
    order_id = delivery["body"]["data"]["id"]

    with (
        grpcurl_watch(server, "WatchTransactions", {}) as feed,
        grpcurl_watch(server, "WatchTransaction", {"order_id": order_id}) as one,
    ):
        for watch in (feed, one):
            assert "progress" in first_grpcurl_message(watch)

        applied = ingest(server, delivery)
        assert applied["outcome"] == APPLIED

        for watch in (feed, one):
            change = wait_for_change_of(watch, transaction_id)
            assert "CHANGE_KIND_TRANSACTION_CREATED" in change["kinds"]
            assert change["revision"] == applied["revision"]
            assert change["eventId"] == delivery["svix_id"]


def test_grpcurl_watch_replays_from_start_revision(server: Server) -> None:
    """Watching with start_revision 0 after the fact replays every change that was made, in
    order, with the revisions IngestEvent reported."""
    applied = ingest_all(server, RICHEST["deliveries"])
    assert applied == list(range(1, len(applied) + 1))

    with grpcurl_watch(server, "WatchTransactions", {"start_revision": 0}) as feed:
        feed.wait_for(lambda: applied[-1] in revisions(grpcurl_messages(feed)), "the last change")
        messages = grpcurl_messages(feed)
    assert revisions(messages) == applied
    assert {c["transaction"]["id"] for c in changes(messages)} == {
        RICHEST["expect"]["transaction_id"]
    }


def test_cli_watch_prints_json_lines_and_resumes(tmp_path: Path) -> None:
    """`transaction-service watch --from-revision 0` prints every change as a JSON line. When the
    server restarts, it says UNAVAILABLE, reconnects by itself and carries on where it stopped:
    changes made while it was cut off, then live ones, none missed or repeated."""
    db = tmp_path / "x.db"
    other = next(s for s in SCENARIOS if s is not RICHEST)
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(serve_db(db))
        cli = stack.enter_context(cli_watch(first.address, "--from-revision", "0"))
        before = ingest_all(first, RICHEST["deliveries"])
        cli.wait_for(lambda: before[-1] in revisions(cli_messages(cli)), "the first changes")
        assert revisions(cli_messages(cli)) == before

        assert first.stop() == 0, first.log_text()
        notice = "UNAVAILABLE: the server is shutting down"
        cli.wait_for(lambda: notice in cli.stderr, "the UNAVAILABLE notice")
        # Webhooks keep coming while nothing listens where the CLI reconnects: the CLI can only
        # get these changes by resuming from the last revision it printed.
        with serve_db(db) as elsewhere:
            while_away = ingest_all(elsewhere, other["deliveries"][:-1])

        second = serve_db_on_port(stack, db, first.port)
        cli.wait_for(lambda: while_away[-1] in revisions(cli_messages(cli)), "missed changes")
        live = ingest_all(second, other["deliveries"][-1:])
        cli.wait_for(lambda: live[-1] in revisions(cli_messages(cli)), "live changes")

        expected = before + while_away + live
        assert expected == list(range(1, len(expected) + 1))
        assert revisions(cli_messages(cli)) == expected
        assert cli.process.poll() is None, "the watch gave up instead of reconnecting"


def test_sigterm_ends_watch_streams_cleanly(server: Server) -> None:
    """SIGTERM with watches open: the server exits 0 at once rather than waiting out its grace
    period, and each watcher is told Unavailable (SHUTTING_DOWN) with the revision to resume
    from."""
    applied = ingest(server, RICHEST["deliveries"][0])
    transaction_id = RICHEST["expect"]["transaction_id"]
    with (
        grpcurl_watch(server, "WatchTransactions", {}) as feed,
        grpcurl_watch(server, "WatchTransaction", {"transaction_id": transaction_id}) as one,
    ):
        assert "progress" in first_grpcurl_message(feed)
        assert "current" in first_grpcurl_message(one)

        started = time.monotonic()
        exit_code = server.stop()
        took = time.monotonic() - started
        assert exit_code == 0, server.log_text()
        assert took < WATCH_SHUTDOWN_LIMIT, f"stopping took {took:.1f} s"

        for watch in (feed, one):
            assert watch.wait() != 0
            output = watch.stdout + watch.stderr
            assert "Code: Unavailable" in output
            assert "SHUTTING_DOWN" in output
            assert f'"last_sent_revision":"{applied["revision"]}"' in output


def test_no_acknowledged_event_is_lost_when_the_server_is_killed(tmp_path: Path) -> None:
    """Senders stream deliveries in; the server is killed (SIGKILL) mid-stream. After a restart
    on the same database every acknowledged delivery is known (its re-send is DUPLICATE), and
    re-sending everything, as the provider's retries would, ends every transaction in its
    expected state."""
    db = tmp_path / "crash.db"
    runs = [with_fresh_ids(s) for s in SCENARIOS for _ in range(40)]
    deliveries = [d for r in runs for d in r["deliveries"]]
    random.Random(3).shuffle(deliveries)
    acknowledged: list[str] = []
    lock = threading.Lock()

    def request(d: dict[str, Any]) -> pb.IngestEventRequest:
        return pb.IngestEventRequest(event_id=d["svix_id"], payload_json=json.dumps(d["body"]))

    with serve_db(db) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.TransactionServiceStub(channel)

        def send(chunk: list[dict[str, Any]]) -> None:
            for d in chunk:
                try:
                    stub.IngestEvent(request(d), timeout=CALL_TIMEOUT)
                except grpc.RpcError:
                    return  # the server is gone; this sender stops
                with lock:
                    acknowledged.append(d["svix_id"])

        senders = [
            threading.Thread(target=send, args=(deliveries[k::8],), daemon=True) for k in range(8)
        ]
        for sender in senders:
            sender.start()
        deadline = time.monotonic() + START_TIMEOUT
        while len(acknowledged) < len(deliveries) // 3:
            assert time.monotonic() < deadline, "ingest too slow to test a crash"
            time.sleep(0.005)
        server.process.kill()
        for sender in senders:
            sender.join(CALL_TIMEOUT)
    assert 0 < len(acknowledged) < len(deliveries), "the kill did not land mid-stream"

    with serve_db(db) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.TransactionServiceStub(channel)
        by_id = {d["svix_id"]: d for d in deliveries}
        for event_id in acknowledged:
            response = stub.IngestEvent(request(by_id[event_id]), timeout=CALL_TIMEOUT)
            assert response.outcome == pb.INGEST_OUTCOME_DUPLICATE, event_id
        for d in deliveries:
            stub.IngestEvent(request(d), timeout=CALL_TIMEOUT)
        for run in runs:
            got = stub.GetTransaction(
                pb.GetTransactionRequest(transaction_id=run["expect"]["transaction_id"]),
                timeout=CALL_TIMEOUT,
            )
            check_expect(got.transaction, run["expect"])
