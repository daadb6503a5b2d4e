"""Watching the change log: fan-out of committed changes, replay from the log, resume by revision.

No gRPC here; the servicer adapts `ChangeHub.watch()` to a stream.

How a watch misses nothing and repeats nothing (the etcd / Kubernetes pattern):

1. Subscribe to live changes *first*, then read what is already committed (the current state, or
   the change log after `start_revision`). A change committed before the subscription is in the
   store; one committed after it is published to the subscription. Changes reach subscribers only
   after their commit, in revision order.
2. Remember the last revision sent and drop anything at or below it, so the overlap between the
   replay and the live queue is sent once.

Slow subscribers: each subscription buffers at most `queue_size` changes. Publishing never waits:
if a subscriber's buffer is full, the buffer is emptied and the subscriber marked behind; it then
catches up by reading the change log from the last revision it sent (the log is durable, so nothing
is lost), and goes back to live changes. Memory per subscriber stays bounded, and one slow reader
costs the others nothing. Only if the log has been trimmed past its position does its stream end
(`Compacted`), naming the last revision it was sent so that it can re-read and resume.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from transaction_service.domain.state import ChangeKind
from transaction_service.errors import OutOfRange, Unavailable
from transaction_service.metrics import Metrics
from transaction_service.store.base import ChangeRecord, Store, TransactionSnapshot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WatchFilter:
    """Which changes a watcher wants. Empty fields match everything."""

    transaction_id: str = ""
    # Changes of whichever transaction lists this order (it may move from a legacy stand-in).
    order_id: str = ""
    kinds: frozenset[ChangeKind] = frozenset()
    team_id: str = ""

    def matches(self, change: ChangeRecord) -> bool:
        if self.transaction_id and change.transaction_id != self.transaction_id:
            return False
        if self.order_id and not any(o.id == self.order_id for o in change.view.orders):
            return False
        if self.kinds and self.kinds.isdisjoint(change.kinds):
            return False
        return not (self.team_id and change.view.team_id != self.team_id)


@dataclass(frozen=True)
class Progress:
    """Every matching change up to `revision` has been sent."""

    revision: int


@dataclass(frozen=True)
class Current:
    """A transaction's state when the watch opened, read at head revision `revision`."""

    snapshot: TransactionSnapshot
    revision: int


WatchEvent = ChangeRecord | Progress | Current


class Compacted(OutOfRange):
    """The change log no longer holds the changes after `last_sent_revision`."""

    def __init__(self, compacted_revision: int, last_sent_revision: int) -> None:
        super().__init__(
            f"changes up to revision {compacted_revision} have been compacted; this watch needs "
            f"those after revision {last_sent_revision}. Re-read the state and watch from its "
            "revision.",
            reason="REVISION_COMPACTED",
            metadata={
                "compacted_revision": str(compacted_revision),
                "last_sent_revision": str(last_sent_revision),
            },
        )
        self.compacted_revision = compacted_revision
        self.last_sent_revision = last_sent_revision


class WatchClosed(Unavailable):
    """The server is shutting down; resume from `last_sent_revision` elsewhere or later."""

    def __init__(self, last_sent_revision: int) -> None:
        super().__init__(
            f"the server is shutting down; resume with start_revision={last_sent_revision}",
            reason="SHUTTING_DOWN",
            metadata={"last_sent_revision": str(last_sent_revision)},
        )
        self.last_sent_revision = last_sent_revision


@dataclass(eq=False)
class Subscription:
    where: WatchFilter
    limit: int
    queue: collections.deque[ChangeRecord] = field(default_factory=collections.deque)
    # Set when the buffer overflowed and was dropped: catch up from the change log.
    behind: bool = False
    overflows: int = 0
    closed: bool = False
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    on_overflow: Callable[[], None] = lambda: None

    def offer(self, change: ChangeRecord) -> None:
        if len(self.queue) >= self.limit:
            self.queue.clear()
            self.behind = True
            self.overflows += 1
            self.on_overflow()
        else:
            self.queue.append(change)
        self.wakeup.set()

    async def wait(self, idle_seconds: float) -> None:
        """Return when there is something to do, or after `idle_seconds`."""
        if self.queue or self.behind or self.closed:
            return
        self.wakeup.clear()
        try:
            async with asyncio.timeout(idle_seconds):
                await self.wakeup.wait()
        except TimeoutError:
            pass


