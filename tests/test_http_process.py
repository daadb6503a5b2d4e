"""End to end over HTTP: Junction's signed webhooks, metrics and probes of the real
`transaction-service serve` process, with real HTTP requests.

Every test starts its own server (free gRPC and HTTP ports, a fresh database in tmp_path) and
stops it afterwards.
"""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SCENARIOS
from tests.process import (
    RICHEST,
    SERVICE,
    STOP_TIMEOUT,
    Server,
    assert_served_as_expected,
    ingest,
    running_server,
    server_env,
    startup_error,
)
from tests.webhook_tools import (
    OLD_SECRET,
    SECRET,
    WEBHOOK_PATH,
    body_of,
    make_secret,
    metric,
    post_webhook,
    request,
    send_signed,
    signature,
    signed_headers,
)

BODY_LIMIT = 64 * 1024
WAIT = 30.0


def serve_http(tmp_path: Path, *args: str, secrets: tuple[str, ...] = (SECRET,)) -> Any:
    """A server with these webhook secrets (in the environment, as in production) and a small
    body limit."""
    env = server_env(
        TRANSACTION_SERVICE_WEBHOOK_SECRETS=",".join(secrets),
        TRANSACTION_SERVICE_MAX_BODY_BYTES=str(BODY_LIMIT),
    )
    if not secrets:
        del env["TRANSACTION_SERVICE_WEBHOOK_SECRETS"]
    return running_server(
        tmp_path, "--grpc-port", "0", "--db", str(tmp_path / "x.db"), *args, env=env
    )


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with serve_http(tmp_path) as running:
        yield running


def stored_events(tmp_path: Path) -> int:
    with sqlite3.connect(tmp_path / "x.db") as conn:
        return conn.execute("SELECT count(*) FROM events").fetchone()[0]


def metrics_text(server: Server, headers: dict[str, str] | None = None) -> str:
    reply = request(server.http_port, "GET", "/metrics", headers=headers)
    assert reply.status == 200, reply.body
    return reply.body.decode()


def test_signed_delivery_of_every_fixture_is_applied(server: Server) -> None:
    """Every fixture's deliveries, signed as Svix signs them, are answered 200 after the commit
    with their outcome, and every transaction reaches its expected state; a retry of the same
    message is 200 DUPLICATE."""
    for scenario in SCENARIOS:
        for delivery in scenario["deliveries"]:
            reply = send_signed(server.http_port, delivery)
            assert reply.status == 200, reply.body
            answer = reply.json()
            assert answer["event_id"] == delivery["svix_id"]
            assert answer["outcome"] in {"applied", "stale", "ignored"}
            if answer["outcome"] == "applied":
                assert answer["revision"] > 0
                assert answer["transaction_id"] == scenario["expect"]["transaction_id"]
        retry = send_signed(server.http_port, scenario["deliveries"][0]).json()
        assert retry["outcome"] == "duplicate"
        assert_served_as_expected(server, scenario)


def test_svix_retry_with_webhook_header_names(server: Server) -> None:
    """The Standard Webhooks names (webhook-id, -timestamp, -signature) work like svix-*."""
    delivery = RICHEST["deliveries"][0]
    body = body_of(delivery)
    headers = signed_headers(SECRET, delivery["svix_id"], body, prefix="webhook-")
    reply = post_webhook(server.http_port, body, headers)
    assert reply.status == 200, reply.body
    assert reply.json()["event_id"] == delivery["svix_id"]


