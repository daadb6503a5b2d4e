"""Metrics, access logs, request ids, JSON logs and traces, against real server processes.

Traces go to a tiny OTLP receiver in the test (gRPC or HTTP, as an OpenTelemetry collector
would take them); the server is configured by the standard OTEL_* variables only.
"""

from __future__ import annotations

import gzip
import http.server
import json
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from tests.harness import Running
from tests.process import (
    RICHEST,
    Client,
    Server,
    grpcurl_messages,
    grpcurl_watch,
    running_server,
    server_env,
    startup_error,
    wait_until,
)
from tests.webhook_tools import SECRET, body_of, metric, post_webhook, request, signed_headers
from transaction_service.metrics import metrics_table, version
from transactions.v1 import transactions_pb2 as pb
from transactions.v1 import transactions_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
SERVICE = "transactions.v1.TransactionService"
INGEST_TOKEN = "ingest-token-0123456789"
READ_TOKEN = "read-token-0123456789"
WAIT = 30.0


def test_the_docs_metrics_table_is_generated_from_the_code() -> None:
    """The table in docs/observability.md is exactly `metrics_table()`: regenerate it with
    `scripts/docs_metrics.py` when a metric changes."""
    assert metrics_table() in (ROOT / "docs" / "observability.md").read_text()


def test_grpc_call_metrics_read_as_prometheus_clients_own_would() -> None:
    """The per-call gRPC metrics are counted in plain numbers and made into metrics at each
    scrape: the exposition is what prometheus-client's Counter and Histogram would write for the
    same calls."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from transaction_service.metrics import GRPC_BUCKETS, Metrics

    metrics = Metrics()
    reference = CollectorRegistry()
    labels = ("grpc_type", "grpc_service", "grpc_method")
    started = Counter("grpc_server_started", "x", labels, registry=reference)
    handled = Counter("grpc_server_handled", "x", (*labels, "grpc_code"), registry=reference)
    seconds = Histogram(
        "grpc_server_handling_seconds", "x", labels, registry=reference, buckets=GRPC_BUCKETS
    )
    calls = [("OK", 0.0004), ("OK", 0.005), ("NOT_FOUND", 0.0051), ("OK", 3.0), ("OK", 99.0)]
    one = metrics.grpc_method("unary", SERVICE, "GetTransaction")
    metrics.grpc_method("server_stream", SERVICE, "WatchTransactions")  # shown at 0
    for code, took in calls:
        one.started()
        one.handled(code, took)
        names = ("unary", SERVICE, "GetTransaction")
        started.labels(*names).inc()
        handled.labels(*names, code).inc()
        seconds.labels(*names).observe(took)
    names = ("server_stream", SERVICE, "WatchTransactions")
    started.labels(*names)
    handled.labels(*names, "OK")
    seconds.labels(*names)

    def samples(text: str) -> list[str]:
        return sorted(line for line in text.splitlines() if line.startswith("grpc_server_"))

    assert samples(metrics.exposition().decode()) == samples(generate_latest(reference).decode())


def test_every_served_metric_is_in_the_table(tmp_path: Path) -> None:
    """Nothing the server exposes is missing from the table (the table once missed one)."""
    with running_server(tmp_path, "--grpc-port", "0", "--db", "x.db") as server:
        text = request(server.http_port, "GET", "/metrics").body.decode()
    table = metrics_table()
    documented = re.findall(r"^\| `([a-z_*]+)`", table, re.MULTILINE)
    families = set(re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE))
    for family in families:
        exposed = {family, f"{family}_total", f"{family}_info"}
        assert any(
            name in exposed or (name.endswith("*") and family.startswith(name[:-1]))
            for name in documented
        ), f"{family} is served but not in docs/observability.md"


# -- JSON logs ----------------------------------------------------------------------------------


def json_lines(server: Server) -> list[dict[str, Any]]:
    """Every line the server wrote to stderr, each of which must be a JSON object."""
    lines = []
    for line in server.log_text().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}\nwhole log:\n{server.log_text()}")
    return lines


def stub(server: Server) -> pb_grpc.TransactionServiceStub:
    return pb_grpc.TransactionServiceStub(grpc.insecure_channel(server.address))


def ingest_request(delivery: dict[str, Any]) -> pb.IngestEventRequest:
    return pb.IngestEventRequest(
        event_id=delivery["svix_id"], payload_json=json.dumps(delivery["body"])
    )


def request_info(error: grpc.RpcError) -> str:
    """The request id in a failed call's RequestInfo detail."""
    status = rpc_status.from_call(error)
    assert status is not None, error
    for detail in status.details:
        info = error_details_pb2.RequestInfo()
        if detail.Unpack(info):
            return info.request_id
    pytest.fail(f"no RequestInfo in {status}")


