"""The composition root: `App` builds the store, the commit path, the use cases, the watch hub
and the background tasks from the settings, and starts and stops them in the right order. It only
wires: what each piece does lives in `usecases/`.

The listeners (`server.py`: gRPC and HTTP) take an `App`; none of them builds a piece of it on
their own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from datetime import timedelta
from typing import Any

from transaction_service.config import Settings
from transaction_service.domain.limits import StateLimits
from transaction_service.junction.client import JunctionClient, junction_base_url
from transaction_service.metrics import Metrics
from transaction_service.store import open_store
from transaction_service.store.base import Store, StoreOpenError
from transaction_service.usecases.commit import CommitPath
from transaction_service.usecases.housekeeping import housekeeping_forever, probe_store_forever
from transaction_service.usecases.ingest import Ingestor
from transaction_service.usecases.reconcile import Reconciler
from transaction_service.usecases.results import PdfBudget, ResultsFetcher
from transaction_service.usecases.watch import ChangeFeed, ChangeHub

log = logging.getLogger(__name__)


class StartupError(Exception):
    """A mistake that stops the service from starting; its message is one line for the operator."""


def junction_client(settings: Settings, metrics: Metrics | None = None) -> JunctionClient | None:
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
        interactive_concurrency=settings.results_pdf_max_calls,
        metrics=metrics,
    )


class App:
    """Everything the service is, but the listeners."""

    def __init__(self, settings: Settings, store: Store | None = None) -> None:
        self.settings = settings
        if store is None:
            try:
                store = open_store(settings)
            except StoreOpenError as exc:
                raise StartupError(str(exc)) from None
        self.store = store
        self.metrics = Metrics()
        self.hub = ChangeHub(
            self.store,
            queue_size=settings.watch_queue_size,
            progress_interval=settings.watch_progress_seconds,
            batch_interval=settings.watch_batch_interval_seconds,
            messages_per_second=settings.watch_messages_per_second,
            metrics=self.metrics,
        )
        self.limits = StateLimits(
            max_string_length=settings.max_string_length,
            max_orders_per_transaction=settings.max_orders_per_transaction,
            max_view_bytes=settings.max_view_bytes,
        )
        self.feed = ChangeFeed(self.store, self.hub, shared=self.store.shared)
        # Every write goes through it; it publishes what was committed to the feed.
        self.commits = CommitPath(self.store, publish=self.feed.committed, metrics=self.metrics)
        # Junction's API, when an API key is configured: reconcile, sweep, combined results.
        self.junction = junction_client(settings, self.metrics)
        # GetTransactionResultsPdf's own budget of Junction's API (usecases/results.py).
        self.pdf_budget = PdfBudget(
            settings.results_pdf_max_calls, settings.results_pdf_calls_per_minute
        )
        self.ingestor = Ingestor(
            self.commits,
            max_batch=settings.max_batch,
            limits=self.limits,
            metrics=self.metrics,
            want_results=self.junction is not None,
            queue_limit=settings.ingest_queue_limit,
            queue_bytes=settings.ingest_queue_bytes,
            log_events=settings.log_events,
        )
        self.results = (
            ResultsFetcher(
                self.store,
                self.commits,
                self.junction,
                retention=timedelta(seconds=settings.body_retention_seconds),
                metrics=self.metrics,
            )
            if self.junction is not None
            else None
        )
        self.reconciler = Reconciler(
            self.store,
            self.commits,
            self.junction,
            ingest=self.ingestor.ingest,
            max_body_bytes=settings.max_body_bytes,
            limits=self.limits,
            concurrency=settings.junction_max_concurrency,
            metrics=self.metrics,
        )
        self.metrics.count_watch_streams(self.hub.count_by_kind)
        # Background loops; each catches and logs its own failures and keeps going.
        self._loops: list[asyncio.Task[None]] = []
        self.started = False
        self.stopping = False
        # Called once when shutdown begins (begin_shutdown): long calls end themselves then.
        self.on_shutdown: list[Callable[[], None]] = []

    async def start(self) -> None:
        settings = self.settings
        try:
            await self.store.open()
        except StoreOpenError as exc:
            raise StartupError(str(exc)) from None
        await self.feed.start()
        self.metrics.revision_committed(self.feed.published)
        self.ingestor.start()
        self._background(self.feed.run(), "change-feed")
        self._background(
            housekeeping_forever(
                self.store,
                change_retention=timedelta(seconds=settings.change_retention_seconds),
                body_retention=timedelta(seconds=settings.body_retention_seconds),
                interval=settings.change_trim_interval_seconds,
            ),
            "housekeeping",
        )
        self._background(probe_store_forever(self.store), "store-probe")
        if self.results is not None:
            self._background(self.results.run(), "results-fetcher")
        if settings.reconcile_interval_seconds:
            self._background(
                self.reconciler.sweep_forever(
                    interval=settings.reconcile_interval_seconds,
                    silence=timedelta(seconds=settings.reconcile_after_seconds),
                ),
                "reconcile-sweep",
            )
        self.started = True

    def _background(self, loop: Coroutine[Any, Any, None], name: str) -> None:
        self._loops.append(asyncio.create_task(loop, name=name))

    @property
    def ready(self) -> bool:
        """Taking traffic: started, not shutting down, and the store can write."""
        return self.started and not self.stopping and self.store.health.healthy

    def begin_shutdown(self) -> None:
        """Refuse new work: end every watch stream, each with the revision to resume from."""
        began, self.stopping = not self.stopping, True
        self.hub.close()
        if began:
            for callback in self.on_shutdown:
                callback()

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
