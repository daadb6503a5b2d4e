"""End to end with Junction's API: the real `transaction-service serve` process against the fake
Junction API (tests/fake_junction.py), driven with grpcurl and the CLI as users do; on SQLite and
PostgreSQL where the store is involved.

The fake serves the documented shapes, pages `GET /v3/orders`, names statuses either way, and is
told to answer 429 with Retry-After, 500s, a slow answer and a permanent refusal.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.conftest import SCENARIOS, database
from tests.fake_junction import FakeJunction
from tests.process import (
    SERVICE,
    Server,
    assert_served_as_expected,
    changes,
    grpcurl_messages,
    grpcurl_watch,
    ingest,
    running_server,
    server_env,
    startup_error,
    summary,
)
from tests.test_readme import commands, for_server, run_bash, sh_blocks
from tests.webhook_tools import metric, request

REDRAW = next(s for s in SCENARIOS if s["scenario"] == "redraw_completed")
OTHER = next(s for s in SCENARIOS if s is not REDRAW)
ROOT = Path(__file__).resolve().parent.parent
CLI_TIMEOUT = 60.0
RESULTS_FETCHED = re.compile(r"combined results fetched")


@contextmanager
def serve_with_junction(
    tmp_path: Path, store_kind: str, fake: FakeJunction, **settings: str
) -> Iterator[Server]:
    """A server on a fresh database of the kind, with Junction's API pointed at `fake`."""
    env = server_env(
        TRANSACTION_SERVICE_JUNCTION_API_KEY=fake.api_key,
        TRANSACTION_SERVICE_JUNCTION_BASE_URL=fake.base_url,
        TRANSACTION_SERVICE_JUNCTION_TIMEOUT_SECONDS="1",
        **settings,
    )
    with (
        database(store_kind, tmp_path) as db,
        running_server(tmp_path, "--grpc-port", "0", "--db", db, env=env) as server,
    ):
        yield server


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "transaction_service", *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
        env=server_env(),
    )


def kinds_of(messages: list[dict[str, Any]], transaction_id: str) -> list[str]:
    return [
        kind
        for change in changes(messages)
        if change["transaction"]["id"] == transaction_id
        for kind in change["kinds"]
    ]


def test_the_sweep_completes_a_transaction_whose_completing_webhook_never_came(
    tmp_path: Path, store_kind: str, fake_junction: FakeJunction
) -> None:
    """Webhooks stop before the redraw order's completion. The sweep finds the silent ACTIVE
    transaction, reads Junction (through a 429 with Retry-After, two 500s and an answer slower
    than the timeout), and the transaction reaches COMPLETED; the feed shows exactly one
    TRANSACTION_COMPLETED and one RESULTS_READY; the late webhook is STALE; the API's answers
    are counted with source api."""
    fake_junction.load_scenario(REDRAW)
    fake_junction.fail("order_transaction", 429, retry_after=0.2)
    fake_junction.fail("order", 500, times=2)
    fake_junction.slow("transaction_result", 3.0)
    transaction_id = REDRAW["expect"]["transaction_id"]
    *delivered, missing = REDRAW["deliveries"]
    with (
        serve_with_junction(
            tmp_path,
            store_kind,
            fake_junction,
            TRANSACTION_SERVICE_RECONCILE_INTERVAL_SECONDS="0.2",
            TRANSACTION_SERVICE_RECONCILE_AFTER_SECONDS="60",
        ) as server,
        grpcurl_watch(server, "WatchTransactions", {"start_revision": 0}) as feed,
    ):
        for delivery in delivered:
            ingest(server, delivery)

        feed.wait_for(
            lambda: "CHANGE_KIND_RESULTS_READY" in kinds_of(grpcurl_messages(feed), transaction_id),
            "RESULTS_READY",
        )
        late = ingest(server, missing)
        assert late["outcome"] == "INGEST_OUTCOME_STALE"
        # A barrier: once another transaction's first change is on the feed, every change of
        # ours committed before it is there too.
        ingest(server, OTHER["deliveries"][0])
        other_id = OTHER["expect"]["transaction_id"]
        feed.wait_for(lambda: kinds_of(grpcurl_messages(feed), other_id), "the barrier change")
        kinds = kinds_of(grpcurl_messages(feed), transaction_id)

        assert kinds.count("CHANGE_KIND_TRANSACTION_COMPLETED") == 1
        assert kinds.count("CHANGE_KIND_RESULTS_READY") == 1
        got = server.call(f"{SERVICE}/GetTransaction", {"transaction_id": transaction_id})
        assert summary(got["transaction"]) == REDRAW["expect"]
        results = server.call(
            f"{SERVICE}/GetTransactionResults", {"order_id": missing["body"]["data"]["id"]}
        )
        assert results["status"] == "final"
        reply = request(server.http_port, "GET", "/metrics")
        text = reply.body.decode()
        applied = metric(text, "transaction_service_events_total", source="api", outcome="applied")
        assert applied >= 1
        swept = metric(
            text, "transaction_service_reconciles_total", trigger="sweep", outcome="changed"
        )
        assert swept == 1
        log = server.log_text()

    # The client backed off and retried rather than give up: 429 then success, 500, 500 then
    # success, the slow answer timed out then a quick one.
    assert len(fake_junction.requests_to("order_transaction")) >= 2
    assert len(fake_junction.requests_to("order")) >= len(REDRAW["expect"]["orders"]) + 2
    assert len(fake_junction.requests_to("transaction_result")) == 2
    assert "retry 1 of 4" in log
    # Results are health data: nothing of them reaches the log.
    assert "Glucose" not in log
    assert "glucose" not in log