def access_lines(lines: list[dict[str, Any]], method: str) -> list[dict[str, Any]]:
    return [
        line
        for line in lines
        if line["logger"] == "transaction_service.access"
        and line["method"] == f"{SERVICE}/{method}"
    ]


def test_every_unary_call_gets_an_access_line_and_every_error_its_request_id(
    tmp_path: Path,
) -> None:
    """One line per unary call, failures included: method, code, ms, role, peer, request id;
    a caller's own x-request-id is kept; each error's RequestInfo names the id of its line."""
    # --log-events: the use case's own line per delivery (off by default) carries the id too.
    args = [
        *("--log-format", "json", "--log-events"),
        *("--ingest-token", INGEST_TOKEN, "--read-token", READ_TOKEN),
    ]
    with running_server(tmp_path, "--grpc-port", "0", "--db", "x.db", *args) as server:
        api = stub(server)
        ingest = [("authorization", f"Bearer {INGEST_TOKEN}"), ("x-request-id", "caller-id-1")]
        api.IngestEvent(ingest_request(RICHEST["deliveries"][0]), metadata=ingest)
        read = [("authorization", f"Bearer {READ_TOKEN}")]
        with pytest.raises(grpc.RpcError) as missing:
            api.GetTransaction(pb.GetTransactionRequest(transaction_id="nope"), metadata=read)
        with pytest.raises(grpc.RpcError) as denied:
            api.IngestEvent(ingest_request(RICHEST["deliveries"][1]), metadata=read)
        with pytest.raises(grpc.RpcError) as anonymous:
            api.GetTransaction(pb.GetTransactionRequest(transaction_id="nope"))
        server.stop()
        lines = json_lines(server)
    ingested, refused = access_lines(lines, "IngestEvent")
    assert ingested["code"] == "OK"
    assert (ingested["role"], ingested["request_id"]) == ("ingest", "caller-id-1")
    assert ingested["peer"].startswith(("ipv4:", "ipv6:"))
    assert ingested["ms"] >= 0
    # The use case's own line of that call carries the same request id.
    [event_line] = [line for line in lines if line["message"] == "ingested"]
    assert event_line["request_id"] == "caller-id-1"

    assert (refused["code"], refused["role"]) == ("PERMISSION_DENIED", "read")
    assert request_info(denied.value) == refused["request_id"]
    not_found, unauthenticated = access_lines(lines, "GetTransaction")
    assert (not_found["code"], not_found["role"]) == ("NOT_FOUND", "read")
    assert request_info(missing.value) == not_found["request_id"]
    assert (unauthenticated["code"], unauthenticated["role"]) == ("UNAUTHENTICATED", "anonymous")
    assert request_info(anonymous.value) == unauthenticated["request_id"]
    assert len({not_found["request_id"], unauthenticated["request_id"], refused["request_id"]}) == 3


