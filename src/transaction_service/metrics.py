"""Prometheus metrics: every metric object of the service, and the small functions that count.

Each `App` owns one `Metrics`, with a registry of its own (not prometheus-client's global one),
so several servers in one process (tests, benchmarks) count separately. The ingest and watch code
call the methods below; `GET /metrics` serves `exposition()`.

Every metric is declared through `_declare`, which also records it for `metrics_table()`: the
table in docs/observability.md is made from these declarations (`scripts/docs_metrics.py`) and a
test keeps the two equal. Per-call gRPC metrics use the names go-grpc-prometheus and
py-grpc-prometheus use, so their dashboards work unchanged.
"""

from __future__ import annotations

import bisect
import itertools
import math
import platform
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# No `*_created` series next to every counter: they double the output and no query here uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus-client leaves it untyped

PREFIX = "transaction_service"
SOURCES = ("grpc", "webhook", "api")
# What started a reconcile with Junction's API, and what it did.
RECONCILE_TRIGGERS = ("rpc", "sweep", "backfill")
RECONCILE_OUTCOMES = ("changed", "unchanged", "failed")
RESULTS_OUTCOMES = ("ready", "unchanged", "partial", "failed", "gave_up")
# Outcomes of an ingest: the four answers, and the refusals that happen after decoding (a
# conflicting event id, the store unavailable, the queue's share full, dropped at the deadline).
OUTCOMES = (
    "applied",
    "duplicate",
    "stale",
    "ignored",
    "conflict",
    "unavailable",
    "overloaded",
    "dropped",
)
# Why a delivery was dropped before its commit.
DROP_REASONS = ("deadline", "caller_gone")
LANES = ("webhook", "unary", "stream")
# What the HTTP listener sheds when full (a new connection, a webhook body still arriving), and
# why it closes a connection itself.
SHED = ("connection", "body")
HTTP_CLOSES = ("idle_timeout", "head_timeout", "head_too_large", "body_timeout")
# Group commit takes up to `max_batch` (default 256) deliveries at once.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# An ingest is one fsync'ed commit away: milliseconds normally, seconds when the disk stalls.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# go-grpc-prometheus's handling-time buckets (Prometheus' defaults), so its dashboards read ours.
GRPC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_STARTED_DOC = (
    "gRPC calls started on the server, by type (unary, server_stream, client_stream, "
    "bidi_stream), service and method."
)
_HANDLED_DOC = (
    "gRPC calls completed, by type, service, method and status code (OK, "
    "INVALID_ARGUMENT, UNAVAILABLE, CANCELLED, ...)."
)
_SECONDS_DOC = (
    "Time from a call's start to its status, by type, service and method (for a watch "
    "stream: how long it was open)."
)
# Commit to send: a millisecond for a live watcher, the batch interval for a batched one, longer
# for one catching up from the change log or on another replica that polls.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Junction's API: tens of milliseconds to its timeout (10 s by default).
JUNCTION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# How a Junction API request ended (one attempt; retries are counted again).
JUNCTION_OUTCOMES = ("ok", "not_found", "refused", "rate_limited", "server_error", "network_error")
# gRPC method types as go-grpc-prometheus labels them.
GRPC_TYPES = {
    (False, False): "unary",
    (True, False): "client_stream",
    (False, True): "server_stream",
    (True, True): "bidi_stream",
}
WATCH_KINDS = ("transaction", "feed")

M = TypeVar("M", bound=MetricWrapperBase)


@dataclass(frozen=True)
class Declared:
    """A metric as docs/observability.md lists it."""

    name: str
    kind: str
    labels: tuple[str, ...]
    documentation: str


# What prometheus-client's own collectors add; their names are theirs, not declared here.
COLLECTED = (
    Declared(
        "process_*",
        "gauge, counter",
        (),
        "the process: CPU seconds, resident and virtual "
        "memory, open and maximum file descriptors, start time (Linux)",
    ),
    Declared(
        "python_gc_*",
        "counter",
        ("generation",),
        "Python's garbage collector: collections, objects collected, uncollectable objects",
    ),
    Declared(
        "python_info",
        "gauge",
        ("implementation", "major", "minor", "patchlevel", "version"),
        "the Python running the service",
    ),
)


