"""The composition root: `App` builds the store, the ingest use case, the watch hub and the
background tasks from the settings, and starts and stops them in the right order.

The listeners (gRPC in `server.py`, HTTP later) and the CLI take an `App`; none of them builds a
piece of it on their own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta

from transaction_service.config import Settings
from transaction_service.domain.limits import StateLimits
from transaction_service.domain.payload import OrderEvent
from transaction_service.errors import AlreadyExists, Unavailable
from transaction_service.junction.client import JunctionClient, junction_base_url
from transaction_service.metrics import Metrics
from transaction_service.store.base import ChangeRecord, Store, StoreOpenError
from transaction_service.store.sqlite import SqliteStore
from transaction_service.usecases.ingest import Delivery, Ingestor, IngestResult
from transaction_service.usecases.plan import RESULTS_KINDS
from transaction_service.usecases.reconcile import Reconciler
from transaction_service.usecases.results import ResultsFetcher
from transaction_service.usecases.watch import ChangeFeed, ChangeHub

log = logging.getLogger(__name__)
# One line per ingested event, whichever transport it came by.
event_log = logging.getLogger("transaction_service.events")

STORE_PROBE_SECONDS = 2.0


class StartupError(Exception):
    """A mistake that stops the service from starting; its message is one line for the operator."""


def open_store(settings: Settings) -> Store:
    """The store `--db` names: a PostgreSQL URL, or a SQLite file path or URL."""
    if settings.db.startswith(("postgresql://", "postgres://")):
        from transaction_service.store.postgres import PostgresStore

        return PostgresStore(settings.db, pool_size=settings.db_pool_size)
    try:
        return SqliteStore(settings.db, synchronous=settings.sqlite_synchronous)
    except ValueError as exc:
        raise StartupError(str(exc)) from None


def junction_client(settings: Settings) -> JunctionClient | None:
    """The client of Junction's API the settings describe; None without an API key."""
    if not settings.junction_api_key:
        return None
    base_url = junction_base_url(
        settings.junction_region,
        settings.junction_environment,
        explicit=settings.junction_base_url or None,
    )
    return JunctionClient(
        base_url=base_url,
        api_key=settings.junction_api_key,
        timeout=settings.junction_timeout_seconds,
        max_concurrency=settings.junction_max_concurrency,
    )