def test_successful_reads_get_sampled_access_lines_and_failures_all_theirs(
    tmp_path: Path,
) -> None:
    """By default one successful unary read in 100 of each method gets its line (the first
    one, with `sampled`: 100); failed reads and writes always get theirs; with
    --access-log-reads-every 1 every read does, and 0 none."""

    def calls(*args: str) -> list[dict[str, Any]]:
        db = f"reads-{args[-1] if args else 'default'}.db"
        with running_server(
            tmp_path, "--grpc-port", "0", "--db", db, "--log-format", "json", *args
        ) as server:
            api = stub(server)
            answer = api.IngestEvent(ingest_request(RICHEST["deliveries"][0]))
            lookup = pb.GetTransactionRequest(transaction_id=answer.transaction.id)
            for _ in range(150):
                api.GetTransaction(lookup)
            for _ in range(3):
                with pytest.raises(grpc.RpcError):
                    api.GetTransaction(pb.GetTransactionRequest(transaction_id="nope"))
            health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.address))
            for _ in range(3):
                health.Check(health_pb2.HealthCheckRequest())
            server.stop()
            return json_lines(server)

    lines = calls()
    reads = access_lines(lines, "GetTransaction")
    assert [(line["code"], line.get("sampled")) for line in reads] == [
        ("OK", 100),
        ("OK", 100),
        ("NOT_FOUND", None),
        ("NOT_FOUND", None),
        ("NOT_FOUND", None),
    ]
    [ingested] = access_lines(lines, "IngestEvent")
    assert "sampled" not in ingested
    assert ingested["code"] == "OK"
    checks = [line for line in lines if line.get("method") == "grpc.health.v1.Health/Check"]
    assert [line.get("sampled") for line in checks] == [100]

    every = access_lines(calls("--access-log-reads-every", "1"), "GetTransaction")
    assert len(every) == 153
    assert not any("sampled" in line for line in every)
    none = access_lines(calls("--access-log-reads-every", "0"), "GetTransaction")
    assert [line["code"] for line in none] == ["NOT_FOUND"] * 3


def test_streams_log_when_they_open_and_end(tmp_path: Path) -> None:
    """A stream's end line says how many messages went each way and why it ended: completed,
    cancelled by the client, server shutting down."""
    with running_server(
        tmp_path, "--grpc-port", "0", "--db", "x.db", "--log-format", "json"
    ) as server:
        api = stub(server)
        deliveries = RICHEST["deliveries"][:3]
        answers = list(api.IngestEvents(iter([ingest_request(d) for d in deliveries])))
        assert len(answers) == 3
        cancelled = api.WatchTransactions(pb.WatchTransactionsRequest())
        next(cancelled)  # the first progress message
        cancelled.cancel()
        with grpcurl_watch(server, "WatchTransactions", {}) as watcher:
            watcher.wait_for(lambda: grpcurl_messages(watcher), "a first message")
            wait_until(
                lambda: len(access_lines(json_lines(server), "WatchTransactions")) == 3,
                "the cancelled watch's end and the second watch's open line",
                WAIT,
            )
            server.stop()
        lines = json_lines(server)
    opened, ended = access_lines(lines, "IngestEvents")
    assert opened["message"] == "grpc stream opened"
    assert (ended["message"], ended["code"], ended["ended"]) == (
        "grpc stream ended",
        "OK",
        "completed",
    )
    assert (ended["received"], ended["sent"]) == (3, 3)
    assert opened["request_id"] == ended["request_id"]
    watches = access_lines(lines, "WatchTransactions")
    ends = [line for line in watches if line["message"] == "grpc stream ended"]
    assert [(e["code"], e["ended"]) for e in ends] == [
        ("CANCELLED", "cancelled by the client"),
        ("UNAVAILABLE", "server shutting down"),
    ]
    assert ends[1]["reason"] == "SHUTTING_DOWN"
    assert all(e["sent"] >= 1 for e in ends)