def version() -> str:
    """The installed transaction-service's version."""
    try:
        return metadata.version("transaction-service")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


class Metrics:
    """The service's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.declared: list[Declared] = []
        declare = self._declare
        # -- gRPC calls, as go-grpc-prometheus names them ----------------------------------------
        # Counted by the calls in plain numbers, made into metrics at each scrape (GrpcCalls).
        self.grpc_calls = GrpcCalls()
        self.registry.register(self.grpc_calls)
        self.declared += self.grpc_calls.declared
        # -- HTTP ---------------------------------------------------------------------------------
        self.http_requests = declare(
            Counter,
            f"{PREFIX}_http_requests",
            "HTTP requests answered, by route (/webhooks/junction, /metrics, /healthz, /readyz; "
            "other: any other path), method and status.",
            ("route", "method", "status"),
        )
        self.http_seconds = declare(
            Histogram,
            f"{PREFIX}_http_request_seconds",
            "Time to answer an HTTP request, by route.",
            ("route",),
            buckets=LATENCY_BUCKETS,
        )
        # -- ingest -------------------------------------------------------------------------------
        self.events = declare(
            Counter,
            f"{PREFIX}_events",
            "Deliveries ingested, by source (grpc, webhook, api) and outcome (applied, "
            "duplicate, stale, ignored; or refused after decoding: conflict, unavailable, "
            "overloaded: the ingest queue's share was full, dropped: the deadline passed before "
            "the commit).",
            ("source", "outcome"),
        )
        self.ingest_seconds = declare(
            Histogram,
            f"{PREFIX}_ingest_seconds",
            "Time from handing a decoded delivery to the ingestor until its commit was answered.",
            ("source",),
            buckets=LATENCY_BUCKETS,
        )
        self.batch_size = declare(
            Histogram,
            f"{PREFIX}_commit_batch_size",
            "Deliveries committed together in one database transaction (group commit).",
            buckets=BATCH_BUCKETS,
        )
        self.commit_seconds = declare(
            Histogram,
            f"{PREFIX}_store_commit_seconds",
            "Time the store took to lock, load, plan, write and commit one batch (every writer: "
            "ingest, results, reconcile, rebuild).",
            buckets=LATENCY_BUCKETS,
        )
        self.dropped = declare(
            Counter,
            f"{PREFIX}_ingest_dropped",
            "Deliveries dropped before their commit (never acknowledged, nothing stored), by "
            "source and reason: deadline (the caller's deadline passed) or caller_gone.",
            ("source", "reason"),
        )
        self.ingest_queue_depth = declare(
            Gauge,
            f"{PREFIX}_ingest_queue_depth",
            "Deliveries waiting for a commit, by lane (webhook, unary, stream).",
            ("lane",),
        )
        self.ingest_stream_in_flight = declare(
            Gauge,
            f"{PREFIX}_ingest_stream_requests_in_flight",
            "Deliveries read from IngestEvents streams and not yet answered (a request of "
            "several counts each; bounded per stream by the ingest stream window).",
        )
        self.head_revision = declare(
            Gauge,
            f"{PREFIX}_head_revision",
            "The newest revision committed to the change log.",
        )
        self.webhooks_refused = declare(
            Counter,
            f"{PREFIX}_webhooks_refused",
            "Webhook requests answered with an error, by reason (missing_signature, "
            "bad_signature, bad_timestamp, timestamp_out_of_tolerance, invalid_argument, "
            "already_exists, too_large, body_timeout, busy, shutting_down, store_unavailable, "
            "transaction_locked, ingest_queue_full, deadline_passed, webhooks_disabled).",
            ("reason",),
        )
        # -- HTTP edge (http/guard.py) -------------------------------------------------------------
        self.http_connections = declare(
            Gauge, f"{PREFIX}_http_connections", "HTTP connections open now."
        )
        self.http_shed = declare(
            Counter,
            f"{PREFIX}_http_shed",
            "HTTP work refused because a limit was reached: a new connection past "
            "http_max_connections, a webhook body past http_max_body_reads.",
            ("what",),
        )
        self.http_closed = declare(
            Counter,
            f"{PREFIX}_http_closed",
            "HTTP connections the server closed because the client was too slow or sent too "
            "much, by reason (idle_timeout, head_timeout, head_too_large, body_timeout).",
            ("reason",),
        )
        # -- watch --------------------------------------------------------------------------------
        self.watch_streams = declare(
            Gauge,
            f"{PREFIX}_watch_streams",
            "Watches open now (every kind; each watch of a Watch stream counts as one).",
        )
        self.watches = declare(
            Gauge,
            f"{PREFIX}_watches",
            "Watches open now, by kind (transaction: WatchTransaction, or a Watch stream's "
            "watch of one transaction; feed: WatchTransactions, or a Watch stream's feed).",
            ("kind",),
        )
        self.watch_lag = declare(
            Histogram,
            f"{PREFIX}_watch_delivery_lag_seconds",
            "From a change's commit (its recorded_at) to handing it to a watcher's stream, once "
            "per change or batch of changes handed over (for a batch: its oldest change).",
            buckets=LAG_BUCKETS,
        )
        self.watch_overflows = declare(
            Counter,
            f"{PREFIX}_watch_overflows",
            "Times a slow watcher's buffer was full and dropped (it then reads the change log).",
        )
        self.watch_catch_ups = declare(
            Counter,
            f"{PREFIX}_watch_catch_ups",
            "Times a watcher that had fallen behind caught up by reading the change log.",
        )
        # -- Junction's API -----------------------------------------------------------------------
        self.junction_requests = declare(
            Counter,
            f"{PREFIX}_junction_requests",
            "Requests to Junction's API (each attempt; retries count again), by endpoint (the "
            "path template, e.g. GET /v3/order/{order_id}) and outcome (ok, not_found, refused: "
            "another 4xx, rate_limited: 429, server_error: 5xx or 408, network_error: timeouts "
            "and connection failures).",
            ("endpoint", "outcome"),
        )
        self.junction_seconds = declare(
            Histogram,
            f"{PREFIX}_junction_request_seconds",
            "Time of one request to Junction's API, by endpoint, until its answer's head (a "
            "PDF's body streams after it).",
            ("endpoint",),
            buckets=JUNCTION_BUCKETS,
        )
        self.reconciles = declare(
            Counter,
            f"{PREFIX}_reconciles",
            "Transactions reconciled with Junction's API, by trigger (rpc, sweep, backfill) and "
            "outcome (changed, unchanged, failed).",
            ("trigger", "outcome"),
        )
        self.results_fetches = declare(
            Counter,
            f"{PREFIX}_results_fetches",
            "Fetches of combined results from Junction's API, by outcome (ready: new results "
            "reported; unchanged; partial; failed: retried later; gave_up).",
            ("outcome",),
        )
        # -- the process --------------------------------------------------------------------------
        self.build = declare(
            Info,
            f"{PREFIX}_build",
            "The running build: its version and the Python it runs on (value 1).",
        )
        self.build.info({"version": version(), "python": platform.python_version()})
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        for kind in WATCH_KINDS:
            self.watches.labels(kind)
        for trigger in RECONCILE_TRIGGERS:
            for outcome in RECONCILE_OUTCOMES:
                self.reconciles.labels(trigger, outcome)
        for outcome in RESULTS_OUTCOMES:
            self.results_fetches.labels(outcome)
        for what in SHED:
            self.http_shed.labels(what)
        for reason in HTTP_CLOSES:
            self.http_closed.labels(reason)
        # Every source/outcome pair from the start, so rates work before the first event.
        for source in SOURCES:
            self.ingest_seconds.labels(source)
            for outcome in OUTCOMES:
                self.events.labels(source, outcome)
            for reason in DROP_REASONS:
                self.dropped.labels(source, reason)

    def _declare(
        self,
        kind: type[M],
        name: str,
        documentation: str,
        labels: Sequence[str] = (),
        **options: Any,
    ) -> M:
        metric = kind(name, documentation, labels, registry=self.registry, **options)
        exposed = {
            Counter: f"{name}_total",
            Info: f"{name}_info",
        }.get(kind, name)
        self.declared.append(Declared(exposed, metric._type or "", tuple(labels), documentation))
        return metric

    # -- gRPC and HTTP -----------------------------------------------------------------------------

    def grpc_method(self, grpc_type: str, service: str, method: str) -> GrpcMethodMetrics:
        """The metrics of one gRPC method, to count its calls in."""
        return self.grpc_calls.method(grpc_type, service, method)

    def http_answered(self, route: str, method: str, status: int, seconds: float) -> None:
        self.http_requests.labels(route, method, str(status)).inc()
        self.http_seconds.labels(route).observe(seconds)

    # -- ingest ------------------------------------------------------------------------------------

    def ingested(self, source: str, outcome: str, seconds: float) -> None:
        self.events.labels(source, outcome).inc()
        self.ingest_seconds.labels(source).observe(seconds)

    def ingested_together(self, outcomes: Mapping[tuple[str, str], int], seconds: float) -> None:
        """`ingested` for deliveries answered together after `seconds`: how many of each
        (source, outcome)."""
        for (source, outcome), count in outcomes.items():
            self.events.labels(source, outcome).inc(count)
            latency = self.ingest_seconds.labels(source)
            for _ in range(count):
                latency.observe(seconds)

    def ingest_refused(self, source: str, outcome: str) -> None:
        """A decoded delivery the ingestor refused (`conflict`, `unavailable`)."""
        self.events.labels(source, outcome).inc()

    def ingest_dropped(self, source: str, reason: str) -> None:
        self.dropped.labels(source, reason).inc()

    def count_ingest_queue(self, depth: Callable[[str], int]) -> None:
        """Read the queue's depth per lane from `depth` at every scrape."""
        for lane in LANES:
            self.ingest_queue_depth.labels(lane).set_function(_depth_of(depth, lane))

    def batch_committed(self, size: int) -> None:
        self.batch_size.observe(size)

    def store_committed(self, seconds: float) -> None:
        self.commit_seconds.observe(seconds)

    def ingest_stream_read(self, count: int) -> None:
        """`count` deliveries of an IngestEvents stream were read (positive) or answered."""
        self.ingest_stream_in_flight.inc(count)

    def revision_committed(self, revision: int) -> None:
        self.head_revision.set(revision)

    # -- watch -------------------------------------------------------------------------------------

    def count_watch_streams(self, count: Callable[[], Mapping[str, int]]) -> None:
        """Read the number of open watch streams by kind from `count` at every scrape."""
        self.watch_streams.set_function(lambda: sum(count().values()))
        for kind in WATCH_KINDS:
            self.watches.labels(kind).set_function(_count_of(count, kind))

    def watch_sent(self, lag_seconds: float) -> None:
        self.watch_lag.observe(max(lag_seconds, 0.0))

    def watch_overflowed(self) -> None:
        self.watch_overflows.inc()

    def watch_caught_up(self) -> None:
        self.watch_catch_ups.inc()

    # -- Junction's API ----------------------------------------------------------------------------

    def reconciled(self, trigger: str, outcome: str) -> None:
        self.reconciles.labels(trigger, outcome).inc()

    def results_fetched(self, outcome: str) -> None:
        self.results_fetches.labels(outcome).inc()

    def junction_answered(self, endpoint: str, outcome: str, seconds: float) -> None:
        self.junction_requests.labels(endpoint, outcome).inc()
        self.junction_seconds.labels(endpoint).observe(seconds)

    # -- webhooks ----------------------------------------------------------------------------------

    def webhook_refused(self, reason: str) -> None:
        self.webhooks_refused.labels(reason).inc()

    # -- the HTTP listener's limits ----------------------------------------------------------------

    def count_http_connections(self, count: Callable[[], int]) -> None:
        self.http_connections.set_function(count)

    def http_shed_one(self, what: str) -> None:
        self.http_shed.labels(what).inc()

    def http_closed_one(self, reason: str) -> None:
        self.http_closed.labels(reason).inc()

    # -- exposition --------------------------------------------------------------------------------

    content_type = CONTENT_TYPE_LATEST

    def exposition(self) -> bytes:
        """Everything, in the Prometheus text format."""
        return generate_latest(self.registry)


