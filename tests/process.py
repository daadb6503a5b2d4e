"""Running the real `transaction-service serve` process in tests, and talking to it as users do
(grpcurl, the CLI). Every test file that needs a server process uses these.

A server starts on a free port with a fresh database (SQLite in tmp_path, or a PostgreSQL URL) and
is stopped afterwards (SIGTERM, then SIGKILL if it does not exit), whatever the test's outcome.
"""

from __future__ import annotations

import contextlib
import json
import os
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

import pytest

from tests.conftest import SCENARIOS

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


def wait_until(condition: Callable[[], Any], what: str, timeout: float = CALL_TIMEOUT) -> None:
    """Return once `condition()` is true; fail the test, naming `what`, after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.1)


def startup_error(workdir: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """Run `transaction-service serve ARGS` in `workdir`, which must stop at once the way a
    startup mistake does: exit code 2, no traceback, exactly one line on stderr. That line."""
    # Free ports unless ARGS name others (the last of a repeated flag wins): a mistake must be
    # found whatever else runs on this machine, e.g. a `make run` on the default ports.
    free_ports = ("--grpc-port", "0", "--http-port", "0")
    result = subprocess.run(
        [sys.executable, "-m", "transaction_service", "serve", *free_ports, *args],
        cwd=workdir,
        env=env if env is not None else server_env(),
        capture_output=True,
        text=True,
        timeout=CALL_TIMEOUT,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.endswith("\n"), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    return result.stderr.rstrip("\n")


def serve_db(db: Path) -> Any:
    """`running_server` with a free port and the database `db`."""
    return running_server(db.parent, "--grpc-port", "0", "--db", str(db))


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

    def __init__(self, *args: str, stdin: str | None = None) -> None:
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        if stdin is not None:
            assert self.process.stdin is not None
            self.process.stdin.write(stdin)
            self.process.stdin.close()
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


def grpcurl_stream(server: Server, method: str, requests: list[dict[str, Any]]) -> Client:
    """`grpcurl -d @ ADDRESS SERVICE/METHOD` for a bidirectional method, `requests` on its
    stdin (then closed), left running."""
    return Client(
        str(GRPCURL),
        "-plaintext",
        "-d",
        "@",
        server.address,
        f"{SERVICE}/{method}",
        stdin="\n".join(json.dumps(r) for r in requests),
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
