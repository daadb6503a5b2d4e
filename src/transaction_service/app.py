"""The composition root: `App` builds the store, the ingest use case, the watch hub and the
background tasks from the settings, and starts and stops them in the right order.

The listeners (gRPC in `server.py`, HTTP later) and the CLI take an `App`; none of them builds a
piece of it on their own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta

from transaction_service.config import Settings
from transaction_service.domain.payload import OrderEvent
from transaction_service.errors import AlreadyExists, Unavailable
from transaction_service.ingest import Delivery, Ingestor, IngestResult
from transaction_service.metrics import Metrics
from transaction_service.store.base import ChangeRecord, Store
from transaction_service.store.sqlite import SqliteStore
from transaction_service.watch import ChangeHub

log = logging.getLogger(__name__)
# One line per ingested event, whichever transport it came by.
event_log = logging.getLogger("transaction_service.events")


class StartupError(Exception):
    """A mistake that stops the service from starting; its message is one line for the operator."""


def open_store(settings: Settings) -> Store:
    return SqliteStore(settings.db, synchronous=settings.sqlite_synchronous)


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
            metrics=self.metrics,
        )
        self.ingestor = Ingestor(
            self.store,
            max_batch=settings.max_batch,
            on_changes=self._changes_committed,
            metrics=self.metrics,
        )
        self.metrics.count_watch_streams(lambda: self.hub.subscriber_count)
        # Background loops; each catches and logs its own failures and keeps going.
        self._loops: list[asyncio.Task[None]] = []
        self.started = False
        self.stopping = False

    async def start(self) -> None:
        await self.store.open()
        self.metrics.revision_committed(await self.store.head_revision())
        self.ingestor.start()
        self._background(self._trim_changes, "change-log-trimmer")
        self.started = True

    async def ingest(self, delivery: Delivery, *, source: str) -> IngestResult:
        """Ingest a decoded delivery (`source`: "grpc" or "webhook"); answered after the commit.

        What both transports call: the ingestor's use case, counted and logged once here.
        """
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
        self.hub.publish(changes)
        self.metrics.revision_committed(max(change.revision for change in changes))

    def _background(self, loop: Callable[[], Awaitable[None]], name: str) -> None:
        self._loops.append(asyncio.create_task(loop(), name=name))

    @property
    def ready(self) -> bool:
        """Taking traffic: started and not shutting down."""
        return self.started and not self.stopping

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
        await self.store.close()

    async def _trim_changes(self) -> None:
        retention = timedelta(seconds=self.settings.change_retention_seconds)
        while True:
            try:
                compacted = await self.store.trim_changes(datetime.now(UTC) - retention)
                log.debug("change log compacted through revision %d", compacted)
            except Exception:
                log.exception("trimming the change log failed; will retry")
            await asyncio.sleep(self.settings.change_trim_interval_seconds)