def test_a_stream_cut_off_at_the_end_of_the_shutdown_grace_is_logged_as_such(
    tmp_path: Path,
) -> None:
    """A `Watch` stream whose client does not read holds the shutdown until its grace runs out;
    gRPC then cancels it. Its end line says so (code CANCELLED, reason SHUTTING_DOWN, ended
    "cut off at the end of the shutdown grace"), not "cancelled by the client" as before."""
    args = ("--grpc-port", "0", "--db", "x.db", "--log-format", "json")
    with running_server(tmp_path, *args, "--shutdown-grace-seconds", "1") as server:
        api = stub(server)
        list(api.IngestEvents(iter([ingest_request(d) for d in RICHEST["deliveries"]])))
        creates = [
            pb.WatchRequest(
                create=pb.WatchCreateRequest(
                    watch_id=i, transactions=pb.WatchTransactionsRequest(start_revision=0)
                )
            )
            for i in range(1, 1001)
        ]
        unread = api.Watch(iter(creates))  # never read: flow control stops the server
        wait_until(
            lambda: "grpc stream opened" in str(access_lines(json_lines(server), "Watch")),
            "the Watch stream's open line",
            WAIT,
        )
        stat = Path(f"/proc/{server.process.pid}/stat")
        used = [-1, time.monotonic()]

        def stalled() -> bool:
            """The server has done nothing for a second (its CPU time, not the clock, so a busy
            machine does not matter): the replays wait for the client's flow-control window."""
            fields = stat.read_text().rsplit(")", 1)[1].split()
            now = int(fields[11]) + int(fields[12])
            if now != used[0]:
                used[:] = [now, time.monotonic()]
                return False
            return time.monotonic() - used[1] > 1

        wait_until(stalled, "the Watch stream held up by flow control", WAIT)
        server.stop()
        lines = json_lines(server)
        unread.cancel()
    ends = [e for e in access_lines(lines, "Watch") if e["message"] == "grpc stream ended"]
    assert [(e["code"], e["reason"], e["ended"]) for e in ends] == [
        ("CANCELLED", "SHUTTING_DOWN", "cut off at the end of the shutdown grace")
    ]


def test_http_requests_get_a_request_id(tmp_path: Path) -> None:
    """Sent back as X-Request-Id, in the JSON error body, and on the request's log lines."""
    env = server_env(TRANSACTION_SERVICE_WEBHOOK_SECRETS=SECRET)
    with running_server(
        tmp_path, "--grpc-port", "0", "--db", "x.db", "--log-format", "json", env=env
    ) as server:
        ok = request(server.http_port, "GET", "/healthz", headers={"X-Request-Id": "probe-7"})
        assert ok.headers["X-Request-Id"] == "probe-7"
        refused = post_webhook(server.http_port, b"{}", {"svix-id": "msg_1"})
        assert refused.status == 401
        rid = refused.json()["error"]["request_id"]
        assert refused.headers["X-Request-Id"] == rid
        server.stop()
        lines = json_lines(server)
    [line] = [line for line in lines if line["message"] == "webhook refused"]
    assert line["request_id"] == rid