def test_refused_webhooks_get_their_status_store_nothing_and_are_counted(
    server: Server, tmp_path: Path
) -> None:
    """Forged, wrongly signed, unsigned, stale, future, replayed-over-another-body, non-JSON,
    invalid, conflicting and oversized requests: each its status and a JSON error, nothing
    stored, and the refusals counted by reason in /metrics."""
    port = server.http_port
    delivery = RICHEST["deliveries"][0]
    body = body_of(delivery)
    event_id = f"msg_{uuid.uuid4().hex}"
    now = time.time()
    good = signed_headers(SECRET, event_id, body)

    def without(name: str) -> dict[str, str]:
        return {k: v for k, v in good.items() if k != name}

    tampered = json.loads(body)
    tampered["data"]["status"] = "completed"
    not_json = b"this is not json"
    no_event_type = json.dumps({"data": {"id": 5}}).encode()
    not_utf8 = b'{"event_type": "\xff\xfe"}'
    oversize = json.dumps({"event_type": "x", "pad": "x" * BODY_LIMIT}).encode()
    cases: list[tuple[str, bytes | list[bytes], dict[str, str], int, str]] = [
        (
            "forged signature",
            body,
            good | {"svix-signature": "v1,ZmFrZWZha2VmYWtlZmFrZWZha2VmYWtlZmFrZWZha2U="},
            401,
            "bad_signature",
        ),
        ("not a v1 signature", body, good | {"svix-signature": "nonsense"}, 401, "bad_signature"),
        (
            "wrong secret",
            body,
            signed_headers(make_secret("someone else's"), event_id, body),
            401,
            "bad_signature",
        ),
        ("timestamp not a number", body, good | {"svix-timestamp": "nan"}, 401, "bad_timestamp"),
        ("no svix-id", body, without("svix-id"), 401, "missing_signature"),
        ("no svix-timestamp", body, without("svix-timestamp"), 401, "missing_signature"),
        ("no svix-signature", body, without("svix-signature"), 401, "missing_signature"),
        ("no headers at all", body, {}, 401, "missing_signature"),
        (
            "stale timestamp",
            body,
            signed_headers(SECRET, event_id, body, at=now - 6 * 60),
            401,
            "timestamp_out_of_tolerance",
        ),
        (
            "future timestamp",
            body,
            signed_headers(SECRET, event_id, body, at=now + 6 * 60),
            401,
            "timestamp_out_of_tolerance",
        ),
        (
            "signature replayed over a modified body",
            json.dumps(tampered).encode(),
            good,
            401,
            "bad_signature",
        ),
        (
            "signature replayed under another id",
            body,
            good | {"svix-id": f"msg_{uuid.uuid4().hex}"},
            401,
            "bad_signature",
        ),
        (
            "signed, not JSON",
            not_json,
            signed_headers(SECRET, event_id, not_json),
            400,
            "invalid_argument",
        ),
        (
            "signed, not an event",
            no_event_type,
            signed_headers(SECRET, event_id, no_event_type),
            400,
            "invalid_argument",
        ),
        ("not UTF-8", not_utf8, good, 400, "invalid_argument"),
        (
            "oversize, by Content-Length",
            oversize,
            signed_headers(SECRET, event_id, oversize),
            413,
            "too_large",
        ),
        (
            "oversize, chunked",
            [oversize[i : i + 8192] for i in range(0, len(oversize), 8192)],
            signed_headers(SECRET, event_id, oversize),
            413,
            "too_large",
        ),
    ]
    assert stored_events(tmp_path) == 0
    for what, payload, headers, status, reason in cases:
        reply = post_webhook(port, payload, headers)
        assert reply.status == status, (what, reply.body)
        error = reply.json()["error"]
        assert error["message"], what
        assert stored_events(tmp_path) == 0, what
        if status == 401:
            assert error["reason"].lower() == reason, what
        for secret in (SECRET, SECRET.removeprefix("whsec_")):
            assert secret not in reply.body.decode(), what

    # A signed body that is not an event names the problem and each field, like gRPC.
    bad = post_webhook(port, no_event_type, signed_headers(SECRET, event_id, no_event_type))
    fields = {v["field"] for v in bad.json()["error"]["field_violations"]}
    assert "body.event_type" in fields, bad.body
    not_json_reply = post_webhook(port, not_json, signed_headers(SECRET, event_id, not_json))
    assert not_json_reply.json()["error"]["field_violations"][0]["field"] == "body"

    # The same svix-id again with another (signed) body: 409, and the first stays.
    assert post_webhook(port, body, good).status == 200
    other = json.dumps(tampered).encode()
    conflict = post_webhook(port, other, signed_headers(SECRET, event_id, other))
    assert conflict.status == 409, conflict.body
    assert conflict.json()["error"]["code"] == "ALREADY_EXISTS"
    assert stored_events(tmp_path) == 1

    text = metrics_text(server)
    refused = "transaction_service_webhooks_refused_total"
    expected: dict[str, int] = {}
    for _, _, _, _, reason in cases:
        expected[reason] = expected.get(reason, 0) + 1
    expected["invalid_argument"] += 2
    expected["already_exists"] = 1
    for reason, count in expected.items():
        assert metric(text, refused, reason=reason) == count, reason
    assert metric(text, "transaction_service_events_total", source="webhook", outcome="applied")
    assert metric(text, "transaction_service_events_total", source="webhook", outcome="conflict")
    # The log says why each was refused, and never holds a body or a secret.
    log = server.log_text()
    assert "reason='bad_signature'" in log
    assert SECRET.removeprefix("whsec_") not in log
    assert "Jane" not in log  # a patient's name from the fixture bodies