def _count_of(count: Callable[[], Mapping[str, int]], kind: str) -> Callable[[], float]:
    return lambda: count().get(kind, 0)


def _depth_of(depth: Callable[[str], int], lane: str) -> Callable[[], float]:
    return lambda: depth(lane)


_GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")
# The histogram's upper bounds, +Inf last, and as the exposition writes them.
_GRPC_BOUNDS = (*GRPC_BUCKETS, math.inf)
_GRPC_LE = tuple(floatToGoString(bound) for bound in _GRPC_BOUNDS)  # type: ignore[no-untyped-call]


class GrpcMethodMetrics:
    """One gRPC method's started / handled / handling-time counts: plain numbers, which
    `GrpcCalls` turns into the metrics at each scrape. prometheus-client's children take a lock
    and check their labels at every increment; here a call costs three additions (measured on
    GetTransaction, the metrics were about 40% of what request ids, metrics and access lines
    cost a call)."""

    __slots__ = ("buckets", "handled_by_code", "labels", "seconds", "started_count")

    def __init__(self, grpc_type: str, service: str, method: str) -> None:
        self.labels = (grpc_type, service, method)
        self.started_count = 0
        # Every method shows up at 0 before its first call.
        self.handled_by_code: dict[str, int] = {"OK": 0}
        self.buckets = [0] * len(_GRPC_BOUNDS)
        self.seconds = 0.0

    def started(self) -> None:
        self.started_count += 1

    def handled(self, code: str, seconds: float) -> None:
        counts = self.handled_by_code
        counts[code] = counts.get(code, 0) + 1
        # The first bucket whose bound is at least `seconds`, as prometheus-client counts.
        self.buckets[bisect.bisect_left(_GRPC_BOUNDS, seconds)] += 1
        self.seconds += seconds


