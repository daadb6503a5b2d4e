"""End to end: the real `transaction-service serve` process, driven with grpcurl as users do.

Every test starts its own server on a free port and a fresh database in tmp_path, and stops it
afterwards (SIGTERM, then SIGKILL if it does not exit), whatever the test's outcome.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.conftest import SCENARIOS
from tests.harness import check_expect
from tests.process import (
    APPLIED,
    CALL_TIMEOUT,
    GRPCURL,
    RICHEST,
    SERVICE,
    START_TIMEOUT,
    STOP_TIMEOUT,
    WATCH_SHUTDOWN_LIMIT,
    MiB,
    Server,
    assert_served_as_expected,
    changes,
    cli_messages,
    cli_watch,
    first_grpcurl_message,
    get_transaction,
    grpcurl_messages,
    grpcurl_stream,
    grpcurl_watch,
    ingest,
    ingest_all,
    padded_body,
    revisions,
    running_server,
    serve_db,
    serve_db_on_port,
    server_env,
    wait_for_change_of,
)
from tests.scenario_tools import with_fresh_ids
from transactions.v1 import transactions_pb2 as pb
from transactions.v1 import transactions_pb2_grpc as pb_grpc


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with serve_db(tmp_path / "x.db") as running:
        yield running


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
    """The grpcurl lines of the README's five-minute tour, continuations joined."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("## A five-minute tour", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
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


def test_grpcurl_watch_multiplexes_watches_created_on_stdin(tmp_path: Path) -> None:
    """`grpcurl -d @` on Watch with two creates on stdin: each is acknowledged and opens as its
    own stream would; a webhook ingested afterwards reaches both; on SIGTERM each watch is
    canceled UNAVAILABLE with the revision to resume from, then the stream ends UNAVAILABLE."""
    delivery = RICHEST["deliveries"][0]
    order_id = delivery["body"]["data"]["id"]
    creates = [
        {"create": {"watch_id": 1, "transaction": {"order_id": order_id}}},
        {"create": {"watch_id": 2, "transactions": {}}},
    ]
    with serve_db(tmp_path / "x.db") as server, grpcurl_stream(server, "Watch", creates) as mux:

        def of(watch_id: int) -> list[dict[str, Any]]:
            return [m for m in grpcurl_messages(mux) if m["watchId"] == str(watch_id)]

        mux.wait_for(lambda: len(of(1)) >= 2 and len(of(2)) >= 2, "both watches opened")
        for watch_id, target in ((1, "transaction"), (2, "transactions")):
            created, opening = of(watch_id)[:2]
            assert "created" in created
            assert opening[target] == {"progress": {}}
        applied = ingest(server, delivery)
        for watch_id, target in ((1, "transaction"), (2, "transactions")):
            (message,) = mux.wait_for(
                lambda w=watch_id, t=target: [m[t] for m in of(w)[2:] if "change" in m.get(t, {})],
                f"the change on watch {watch_id}",
            )
            assert message["change"]["revision"] == applied["revision"]
            assert message["change"]["eventId"] == delivery["svix_id"]
        server.stop()
        assert mux.wait() != 0
        for watch_id in (1, 2):
            canceled = of(watch_id)[-1]["canceled"]
            assert canceled["code"] == 14  # UNAVAILABLE
            (info,) = [d for d in canceled["details"] if d["@type"].endswith("ErrorInfo")]
            assert info["reason"] == "SHUTTING_DOWN"
            assert info["metadata"]["last_sent_revision"] == applied["revision"]
    assert "Code: Unavailable" in mux.stderr
    assert "Traceback" not in server.log_text()


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