class ChangeHub:
    """Fans committed changes out to watchers; replays the change log for them."""

    def __init__(
        self,
        store: Store,
        *,
        queue_size: int = 1024,
        page_size: int = 500,
        progress_interval: float = 10.0,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics if metrics is not None else Metrics()
        self._store = store
        self._queue_size = queue_size
        self._page_size = page_size
        self._progress_interval = progress_interval
        self._subscriptions: set[Subscription] = set()
        self._closed = False
        # The newest revision published; every change up to it has been offered to every
        # subscriber that existed when it was published.
        self.published_revision = 0

    @property
    def subscriber_count(self) -> int:
        return len(self._subscriptions)

    def subscriptions(self) -> list[Subscription]:
        return list(self._subscriptions)

    def publish(self, changes: Sequence[ChangeRecord]) -> None:
        """Offer committed changes, in revision order, to every matching subscriber. Never waits."""
        for change in changes:
            for sub in self._subscriptions:
                if sub.where.matches(change):
                    sub.offer(change)
            self.published_revision = max(self.published_revision, change.revision)

    def close(self) -> None:
        """End every watch (WatchClosed) and refuse new ones; for shutdown."""
        self._closed = True
        for sub in self._subscriptions:
            sub.closed = True
            sub.wakeup.set()

    async def watch(
        self,
        where: WatchFilter,
        start_revision: int | None,
        *,
        current: Callable[[], Awaitable[tuple[TransactionSnapshot | None, int]]] | None = None,
    ) -> AsyncIterator[WatchEvent]:
        """Matching changes, in revision order, each once.

        Without `start_revision` the watch starts now. Its first event is `Current` for a single
        transaction (given `current`, which reads it), or `Progress` at the head revision for the
        feed or a transaction not known yet. With `start_revision`, changes after it are replayed
        from the change log first; 0 means from the oldest change kept, and any other revision
        older than the log raises `Compacted`.
        """
        if self._closed:
            raise WatchClosed(start_revision or 0)
        sub = Subscription(where, self._queue_size, on_overflow=self._metrics.watch_overflowed)
        self._subscriptions.add(sub)
        try:
            if start_revision is None:
                if current is not None:
                    snapshot, last = await current()
                    # A transaction not seen yet has no state to show: say how far we are.
                    yield Current(snapshot, last) if snapshot else Progress(last)
                else:
                    last = await self._store.head_revision()
                    yield Progress(last)
                replay_needed, lenient = False, False
            else:
                last, replay_needed, lenient = start_revision, True, start_revision == 0
            while True:
                if sub.closed:
                    raise WatchClosed(last)
                if replay_needed or sub.behind:
                    if sub.behind:
                        self._metrics.watch_caught_up()
                    sub.behind = False
                    async for change in self._replay(where, last, lenient):
                        yield change
                        last = change.revision
                    replay_needed = lenient = False
                    continue
                if not sub.queue:
                    await sub.wait(self._progress_interval)
                    if not (sub.queue or sub.behind or sub.closed):
                        yield Progress(max(last, self.published_revision))
                    continue
                change = sub.queue.popleft()
                if change.revision > last:
                    yield change
                    last = change.revision
        finally:
            self._subscriptions.discard(sub)

    async def _replay(
        self, where: WatchFilter, after: int, lenient: bool
    ) -> AsyncIterator[ChangeRecord]:
        """Matching changes with revision > after, from the change log, up to its current end."""
        ids: tuple[str, ...] = ()
        if where.transaction_id:
            ids = (where.transaction_id,)
        elif where.order_id:
            # The order's changes are under its legacy stand-in id (the order id) and under the
            # transaction it belongs to now.
            snapshot, _ = await self._store.get_by_order(where.order_id)
            ids = (where.order_id, snapshot.view.id) if snapshot else (where.order_id,)
        cursor = after
        while True:
            page = await self._store.changes_after(cursor, self._page_size, ids)
            if cursor < page.compacted_revision:
                if not lenient:
                    raise Compacted(page.compacted_revision, after)
                # From the oldest kept: read on from the compaction point.
                cursor, lenient = page.compacted_revision, False
                continue
            lenient = False
            for change in page.changes:
                cursor = change.revision
                if where.matches(change):
                    yield change
                    after = change.revision
            if len(page.changes) < self._page_size:
                return