class GrpcCalls(Collector):
    """The per-call gRPC metrics (go-grpc-prometheus's names), from each method's counts."""

    def __init__(self) -> None:
        self.methods: dict[tuple[str, str, str], GrpcMethodMetrics] = {}
        self.declared = [
            Declared("grpc_server_started_total", "counter", _GRPC_LABELS, _STARTED_DOC),
            Declared(
                "grpc_server_handled_total", "counter", (*_GRPC_LABELS, "grpc_code"), _HANDLED_DOC
            ),
            Declared("grpc_server_handling_seconds", "histogram", _GRPC_LABELS, _SECONDS_DOC),
        ]

    def method(self, grpc_type: str, service: str, method: str) -> GrpcMethodMetrics:
        key = (grpc_type, service, method)
        found = self.methods.get(key)
        if found is None:
            found = self.methods[key] = GrpcMethodMetrics(grpc_type, service, method)
        return found

    def collect(self) -> Iterator[Metric]:
        started = CounterMetricFamily("grpc_server_started", _STARTED_DOC, labels=_GRPC_LABELS)
        handled = CounterMetricFamily(
            "grpc_server_handled", _HANDLED_DOC, labels=(*_GRPC_LABELS, "grpc_code")
        )
        seconds = HistogramMetricFamily(
            "grpc_server_handling_seconds", _SECONDS_DOC, labels=_GRPC_LABELS
        )
        for one in list(self.methods.values()):
            labels = list(one.labels)
            started.add_metric(labels, one.started_count)
            for code, count in list(one.handled_by_code.items()):
                handled.add_metric([*labels, code], count)
            cumulative = list(itertools.accumulate(one.buckets))
            seconds.add_metric(labels, list(zip(_GRPC_LE, cumulative, strict=True)), one.seconds)
        yield started
        yield handled
        yield seconds


def metrics_table() -> str:
    """The metrics table of docs/observability.md, in Markdown."""
    lines = ["| metric | type | labels | what |", "|---|---|---|---|"]
    for metric in (*Metrics().declared, *COLLECTED):
        labels = ", ".join(f"`{label}`" for label in metric.labels) or "-"
        lines.append(f"| `{metric.name}` | {metric.kind} | {labels} | {metric.documentation} |")
    return "\n".join(lines)