def test_rotation_accepts_old_and_new_secret(tmp_path: Path) -> None:
    """During a rotation both secrets are configured: a delivery signed with either, or with
    both signatures in one header (as Svix sends during a rotation), is accepted; one signed
    with a third secret is not."""
    with serve_http(tmp_path, secrets=(OLD_SECRET, SECRET)) as server:
        port = server.http_port
        deliveries = RICHEST["deliveries"]
        assert send_signed(port, deliveries[0], secret=OLD_SECRET).status == 200
        assert send_signed(port, deliveries[1], secret=SECRET).status == 200
        body = body_of(deliveries[2])
        at = time.time()
        both = " ".join(
            signature(s, deliveries[2]["svix_id"], body, at) for s in (OLD_SECRET, SECRET)
        )
        headers = signed_headers(SECRET, deliveries[2]["svix_id"], body, at=at)
        assert post_webhook(port, body, headers | {"svix-signature": both}).status == 200
        stranger = send_signed(port, deliveries[3], secret=make_secret("not configured"))
        assert stranger.status == 401
        assert "2 secrets" in server.log_text()


def test_metrics_count_ingests_by_source(server: Server) -> None:
    """/metrics counts events by source and outcome, the ingest latency, batch sizes and the head
    revision, as the test made them."""
    first, second = RICHEST["deliveries"][:2]
    assert send_signed(server.http_port, first).json()["outcome"] == "applied"
    applied = ingest(server, second)
    assert applied["outcome"] == "INGEST_OUTCOME_APPLIED"
    assert ingest(server, second)["outcome"] == "INGEST_OUTCOME_DUPLICATE"

    text = metrics_text(server)
    events = "transaction_service_events_total"
    assert metric(text, events, source="webhook", outcome="applied") == 1
    assert metric(text, events, source="grpc", outcome="applied") == 1
    assert metric(text, events, source="grpc", outcome="duplicate") == 1
    assert metric(text, "transaction_service_ingest_seconds_count", source="grpc") == 2
    assert metric(text, "transaction_service_ingest_seconds_count", source="webhook") == 1
    assert metric(text, "transaction_service_commit_batch_size_count") == 3
    assert metric(text, "transaction_service_head_revision") == int(applied["revision"])
    assert metric(text, "transaction_service_watch_streams") == 0
    for name in ("watch_catch_ups_total", "watch_overflows_total"):
        assert f"transaction_service_{name} 0.0" in text