class App:
    """Everything the service is, but the listeners."""

    def __init__(self, settings: Settings, store: Store | None = None) -> None:
        self.settings = settings
        self.store = store if store is not None else open_store(settings)
        self.metrics = Metrics()
        self.hub = ChangeHub(
            self.store,
            queue_size=settings.watch_queue_size,
            progress_interval=settings.watch_progress_seconds,
            batch_interval=settings.watch_batch_interval_seconds,
            metrics=self.metrics,
        )
        self.limits = StateLimits(
            max_string_length=settings.max_string_length,
            max_orders_per_transaction=settings.max_orders_per_transaction,
            max_view_bytes=settings.max_view_bytes,
        )
        self.feed = ChangeFeed(self.store, self.hub, shared=self.store.shared)
        # Junction's API, when an API key is configured: reconcile, sweep, combined results.
        self.junction = junction_client(settings)
        self.ingestor = Ingestor(
            self.store,
            max_batch=settings.max_batch,
            limits=self.limits,
            on_changes=self._changes_committed,
            metrics=self.metrics,
            want_results=self.junction is not None,
        )
        self.results = (
            ResultsFetcher(
                self.store,
                self.junction,
                on_changes=self._changes_committed,
                retention=timedelta(seconds=settings.body_retention_seconds),
                metrics=self.metrics,
            )
            if self.junction is not None
            else None
        )
        self.reconciler = Reconciler(
            self.store,
            self.junction,
            ingest=functools.partial(self.ingest, source="api"),
            max_body_bytes=settings.max_body_bytes,
            limits=self.limits,
            concurrency=settings.junction_max_concurrency,
            metrics=self.metrics,
            results_wanted=self.results.wake if self.results is not None else lambda: None,
        )
        self.metrics.count_watch_streams(lambda: self.hub.subscriber_count)
        # Background loops; each catches and logs its own failures and keeps going.
        self._loops: list[asyncio.Task[None]] = []
        self.started = False
        self.stopping = False

    async def start(self) -> None:
        try:
            await self.store.open()
        except StoreOpenError as exc:
            raise StartupError(str(exc)) from None
        await self.feed.start()
        self.metrics.revision_committed(self.feed.published)
        self.ingestor.start()
        self._background(self.feed.run, "change-feed")
        self._background(self._housekeeping, "housekeeping")
        self._background(self._probe_store, "store-probe")
        if self.results is not None:
            self._background(self.results.run, "results-fetcher")
        if self.settings.reconcile_interval_seconds:
            self._background(self._sweep, "reconcile-sweep")
        self._log_junction()
        self.started = True

    def _log_junction(self) -> None:
        if self.junction is None:
            log.info(
                "junction api: not configured (no TRANSACTION_SERVICE_JUNCTION_API_KEY): no "
                "reconcile, sweep or combined results"
            )
            return
        interval = self.settings.reconcile_interval_seconds
        sweep = (
            f"sweep every {interval:g} s of transactions silent for "
            f"{self.settings.reconcile_after_seconds:g} s"
            if interval
            else "no sweep"
        )
        log.info(
            "junction api: %s; combined results fetched on completion; %s",
            self.junction.base_url,
            sweep,
        )

    async def ingest(self, delivery: Delivery, *, source: str) -> IngestResult:
        """Ingest a decoded delivery (`source`: "grpc", "webhook" or "api"); answered after the
        commit.

        What both transports call: the ingestor's use case, counted and logged once here.
        """
        if delivery.source != source:
            delivery = dataclasses.replace(delivery, source=source)
        started = time.perf_counter()
        try:
            result = await self.ingestor.ingest(delivery)
        except AlreadyExists:
            self.metrics.ingest_refused(source, "conflict")
            raise
        except Unavailable:
            self.metrics.ingest_refused(source, "unavailable")
            raise
        seconds = time.perf_counter() - started
        self.metrics.ingested(source, result.outcome.value, seconds)
        event = delivery.event
        fields = {
            "event_id": result.event_id,
            "order_id": event.order.id if isinstance(event, OrderEvent) else None,
            "transaction_id": result.transaction.view.id if result.transaction else None,
            "outcome": result.outcome.value,
            "revision": result.revision,
            "source": source,
            "ms": round(seconds * 1000, 2),
        }
        event_log.info("ingested", extra={"fields": fields})
        return result

    def _changes_committed(self, changes: Sequence[ChangeRecord]) -> None:
        self.feed.committed(changes)
        self.metrics.revision_committed(max(change.revision for change in changes))
        if self.results is not None and any(RESULTS_KINDS.intersection(c.kinds) for c in changes):
            self.results.wake()  # its results marker was committed with the change

    def _background(self, loop: Callable[[], Awaitable[None]], name: str) -> None:
        self._loops.append(asyncio.create_task(loop(), name=name))

    @property
    def ready(self) -> bool:
        """Taking traffic: started, not shutting down, and the store can write."""
        return self.started and not self.stopping and self.store.health.healthy

    def begin_shutdown(self) -> None:
        """Refuse new work: end every watch stream, each with the revision to resume from."""
        self.stopping = True
        self.hub.close()

    async def stop(self) -> None:
        """After the listeners drained: commit what is queued, stop background tasks, close."""
        self.begin_shutdown()
        await self.ingestor.stop()
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops.clear()
        if self.junction is not None:
            await self.junction.aclose()
        await self.store.close()

    async def _probe_store(self) -> None:
        # A store that cannot write reports NOT_SERVING, so balancers send no more traffic, and
        # without traffic nothing would notice the fault is fixed: try a tiny write now and then.
        while True:
            await asyncio.sleep(STORE_PROBE_SECONDS)
            if not self.store.health.healthy:
                await self.store.probe()

    async def _housekeeping(self) -> None:
        """Trim the change log and erase expired bodies, now and then."""
        changes = timedelta(seconds=self.settings.change_retention_seconds)
        bodies = timedelta(seconds=self.settings.body_retention_seconds)
        while True:
            now = datetime.now(UTC)
            try:
                compacted = await self.store.trim_changes(now - changes)
                log.debug("change log compacted through revision %d", compacted)
                if erased := await self.store.erase_bodies(now - bodies):
                    log.info("erased %d webhook bodies older than the body retention", erased)
                if erased := await self.store.erase_results(now - bodies):
                    log.info("erased %d combined results older than the body retention", erased)
            except Exception:
                log.exception("housekeeping failed; will retry")
            await asyncio.sleep(self.settings.change_trim_interval_seconds)

    async def _sweep(self) -> None:
        """Reconcile silent ACTIVE transactions now and then; one replica at a time (the others
        find the job lock taken and skip their turn)."""
        silence = timedelta(seconds=self.settings.reconcile_after_seconds)
        while True:
            try:
                async with self.store.exclusive("reconcile-sweep") as mine:
                    if mine:
                        report = await self.reconciler.sweep(datetime.now(UTC) - silence)
                        if report.checked or report.failed or report.interrupted:
                            log.info(
                                "sweep: %d silent transaction(s) reconciled, %d changed, "
                                "%d failed%s",
                                report.checked,
                                report.changed,
                                report.failed,
                                "; stopped early: Junction is unavailable"
                                if report.interrupted
                                else "",
                            )
            except Exception:
                log.exception("the reconcile sweep failed; will retry")
            await asyncio.sleep(self.settings.reconcile_interval_seconds)