def test_backfill_reaches_every_fixture_from_the_api_alone(tmp_path: Path, store_kind: str) -> None:
    """An empty service back-fills a window from Junction's API alone (the transaction answers
    in the webhooks' status spelling this time): every fixture ends in its expected state, the
    summary counts them, and a second run changes nothing. --resend asks Junction instead."""
    with FakeJunction(status_spelling="low_level_status") as fake:
        for scenario in SCENARIOS:
            fake.load_scenario(scenario)
        with serve_with_junction(tmp_path, store_kind, fake) as server:
            first = cli("backfill", "--address", server.address, "--since", "2026-01-01")
            for scenario in SCENARIOS:
                assert_served_as_expected(server, scenario)
            second = cli("backfill", "--address", server.address, "--since", "2026-01-01")
            resend = cli(
                "backfill",
                "--address",
                server.address,
                "--since",
                "2026-03-01",
                "--until",
                "2026-04-01",
                "--resend",
            )
    orders = sum(len(s["expect"]["orders"]) for s in SCENARIOS)
    assert first.returncode == 0, first.stderr
    assert (
        f"{orders} order(s), {len(SCENARIOS)} transaction(s): {len(SCENARIOS)} changed, "
        "0 unchanged, 0 failed" in first.stdout
    )
    assert second.returncode == 0, second.stderr
    assert f"0 changed, {len(SCENARIOS)} unchanged, 0 failed" in second.stdout
    assert resend.returncode == 0, resend.stderr
    assert "Junction will re-send the latest webhook of" in resend.stdout
    assert fake.requests_to("resend_events")[0].json()["start_at"] == "2026-03-01T00:00:00Z"


def test_cli_reconcile_and_a_permanent_refusal_given_up_at_once(
    tmp_path: Path, fake_junction: FakeJunction
) -> None:
    """`transaction-service reconcile` prints what the answers did; a permanent 4xx is given up
    at once (one request) with the provider's message, as FAILED_PRECONDITION, exit 1."""
    fake_junction.load_scenario(REDRAW)
    order_id = REDRAW["expect"]["redraw_order_id"]
    with serve_with_junction(tmp_path, "sqlite", fake_junction) as server:
        done = cli("reconcile", "--address", server.address, "--order-id", order_id)
        fake_junction.fail("order", 403, message="This key may not read orders of this team")
        asked = len(fake_junction.requests_to("order"))
        refused = cli("reconcile", "--address", server.address, "--order-id", order_id)
        log = server.log_text()
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["changed"] is True
    assert summary_status(answer) == "TRANSACTION_STATUS_COMPLETED"
    assert "INGEST_OUTCOME_APPLIED" in {a["outcome"] for a in answer["answers"]}
    assert {a["event_id"][:11] for a in answer["answers"]} == {"api:sha256:"}
    assert refused.returncode == 1
    assert refused.stderr.startswith("transaction-service reconcile: FAILED_PRECONDITION: ")
    assert "answered 403 Forbidden: 'This key may not read orders of this team'" in refused.stderr
    assert "check the API key" in refused.stderr
    assert len(fake_junction.requests_to("order")) == asked + 1
    assert "Traceback" not in log


def summary_status(answer: dict[str, Any]) -> str:
    return answer["transaction"]["status"]


def test_a_sweep_without_an_api_key_is_a_one_line_startup_error(tmp_path: Path) -> None:
    env = server_env(TRANSACTION_SERVICE_RECONCILE_INTERVAL_SECONDS="60")
    line = startup_error(tmp_path, "--db", str(tmp_path / "x.db"), env=env)
    assert line == (
        "transaction-service: error: bad setting settings: --reconcile-interval-seconds needs "
        "Junction's API: set TRANSACTION_SERVICE_JUNCTION_API_KEY, or leave the interval at 0"
    )


def test_readme_reconcile_commands_work_as_written(tmp_path: Path) -> None:
    """The serve line of the README's Junction section, with its API key, against the fake (the
    one thing added: the fake's base URL), then each client line, in order; the results lines
    run once the server has fetched them."""
    serve_block, client_block = sh_blocks("reconcile.md", "# Reconcile with Junction's API")
    (serve_line,) = commands(serve_block)
    assignments = dict(
        word.split("=", 1) for word in serve_line.split() if re.fullmatch(r"[A-Z_]+=\S+", word)
    )
    assert serve_line.endswith(".venv/bin/transaction-service serve")
    key = assignments["TRANSACTION_SERVICE_JUNCTION_API_KEY"]
    examples = [
        json.loads(p.read_text()) for p in sorted((ROOT / "examples").glob("redraw_*.json"))
    ]
    bodies = [e.get("payload") or json.loads(e["payload_json"]) for e in examples]
    with FakeJunction(api_key=key) as fake:
        fake.load_scenario({"deliveries": [{"body": b} for b in bodies]})
        env = server_env(TRANSACTION_SERVICE_JUNCTION_BASE_URL=fake.base_url, **assignments)
        with running_server(tmp_path, "--grpc-port", "0", "--db", "x.db", env=env) as server:
            outputs = []
            for line in commands(client_block):
                if "GetTransactionResults" in line:
                    server.wait_for_log(RESULTS_FETCHED)
                result = run_bash(for_server(line, server))
                assert result.returncode == 0, f"{line}\n{result.stdout}\n{result.stderr}"
                outputs.append(result.stdout)
            log = server.log_text()
    assert json.loads(outputs[0])["changed"] is True
    assert "1 transaction(s): 0 changed, 1 unchanged, 0 failed" in outputs[1]
    assert json.loads(outputs[2])["status"] == "final"
    assert "chunk" in json.loads(outputs[3])
    assert "sweep every 300 s" in log
    assert key not in log
    assert os.path.exists(tmp_path / "x.db")