def test_probes_flip_when_shutting_down(tmp_path: Path) -> None:
    """SIGTERM with a shutdown delay: at once /readyz says 503 while /healthz stays 200, gRPC
    health says NOT_SERVING (`transaction-service health` exits 1), and webhooks get 503 and are
    not stored; a second SIGTERM ends the delay and the server exits 0."""
    with serve_http(tmp_path, "--shutdown-delay-seconds", "120") as server:
        port = server.http_port
        assert request(port, "GET", "/readyz").status == 200
        assert request(port, "GET", "/healthz").status == 200
        assert health(server.address).returncode == 0

        server.process.send_signal(signal.SIGTERM)
        server.wait_for_log(re.compile(r"not ready; closing the listeners"))
        assert request(port, "GET", "/readyz").status == 503
        assert request(port, "GET", "/healthz").status == 200
        refused = send_signed(port, RICHEST["deliveries"][0])
        assert refused.status == 503, refused.body
        assert refused.json()["error"]["reason"] == "SHUTTING_DOWN"
        checked = health(server.address)
        assert checked.returncode == 1
        assert "NOT_SERVING" in checked.stdout

        started = time.monotonic()
        assert server.stop() == 0, server.log_text()
        assert time.monotonic() - started < STOP_TIMEOUT
    assert stored_events(tmp_path) == 0


def health(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "transaction_service", "health", "--address", address, *args],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )


def test_health_command_says_serving_or_why_not(server: Server) -> None:
    """`transaction-service health` exits 0 on SERVING; against nothing, exits 1 with one line."""
    ok = health(server.address)
    assert (ok.returncode, ok.stdout.strip()) == (0, "SERVING")
    server.stop()
    gone = health(server.address, "--timeout", "2")
    assert gone.returncode == 1
    assert gone.stdout.count("\n") == 1
    assert "UNAVAILABLE" in gone.stdout or "DEADLINE_EXCEEDED" in gone.stdout
    assert "Traceback" not in gone.stderr


def test_without_a_secret_the_endpoint_is_off(tmp_path: Path) -> None:
    """No secret: the log warns at start, and webhooks get 503 with a JSON body saying why (Svix
    retries them until the secret is set); nothing is stored."""
    with serve_http(tmp_path, secrets=()) as server:
        assert re.search(r"WARNING .*webhooks: POST /webhooks/junction is off", server.log_text())
        reply = send_signed(server.http_port, RICHEST["deliveries"][0])
        assert reply.status == 503
        error = reply.json()["error"]
        assert error["reason"] == "WEBHOOKS_DISABLED"
        assert "no webhook secret" in error["message"]
    assert stored_events(tmp_path) == 0


def test_allow_unsigned_accepts_and_warns_loudly(tmp_path: Path) -> None:
    """--webhook-allow-unsigned (local development): unsigned deliveries are ingested under
    their svix-id, and the log says so at WARNING."""
    with serve_http(tmp_path, "--webhook-allow-unsigned", secrets=()) as server:
        assert re.search(r"WARNING .*UNSIGNED WEBHOOKS ACCEPTED", server.log_text())
        delivery = RICHEST["deliveries"][0]
        reply = post_webhook(server.http_port, body_of(delivery), {"svix-id": delivery["svix_id"]})
        assert reply.status == 200, reply.body
        assert reply.json()["event_id"] == delivery["svix_id"]
    assert stored_events(tmp_path) == 1


def test_json_logs_one_line_per_ingested_event(tmp_path: Path) -> None:
    """--log-format json: every log line is a JSON object; with --log-events each ingested event
    has one, with event id, order, transaction, outcome, revision, source and milliseconds."""
    with serve_http(tmp_path, "--log-format", "json", "--log-events") as server:
        delivery = RICHEST["deliveries"][0]
        answer = send_signed(server.http_port, delivery).json()
        ingest(server, RICHEST["deliveries"][1])
        server.stop()
        lines = [json.loads(line) for line in server.log_text().splitlines()]
    events = [line for line in lines if line["message"] == "ingested"]
    assert [e["source"] for e in events] == ["webhook", "grpc"]
    first = events[0]
    assert first["event_id"] == delivery["svix_id"]
    assert first["order_id"] == delivery["body"]["data"]["id"]
    assert first["transaction_id"] == answer["transaction_id"]
    assert (first["outcome"], first["revision"]) == ("applied", answer["revision"])
    assert first["ms"] >= 0
    assert any("http listening on" in line["message"] for line in lines)


