"""Prometheus metrics: every metric object of the service, and the small functions that count.

Each `App` owns one `Metrics`, with a registry of its own (not prometheus-client's global one),
so several servers in one process (tests, benchmarks) count separately. The ingest and watch code
call the methods below; `GET /metrics` serves `exposition()`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

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


class Metrics:
    """The service's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.events = Counter(
            f"{PREFIX}_events",
            "Deliveries ingested, by where they came from and what became of them.",
            ["source", "outcome"],
            registry=registry,
        )
        self.ingest_seconds = Histogram(
            f"{PREFIX}_ingest_seconds",
            "Time from handing a decoded delivery to the ingestor until its commit was answered.",
            ["source"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            f"{PREFIX}_commit_batch_size",
            "Deliveries committed together in one database transaction (group commit).",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.dropped = Counter(
            f"{PREFIX}_ingest_dropped",
            "Deliveries dropped before their commit (never acknowledged, nothing stored), by "
            "source and reason: deadline (the caller's deadline passed) or caller_gone.",
            ["source", "reason"],
            registry=registry,
        )
        self.ingest_queue_depth = Gauge(
            f"{PREFIX}_ingest_queue_depth",
            "Deliveries waiting for a commit, by lane (webhook, unary, stream).",
            ["lane"],
            registry=registry,
        )
        self.watch_streams = Gauge(
            f"{PREFIX}_watch_streams", "Watch streams open now.", registry=registry
        )
        self.watch_overflows = Counter(
            f"{PREFIX}_watch_overflows",
            "Times a slow watcher's buffer was full and dropped (it then reads the change log).",
            registry=registry,
        )
        self.watch_catch_ups = Counter(
            f"{PREFIX}_watch_catch_ups",
            "Times a watcher that had fallen behind caught up by reading the change log.",
            registry=registry,
        )
        self.ingest_stream_in_flight = Gauge(
            f"{PREFIX}_ingest_stream_requests_in_flight",
            "Deliveries read from IngestEvents streams and not yet answered (a request of "
            "several counts each; bounded per stream by the ingest stream window).",
            registry=registry,
        )
        self.head_revision = Gauge(
            f"{PREFIX}_head_revision",
            "The newest revision committed to the change log.",
            registry=registry,
        )
        self.webhooks_refused = Counter(
            f"{PREFIX}_webhooks_refused",
            "Webhook requests answered with an error, by reason (e.g. bad_signature).",
            ["reason"],
            registry=registry,
        )
        self.http_connections = Gauge(
            f"{PREFIX}_http_connections", "HTTP connections open now.", registry=registry
        )
        self.http_shed = Counter(
            f"{PREFIX}_http_shed",
            "HTTP work refused because a limit was reached: a new connection past "
            "http_max_connections, a webhook body past http_max_body_reads.",
            ["what"],
            registry=registry,
        )
        self.http_closed = Counter(
            f"{PREFIX}_http_closed",
            "HTTP connections the server closed because the client was too slow or sent too "
            "much, by reason (idle_timeout, head_timeout, head_too_large, body_timeout).",
            ["reason"],
            registry=registry,
        )
        self.reconciles = Counter(
            f"{PREFIX}_reconciles",
            "Transactions reconciled with Junction's API, by trigger (rpc, sweep, backfill) and "
            "outcome (changed, unchanged, failed).",
            ["trigger", "outcome"],
            registry=registry,
        )
        self.results_fetches = Counter(
            f"{PREFIX}_results_fetches",
            "Fetches of combined results from Junction's API, by outcome (ready: new results "
            "reported; unchanged; partial; failed: retried later; gave_up).",
            ["outcome"],
            registry=registry,
        )
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

    # -- ingest ------------------------------------------------------------------------------------

    def ingested(self, source: str, outcome: str, seconds: float) -> None:
        self.events.labels(source, outcome).inc()
        self.ingest_seconds.labels(source).observe(seconds)

    def ingest_refused(self, source: str, outcome: str) -> None:
        """A decoded delivery the ingestor refused (`conflict`, `unavailable`)."""
        self.events.labels(source, outcome).inc()

    def ingest_dropped(self, source: str, reason: str) -> None:
        self.dropped.labels(source, reason).inc()

    def count_ingest_queue(self, depth: Callable[[str], int]) -> None:
        """Read the queue's depth per lane from `depth` at every scrape."""
        for lane in LANES:
            self.ingest_queue_depth.labels(lane).set_function(partial(depth, lane))

    def batch_committed(self, size: int) -> None:
        self.batch_size.observe(size)

    def ingest_stream_read(self, count: int) -> None:
        """`count` deliveries of an IngestEvents stream were read (positive) or answered."""
        self.ingest_stream_in_flight.inc(count)

    def revision_committed(self, revision: int) -> None:
        self.head_revision.set(revision)

    # -- watch -------------------------------------------------------------------------------------

    def count_watch_streams(self, count: Callable[[], int]) -> None:
        """Read the number of open watch streams from `count` at every scrape."""
        self.watch_streams.set_function(count)

    def watch_overflowed(self) -> None:
        self.watch_overflows.inc()

    def watch_caught_up(self) -> None:
        self.watch_catch_ups.inc()

    # -- Junction's API ----------------------------------------------------------------------------

    def reconciled(self, trigger: str, outcome: str) -> None:
        self.reconciles.labels(trigger, outcome).inc()

    def results_fetched(self, outcome: str) -> None:
        self.results_fetches.labels(outcome).inc()

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