def test_every_line_is_json_including_grpc_core_and_failed_tls_handshakes(
    tmp_path: Path,
) -> None:
    """grpc-core writes failed TLS handshakes to stderr itself (absl), past Python's logging:
    in JSON mode they come out as JSON lines too, with the level and source file."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_pem.write_to_path(tmp_path / "key.pem")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    args = ["--log-format", "json", "--tls-cert", "cert.pem", "--tls-key", "key.pem"]
    with running_server(tmp_path, "--grpc-port", "0", "--db", "x.db", *args) as server:
        # A plaintext client on the TLS port: the handshake fails on the server.
        with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError):
            pb_grpc.TransactionServiceStub(channel).GetTransaction(
                pb.GetTransactionRequest(transaction_id="x"), timeout=2
            )
        # Garbage on the HTTP port: aiohttp answers 400 and may log it.
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=WAIT) as raw:
            raw.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            raw.recv(1024)
        wait_until(
            lambda: "Handshake failed" in server.log_text(), "a failed handshake logged", WAIT
        )
        server.stop()
        lines = json_lines(server)
    handshakes = [line for line in lines if "Handshake failed" in line["message"]]
    assert handshakes[0]["logger"] == "grpc"
    assert handshakes[0]["source"].startswith("ssl_transport_security")
    assert lines[-1]["message"] == "stopped"


def test_a_startup_mistake_in_json_mode_is_one_json_line(tmp_path: Path) -> None:
    line = startup_error(
        tmp_path, "--grpc-port", "0", "--db", "mysql://db/x", "--log-format", "json"
    )
    entry = json.loads(line)
    assert entry["level"] == "ERROR"
    assert "unsupported URL scheme 'mysql'" in entry["message"]


# -- metrics ----------------------------------------------------------------------------------


def test_metrics_count_calls_requests_watches_and_commits(tmp_path: Path) -> None:
    env = server_env(TRANSACTION_SERVICE_WEBHOOK_SECRETS=SECRET)
    with running_server(tmp_path, "--grpc-port", "0", "--db", "x.db", env=env) as server:
        before = request(server.http_port, "GET", "/metrics").body.decode()
        labels = {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": "GetTransaction"}
        # Every method shows at 0 before its first call.
        assert metric(before, "grpc_server_handled_total", **labels, grpc_code="OK") == 0
        assert "grpc_server_handled_total" in before
        api = stub(server)
        with grpcurl_watch(server, "WatchTransactions", {}) as watcher:
            watcher.wait_for(lambda: grpcurl_messages(watcher), "a first message")
            answer = api.IngestEvent(ingest_request(RICHEST["deliveries"][0]))
            api.GetTransaction(pb.GetTransactionRequest(transaction_id=answer.transaction.id))
            with pytest.raises(grpc.RpcError):
                api.GetTransaction(pb.GetTransactionRequest(transaction_id="nope"))
            change = wait_for_changes(watcher, 1)[0]
            assert "traceId" not in change  # tracing is off: no trace to continue
            request(server.http_port, "GET", "/nope")
            text = request(server.http_port, "GET", "/metrics").body.decode()
    assert metric(text, "grpc_server_started_total", **labels) == 2
    assert metric(text, "grpc_server_handled_total", **labels, grpc_code="OK") == 1
    assert metric(text, "grpc_server_handled_total", **labels, grpc_code="NOT_FOUND") == 1
    assert metric(text, "grpc_server_handling_seconds_count", **labels) == 2
    watch = {"grpc_type": "server_stream", "grpc_service": SERVICE}
    assert metric(text, "grpc_server_started_total", **watch, grpc_method="WatchTransactions") == 1
    assert metric(text, "transaction_service_watches", kind="feed") == 1
    assert metric(text, "transaction_service_watches", kind="transaction") == 0
    assert metric(text, "transaction_service_watch_delivery_lag_seconds_count") >= 1
    assert metric(text, "transaction_service_store_commit_seconds_count") >= 1
    http = {"route": "/metrics", "method": "GET", "status": "200"}
    assert metric(text, "transaction_service_http_requests_total", **http) == 1
    assert (
        metric(
            text,
            "transaction_service_http_requests_total",
            route="other",
            method="GET",
            status="404",
        )
        == 1
    )
    assert 'transaction_service_build_info{python="' in text
    assert f'version="{version()}"' in text
    for family in (
        "process_cpu_seconds_total",
        "process_open_fds",
        "python_gc_objects_collected_total",
        "python_info",
    ):
        assert re.search(rf"^{family}\b", text, re.MULTILINE), family


# -- traces ----------------------------------------------------------------------------------


class Spans:
    """Spans received by a tiny OTLP receiver, kept as (resource attributes, span)."""

    def __init__(self) -> None:
        self.spans: list[trace_pb2.Span] = []
        self.resources: list[dict[str, str]] = []
        self._changed = threading.Condition()

    def add(self, export: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self._changed:
            for resource_spans in export.resource_spans:
                attributes = {
                    a.key: a.value.string_value for a in resource_spans.resource.attributes
                }
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        self.spans.append(span)
                        self.resources.append(attributes)
            self._changed.notify_all()

    def wait_for(self, found: Callable[[list[trace_pb2.Span]], Any], what: str) -> Any:
        deadline = time.monotonic() + WAIT
        with self._changed:
            while not (result := found(self.spans)):
                left = deadline - time.monotonic()
                if left <= 0:
                    names = sorted({s.name for s in self.spans})
                    pytest.fail(f"{what} never came; spans received: {names}")
                self._changed.wait(left)
            return result


@contextmanager
def grpc_receiver() -> Iterator[tuple[str, Spans]]:
    spans = Spans()

    class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(
            self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
        ) -> trace_service_pb2.ExportTraceServiceResponse:
            spans.add(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", spans
    finally:
        server.stop(0)


@contextmanager
def http_receiver() -> Iterator[tuple[str, Spans]]:
    spans = Spans()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            spans.add(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/traces", spans
    finally:
        server.shutdown()
        server.server_close()


def tracing_env(**otel: str) -> dict[str, str]:
    env = server_env(TRANSACTION_SERVICE_WEBHOOK_SECRETS=SECRET)
    env = {k: v for k, v in env.items() if not k.startswith("OTEL_")}
    # Spans leave in a tenth of a second; the receivers are on loopback, never behind a proxy.
    return env | {"OTEL_BSP_SCHEDULE_DELAY": "100", "NO_PROXY": "127.0.0.1,localhost"} | otel


def traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def hex_id(raw: bytes) -> str:
    return raw.hex()


def wait_for_changes(watcher: Client, count: int) -> list[dict[str, Any]]:
    def found() -> list[dict[str, Any]] | None:
        changes = [m["change"] for m in grpcurl_messages(watcher) if "change" in m]
        return changes if len(changes) >= count else None

    result = watcher.wait_for(found, f"{count} changes")
    assert result is not None
    return result


def test_traces_follow_a_delivery_from_its_sender_to_the_watcher(tmp_path: Path) -> None:
    """With an OTLP endpoint in the environment: a gRPC call's and a webhook's `traceparent`
    are continued; each delivery has its ingest, queue wait and commit spans in its own trace,
    linked to the batch's group commit (with its size), which holds the store commit and the
    publish; the change each delivery made carries its trace and span; log lines carry the
    trace id."""
    grpc_trace, grpc_parent, grpc_header = traceparent()
    web_trace, web_parent, web_header = traceparent()
    failed_trace, _, failed_header = traceparent()
    first, second = RICHEST["deliveries"][:2]
    with grpc_receiver() as (endpoint, spans):
        env = tracing_env(OTEL_EXPORTER_OTLP_ENDPOINT=endpoint, OTEL_EXPORTER_OTLP_PROTOCOL="grpc")
        # --log-events: the use case's own line per delivery (off by default) carries its trace.
        args = ["--log-format", "json", "--log-events"]
        with running_server(tmp_path, "--grpc-port", "0", "--db", "x.db", *args, env=env) as server:
            with grpcurl_watch(server, "WatchTransactions", {}) as watcher:
                watcher.wait_for(lambda: grpcurl_messages(watcher), "a first message")
                stub(server).IngestEvent(
                    ingest_request(first), metadata=[("traceparent", grpc_header)]
                )
                body = body_of(second)
                headers = signed_headers(SECRET, second["svix_id"], body)
                reply = post_webhook(server.http_port, body, headers | {"traceparent": web_header})
                assert reply.status == 200, reply.body
                with pytest.raises(grpc.RpcError):
                    stub(server).GetTransaction(
                        pb.GetTransactionRequest(transaction_id="nope"),
                        metadata=[("traceparent", failed_header)],
                    )
                changes = {c["eventId"]: c for c in wait_for_changes(watcher, 2)}
            server.stop()
            lines = json_lines(server)

        def by_trace(trace_id: str) -> Callable[[list[trace_pb2.Span]], list[trace_pb2.Span]]:
            def found(all_spans: list[trace_pb2.Span]) -> list[trace_pb2.Span]:
                mine = [s for s in all_spans if hex_id(s.trace_id) == trace_id]
                names = {s.name for s in mine}
                return mine if {"ingest", "queue wait", "commit"} <= names else []

            return found

        grpc_spans = spans.wait_for(by_trace(grpc_trace), "the gRPC delivery's spans")
        web_spans = spans.wait_for(by_trace(web_trace), "the webhook's spans")
        batches = spans.wait_for(
            lambda all_spans: [s for s in all_spans if s.name == "commit batch"][:2],
            "the batches' commit spans",
        )
        [failed] = spans.wait_for(
            lambda found: [s for s in found if hex_id(s.trace_id) == failed_trace],
            "the failed call's span",
        )
        all_spans = list(spans.spans)
        resource = spans.resources[0]

    # A failed call's server span says so, with its code.
    assert failed.status.code == trace_pb2.Status.STATUS_CODE_ERROR
    codes = {a.key: a.value.int_value for a in failed.attributes}
    assert codes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]

    assert resource["service.name"] == "transaction-service"
    assert resource["service.version"] == version()
    for trace_id, parent, mine, delivery in (
        (grpc_trace, grpc_parent, grpc_spans, first),
        (web_trace, web_parent, web_spans, second),
    ):
        named = {s.name: s for s in mine}
        # The server span continues the sender's trace; ingest is under it.
        server_span = next(s for s in mine if hex_id(s.parent_span_id) == parent)
        ingest = named["ingest"]
        assert ingest.parent_span_id == server_span.span_id
        for child in ("queue wait", "commit"):
            assert named[child].parent_span_id == ingest.span_id
        # The delivery's commit links to its batch's commit, in a trace of the batch's own.
        [link] = named["commit"].links
        batch = next(b for b in all_spans if b.span_id == link.span_id)
        assert batch.name == "commit batch"
        assert hex_id(batch.trace_id) != trace_id
        size = {a.key: a.value.int_value for a in batch.attributes}
        assert size["transaction_service.batch.size"] >= 1
        assert ingest.span_id in [back.span_id for back in batch.links]
        store = next(s for s in all_spans if s.parent_span_id == batch.span_id)
        assert store.name == "store commit"
        assert any(s.name == "publish" and s.parent_span_id == store.span_id for s in all_spans)
        # The change carries the delivery's trace and its ingest span.
        change = changes[delivery["svix_id"]]
        assert (change["traceId"], change["spanId"]) == (trace_id, hex_id(ingest.span_id))
        # The log lines written for the delivery carry its trace.
        [event_line] = [
            line
            for line in lines
            if line["message"] == "ingested" and line["event_id"] == delivery["svix_id"]
        ]
        assert event_line["trace_id"] == trace_id
    assert "verify webhook signature" in {s.name for s in web_spans}
    assert {b.name for b in batches} == {"commit batch"}


def test_traces_go_over_http_protobuf_by_default(tmp_path: Path) -> None:
    """OTLP's default protocol, http/protobuf, to the traces endpoint given."""
    with http_receiver() as (endpoint, spans):
        env = tracing_env(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=endpoint, OTEL_SERVICE_NAME="tx-a")
        with running_server(tmp_path, "--grpc-port", "0", "--db", "x.db", env=env) as server:
            stub(server).IngestEvent(ingest_request(RICHEST["deliveries"][0]))
            spans.wait_for(
                lambda found: [s for s in found if s.name == "commit batch"], "a commit span"
            )
        assert spans.resources[0]["service.name"] == "tx-a"


@pytest.mark.parametrize(
    ("otel", "message"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER='zipkin'"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
            "OTEL_EXPORTER_OTLP_PROTOCOL='http/json'",
        ),
    ],
)
def test_an_unusable_tracing_setting_is_one_line(
    tmp_path: Path, otel: dict[str, str], message: str
) -> None:
    line = startup_error(tmp_path, "--grpc-port", "0", "--db", "x.db", env=tracing_env(**otel))
    assert message in line


@pytest.mark.parametrize("store_kind", ["sqlite"])
async def test_an_unexpected_error_is_internal_and_carries_its_request_id(
    api: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug's exception never reaches the caller, but the request id to find it in the log
    does."""

    async def broken(*args: object) -> None:
        raise RuntimeError("boom: nothing a caller should read")

    monkeypatch.setattr(api.service.store, "get", broken)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await api.stub.GetTransaction(
            pb.GetTransactionRequest(transaction_id="x"), metadata=[("x-request-id", "rid-42")]
        )
    assert error.value.code() == grpc.StatusCode.INTERNAL
    assert "boom" not in (error.value.details() or "")
    assert request_info(error.value) == "rid-42"