def test_text_log_lines_cannot_be_forged(tmp_path: Path) -> None:
    """An id carrying a newline and a fake log line stays inside its own, quoted, line."""
    with serve_http(tmp_path, "--log-events") as server:
        delivery = json.loads(json.dumps(RICHEST["deliveries"][0]))
        forged = "x\n2026-01-01 00:00:00,000 INFO transaction_service.events: ingested"
        delivery["body"]["data"]["id"] = forged
        delivery["svix_id"] = "msg_forgery"
        ingest(server, delivery)
        server.stop()
        log = server.log_text()
    lines = log.splitlines()
    assert sum("ingested" in line for line in lines) == 1
    assert all(re.match(r"\d{4}-\d\d-\d\d ", line) for line in lines), log
    assert "order_id='x\\n2026-01-01" in log


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--webhook-secret", "whsec_not base64!"), "secret #1 is not of the form whsec_"),
        (("--webhook-secret", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"), "not of the form whsec_"),
        (("--tls-cert", "missing.pem", "--tls-key", "missing.key"), "cannot read it"),
        (("--tls-client-ca", "ca.pem"), "--tls-client-ca needs --tls-cert"),
        (("--read-token", "has space"), "token #1 has characters"),
        (("--read-token", "guessable-token"), "token #1 is shorter than 16 characters"),
        (
            (
                "--ingest-token",
                "one-token-for-both-roles",
                "--read-token",
                "one-token-for-both-roles",
            ),
            "a token is given both as an ingest token and as a read token",
        ),
    ],
)
def test_setting_mistakes_are_one_line(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    """A bad secret, token or TLS file stops the start with one line that names the setting and
    never shows the secret; no traceback, exit code 2, no database created."""
    line = startup_error(tmp_path, "--db", "x.db", *args)
    assert message in line
    if "secret" in message or "token" in message:
        assert args[1] not in line
    assert not (tmp_path / "x.db").exists()


def test_http_port_in_use_is_one_line(server: Server, tmp_path: Path) -> None:
    """A second server on the first one's HTTP port stops with one line, before opening its
    database."""
    other = tmp_path / "other"
    other.mkdir()
    line = startup_error(
        other, "--grpc-port", "0", "--http-port", str(server.http_port), "--db", "x.db"
    )
    assert f"cannot listen on [::]:{server.http_port} for HTTP" in line
    assert not (other / "x.db").exists()


def test_unknown_paths_and_methods_get_json(server: Server) -> None:
    """The router's own refusals are JSON like the rest, and no answer names the HTTP library or
    the Python version."""
    port = server.http_port
    missing = request(port, "GET", "/nope")
    assert missing.status == 404
    assert missing.json()["error"]["code"] == "NOT_FOUND"
    assert missing.headers["Server"] == "transaction-service"
    wrong = request(port, "GET", WEBHOOK_PATH)
    assert wrong.status == 405
    assert wrong.json()["error"]["code"] == "METHOD_NOT_ALLOWED"


def test_grpc_and_webhook_share_one_use_case(server: Server) -> None:
    """A delivery first sent over gRPC and retried by Svix over HTTP is a DUPLICATE there: one
    store of event ids, one use case."""
    delivery = RICHEST["deliveries"][0]
    server.call(
        f"{SERVICE}/IngestEvent",
        {"event_id": delivery["svix_id"], "payload_json": body_of(delivery).decode()},
    )
    assert send_signed(server.http_port, delivery).json()["outcome"] == "duplicate"
