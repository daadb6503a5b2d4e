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
import contextlib
import logging
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from transaction_service.domain.state import ChangeKind
from transaction_service.errors import OutOfRange, Reason, Unavailable
from transaction_service.metrics import Metrics
from transaction_service.store.base import (
    ChangeLog,
    ChangeRecord,
    TransactionReads,
    TransactionSnapshot,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WatchFilter:
    """Which changes a watcher wants. Empty fields match everything.

    A single-transaction watch names a key: a transaction id or an order id. Either way it gets
    the changes of the transaction with that id and of any transaction that lists an order with
    that id. Order ids and transaction ids never collide, and a legacy stand-in transaction's id
    is its order's id, so this one rule follows an order wherever it lives, and follows a
    stand-in watched by its transaction id into the real transaction it is folded into.
    """

    transaction_id: str = ""
    order_id: str = ""
    kinds: frozenset[ChangeKind] = frozenset()
    team_id: str = ""

    @property
    def key(self) -> str:
        return self.transaction_id or self.order_id

    def select(self, change: ChangeRecord) -> ChangeRecord | None:
        """The change as this watcher is to see it, or None if it is not for this watcher."""
        key = self.key
        if key:
            if change.transaction_id != key and not any(o.id == key for o in change.view.orders):
                return None
            # The change folds the watched stand-in into its real transaction: the stand-in's
            # watcher was told the "reported once" kinds it already had; do not tell it again.
            already = dict(change.merged).get(key)
            if already:
                kinds = tuple(k for k in change.kinds if k not in already)
                change = msgspec.structs.replace(change, kinds=kinds)
        if self.kinds and self.kinds.isdisjoint(change.kinds):
            return None
        if self.team_id and change.view.team_id != self.team_id:
            return None
        return change

    def matches(self, change: ChangeRecord) -> bool:
        return self.select(change) is not None


@dataclass(frozen=True)
class Progress:
    """Every matching change up to `revision` has been sent."""

    revision: int


@dataclass(frozen=True)
class Current:
    """A transaction's state when the watch opened, read at head revision `revision`."""

    snapshot: TransactionSnapshot
    revision: int


@dataclass(frozen=True)
class Batch:
    """Several changes for one watcher, in revision order (batched watches only)."""

    changes: tuple[ChangeRecord, ...]


WatchEvent = ChangeRecord | Batch | Progress | Current

# Most changes in one batch; the transport may split a batch further to respect message sizes.
MAX_BATCH = 500
# How much a batched feed stretches every batched feed's pace: with N of them, each rests N x
# this between messages, so together they send at most 2,000 messages a second however many
# there are (a message costs gRPC 30-60 us of the event loop: a tenth of it, at most). Measured
# with 2,000 batched feeds: sequential IngestEvent p50 3.8-4.1 ms against 3.5 ms with none.
SECONDS_PER_BATCHED_WATCH = 0.0005
# Feeds woken per turn of the event loop when a change arrives after a quiet spell.
WAKE_SLICE = 64
# Watch messages started per turn of the event loop (see SendBudget).
SENDS_PER_TURN = 16


class SendBudget:
    """Unbatched watch messages, all such watches together, start at most `rate` a second
    (bursts of `burst`) and at most `per_turn` in one turn of the event loop; a watch with a
    message to send beyond that waits its turn, first come first served.

    A message costs gRPC some tens of microseconds of the server's CPU, and watchers that do not
    ask for batches (a grpcurl, a naive client) want one message per change each: 100 such feeds
    at 200 changes a second are 20,000 messages a second. Unbounded, on a machine short of CPU
    they took it from the calls being ingested (measured: ingest 0.58x to 0.92x its rate without
    them, latency p99 2 to 6.6 s). Bounded, ingest kept 0.91x to 1.06x, and the watchers share
    what the budget gives: they lag, catch up from the change log when they fall off the shared
    buffer, and miss nothing. Batched watches do not take from it: they are paced already (see
    `batch_interval`: all of them together send at most about 2,000 messages a second), and a
    budget shared with unbatched ones would make a client that did ask for batches wait behind
    those that did not."""

    def __init__(
        self,
        rate: float,
        burst: int = 1,
        per_turn: int = SENDS_PER_TURN,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = rate
        self._burst = burst
        self._per_turn = per_turn
        self._clock = clock
        self._tokens = float(burst)
        self._updated = clock()
        self._granted = 0  # in this turn of the loop
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._turning = False

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._updated) * self._rate)
        self._updated = now

    async def take(self) -> None:
        """Until this watch may start a message."""
        if not self._waiting and self._granted < self._per_turn:
            self._refill()
            if self._tokens >= 1:
                self._tokens -= 1
                self._granted += 1
                if not self._turning:
                    self._turning = True
                    asyncio.get_running_loop().call_soon(self._next_turn)
                return
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        if not self._turning:
            self._turning = True
            asyncio.get_running_loop().call_soon(self._next_turn)
        await waiter

    def _next_turn(self) -> None:
        """A callback scheduled in one turn runs in the next: a new turn, a new share."""
        self._granted = 0
        self._refill()
        waiting = self._waiting
        while waiting and self._granted < self._per_turn and self._tokens >= 1:
            waiter = waiting.popleft()
            if not waiter.done():  # not cancelled meanwhile
                waiter.set_result(None)
                self._tokens -= 1
                self._granted += 1
        loop = asyncio.get_running_loop()
        if waiting and self._tokens < 1:
            loop.call_later((1 - self._tokens) / self._rate, self._next_turn)
        elif waiting or self._granted:
            loop.call_soon(self._next_turn)
        else:
            self._turning = False


class Compacted(OutOfRange):
    """The change log no longer holds the changes after `last_sent_revision` (a watch), or the
    state at `revision` (an as-of read: `last_sent_revision` None)."""

    def __init__(
        self,
        compacted_revision: int,
        last_sent_revision: int | None,
        *,
        revision: int | None = None,
    ) -> None:
        metadata = {"compacted_revision": str(compacted_revision)}
        if last_sent_revision is not None:
            message = (
                f"changes up to revision {compacted_revision} have been compacted; this watch "
                f"needs those after revision {last_sent_revision}. Re-read the state and watch "
                "from its revision."
            )
            metadata["last_sent_revision"] = str(last_sent_revision)
        else:
            message = (
                f"the state at revision {revision} is no longer known: changes up to revision "
                f"{compacted_revision} have been compacted (the change log keeps "
                "TRANSACTION_SERVICE_CHANGE_RETENTION_SECONDS). Read a newer revision."
            )
        super().__init__(message, reason=Reason.REVISION_COMPACTED, metadata=metadata)
        self.compacted_revision = compacted_revision
        self.last_sent_revision = last_sent_revision


class RevisionInFuture(OutOfRange):
    """A watch asked to start after (or a read to read at) a revision not committed yet."""

    def __init__(
        self, start_revision: int, head_revision: int, *, field: str = "start_revision"
    ) -> None:
        super().__init__(
            f"{field} {start_revision} is ahead of the newest revision, {head_revision}: "
            "a revision comes from a message of this service; use one you received",
            reason=Reason.REVISION_IN_FUTURE,
            metadata={"head_revision": str(head_revision)},
        )


class WatchClosed(Unavailable):
    """The server is shutting down; resume from `last_sent_revision` elsewhere or later."""

    def __init__(self, last_sent_revision: int) -> None:
        super().__init__(
            f"the server is shutting down; resume with start_revision={last_sent_revision}",
            reason=Reason.SHUTTING_DOWN,
            metadata={"last_sent_revision": str(last_sent_revision)},
        )
        self.last_sent_revision = last_sent_revision


@dataclass(eq=False, slots=True)
class Subscription:
    """One watch stream's place in the hub.

    A single-transaction watch (its filter has a key) has a queue of its own, filled by publish.
    A feed watch has none: it reads the hub's shared buffer of recent changes from where it is,
    so publishing a change costs the same whether ten feeds or ten thousand are open.

    Thousands are open at once, mostly idle, so a subscription holds little: slots, a queue only
    while changes wait in it, and a bare future only while its watch waits (an asyncio.Event and
    an empty deque cost about 1.3 KiB a watch).
    """

    where: WatchFilter
    limit: int
    # Changes not yet taken (single-transaction watches); None when there are none.
    queue: collections.deque[ChangeRecord] | None = None
    # Set when the buffer overflowed and was dropped (or a feed fell off the shared buffer):
    # catch up from the change log.
    behind: bool = False
    overflows: int = 0
    closed: bool = False
    # The future the watch waits on, while it waits (see `wake`).
    waiter: asyncio.Future[None] | None = None
    on_overflow: Callable[[], None] = lambda: None
    # Batched watches are paced; batched feeds are counted to stretch the pace as they grow.
    batched: bool = False
    # When a message was last sent, and whether an idle progress message is due (the hub's
    # ticker sets it: one timer for every watch, not one per watch).
    active_at: float = field(default_factory=time.monotonic)
    progress_due: bool = False
    # Feeds: the newest revision of the shared buffer this watch has looked at.
    seen: int = 0

    @property
    def keyed(self) -> bool:
        return bool(self.where.key)

    @property
    def queued(self) -> int:
        return len(self.queue) if self.queue else 0

    def offer(self, change: ChangeRecord) -> None:
        queue = self.queue
        if queue is None:
            self.queue = collections.deque((change,))
        elif len(queue) >= self.limit:
            self.queue = None
            self.fell_behind()
        else:
            queue.append(change)
        self.wake()

    def wake(self) -> None:
        """Let the watch look again (the state it looks at was set before this call)."""
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fell_behind(self) -> None:
        self.behind = True
        self.overflows += 1
        self.on_overflow()

    def active(self) -> None:
        """Something was sent: the next progress message is due a full interval from now."""
        self.active_at = time.monotonic()
        self.progress_due = False


class WatchStore(ChangeLog, TransactionReads, Protocol):
    """What the hub reads: the change log, and the current state of a transaction."""


class ChangeHub:
    """Fans committed changes out to watchers; replays the change log for them."""

    def __init__(
        self,
        store: WatchStore,
        *,
        queue_size: int = 1024,
        page_size: int = 500,
        progress_interval: float = 10.0,
        batch_interval: float = 0.05,
        messages_per_second: int = 5000,
        metrics: Metrics | None = None,
    ) -> None:
        self._batch_interval = batch_interval
        self._metrics = metrics if metrics is not None else Metrics()
        # One bound method for every subscription (not one made per watch).
        self._overflowed = self._metrics.watch_overflowed
        self._store = store
        self._queue_size = queue_size
        self._page_size = page_size
        self._progress_interval = progress_interval
        self._subscriptions: set[Subscription] = set()
        self._batched_feeds = 0
        self._ticker: asyncio.Task[None] | None = None
        # Single-transaction watchers by key, so a change is offered only to those it may
        # concern (those of its transaction id and of each of its orders' ids).
        # A list each: most keys have one watcher, and a list of one is a third of a set's size.
        self._by_key: dict[str, list[Subscription]] = {}
        # Feeds read the recent changes, shared: `_recent[i]` has revision `_recent_from + i`
        # (published revisions are contiguous). Those waiting for more are woken by publish;
        # the others (busy, or resting between batches) cost publish nothing.
        self._recent: list[ChangeRecord] = []
        self._recent_from = 1
        self._recent_size = queue_size
        self._waiting_feeds: set[Subscription] = set()
        self._to_wake: collections.deque[Subscription] = collections.deque()
        self._waking = False
        # A tenth of a second's worth may go out at once, after a quiet spell.
        self._turns = SendBudget(messages_per_second, max(1, messages_per_second // 10))
        self._closed = False
        # The newest revision published; every change up to it has been offered to every
        # subscriber that existed when it was published.
        self.published_revision = 0

    @property
    def subscriber_count(self) -> int:
        return len(self._subscriptions)

    def subscriptions(self) -> list[Subscription]:
        return list(self._subscriptions)

    def count_by_kind(self) -> dict[str, int]:
        """Open watches: `transaction` (one transaction's, keyed) and `feed` (all of them)."""
        keyed = sum(map(len, self._by_key.values()))
        return {"transaction": keyed, "feed": len(self._subscriptions) - keyed}

    def publish(self, changes: Sequence[ChangeRecord]) -> None:
        """Offer committed changes, in revision order, to every matching subscriber. Never waits."""
        by_key = self._by_key
        for change in changes:
            if change.revision <= self.published_revision:
                continue
            if by_key:
                candidates = set(by_key.get(change.transaction_id, ()))
                for order in change.view.orders:
                    candidates.update(by_key.get(order.id, ()))
                for sub in candidates:
                    if (selected := sub.where.select(change)) is not None:
                        sub.offer(selected)
            if not self._recent or change.revision != self._recent_from + len(self._recent):
                # The first change, or after a gap the feed could not fill (see
                # ChangeFeed.catch_up): the buffer starts over here.
                self._recent = []
                self._recent_from = change.revision
            self._recent.append(change)
            self.published_revision = change.revision
        if len(self._recent) > 2 * self._recent_size:
            cut = len(self._recent) - self._recent_size
            del self._recent[:cut]
            self._recent_from += cut
        if self._waiting_feeds:
            # The feeds waiting now; those that go back to waiting meanwhile are woken by the
            # next publish, not by this one (else a slice could keep finding them forever).
            self._to_wake.extend(self._waiting_feeds)
            self._waiting_feeds.clear()
            if not self._waking:
                self._waking = True
                asyncio.get_running_loop().call_soon(self._wake_feeds)

    def _wake_feeds(self) -> None:
        """Wake the feeds that were waiting for changes, a slice at a time: each slice runs in a
        turn of the event loop of its own, so the calls being ingested are served between slices
        rather than after thousands of watchers have all sent their message."""
        for _ in range(min(WAKE_SLICE, len(self._to_wake))):
            self._to_wake.popleft().wake()
        if self._to_wake:
            asyncio.get_running_loop().call_soon(self._wake_feeds)
        else:
            self._waking = False

    def batch_interval(self) -> float:
        """How long a batched watch rests between messages while changes keep coming: the
        configured minimum, stretched as batched feeds grow in number, so that sending to all of
        them costs the event loop a bounded share of its time (each message costs gRPC some tens
        of microseconds), whatever their number. Single-transaction watches get few changes and
        do not count."""
        return max(self._batch_interval, self._batched_feeds * SECONDS_PER_BATCHED_WATCH)

    async def _tick(self) -> None:
        """Mark idle watches as due a progress message."""
        period = self._progress_interval / 4
        while True:
            await asyncio.sleep(period)
            due = time.monotonic() - self._progress_interval
            for sub in self._subscriptions:
                if sub.active_at <= due and not sub.progress_due:
                    sub.progress_due = True
                    sub.wake()

    def _add(self, sub: Subscription, last: int) -> None:
        # A watch that passed the check of `watch` before `close` and subscribes after it.
        sub.closed = self._closed
        if self._ticker is None and not self._closed:
            self._ticker = asyncio.get_running_loop().create_task(self._tick(), name="watch-tick")
        self._subscriptions.add(sub)
        if key := sub.where.key:
            self._by_key.setdefault(key, []).append(sub)
        else:
            self._batched_feeds += sub.batched
            sub.seen = last

    def _remove(self, sub: Subscription) -> None:
        if sub not in self._subscriptions:
            return
        self._subscriptions.discard(sub)
        self._waiting_feeds.discard(sub)
        if key := sub.where.key:
            subs = self._by_key.get(key)
            if subs is not None:
                with contextlib.suppress(ValueError):
                    subs.remove(sub)
                if not subs:
                    del self._by_key[key]
        else:
            self._batched_feeds -= sub.batched

    def _take(self, sub: Subscription, last: int, limit: int) -> list[ChangeRecord]:
        """Up to `limit` changes for `sub` after revision `last`, as it is to see them. Sets
        `sub.behind` if they are no longer at hand (then the caller reads the change log)."""
        taken: list[ChangeRecord] = []
        if sub.keyed:
            queue = sub.queue
            while queue and len(taken) < limit:
                change = queue.popleft()
                if change.revision > last:
                    taken.append(change)
            if not queue:
                sub.queue = None
            return taken
        # Everything up to `last` was sent (or read from the log), so there is nothing to look
        # at below it.
        sub.seen = max(sub.seen, last)
        start = sub.seen + 1
        if start < self._recent_from and start <= self.published_revision:
            # Fell further behind than the shared buffer reaches.
            sub.fell_behind()
            return taken
        where = sub.where
        recent = self._recent
        index = max(0, start - self._recent_from)
        if not (where.kinds or where.team_id):
            # Every change: a slice of the shared buffer (thousands of feeds take one each).
            taken = recent[index : index + limit]
            if taken:
                sub.seen = taken[-1].revision
            return taken
        while index < len(recent) and len(taken) < limit:
            change = recent[index]
            index += 1
            sub.seen = change.revision
            if (selected := where.select(change)) is not None:
                taken.append(selected)
        return taken

    def _has_more(self, sub: Subscription) -> bool:
        if sub.keyed:
            return bool(sub.queue)
        return sub.seen < self._recent_from + len(self._recent) - 1

    def _waiter(self, sub: Subscription) -> asyncio.Future[None] | None:
        """What to await until there is something to do (a change, a catch-up, the end, or a
        progress tick; `wake` sets it), or None if there is something now. The watch awaits the
        future itself: a coroutine in between would be one more frame per waiting watch, with
        thousands waiting. The loop is one thread: nothing changes between the check here and
        the wait."""
        if sub.behind or sub.closed or sub.progress_due or self._has_more(sub):
            return None
        if not sub.keyed:
            self._waiting_feeds.add(sub)
        sub.waiter = waiter = asyncio.get_running_loop().create_future()
        return waiter

    def mark_all_behind(self) -> None:
        """Every subscriber re-reads the change log from its position (the live stream had a
        gap this process cannot fill)."""
        for sub in self._subscriptions:
            sub.queue = None
            sub.behind = True
            sub.wake()

    def close(self) -> None:
        """End every watch (WatchClosed) and refuse new ones; for shutdown."""
        self._closed = True
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        for sub in self._subscriptions:
            sub.closed = True
            sub.wake()

    async def watch(
        self,
        where: WatchFilter,
        start_revision: int | None,
        *,
        current: Callable[[], Awaitable[tuple[TransactionSnapshot | None, int]]] | None = None,
        batch: bool = False,
    ) -> AsyncGenerator[WatchEvent, None]:
        """Matching changes, in revision order, each once.

        With `batch`, changes pending together come as one `Batch`, and while changes keep
        coming the watch yields at most once per `batch_interval` seconds (see ChangeHub).

        Without `start_revision` the watch starts now. Its first event is `Current` for a single
        transaction (given `current`, which reads it), or `Progress` at the head revision for the
        feed or a transaction not known yet. With `start_revision`, changes after it are replayed
        from the change log first; 0 means from the oldest change kept, and any other revision
        older than the log raises `Compacted`.
        """
        if self._closed:
            # Not begun: one from a revision resumes from it; one from now, from the newest
            # revision published (0 would replay the whole log to a client that asked for none
            # of it).
            raise WatchClosed(
                start_revision if start_revision is not None else self.published_revision
            )
        if start_revision is not None:
            head = await self._store.head_revision()
            if start_revision > head:
                raise RevisionInFuture(start_revision, head)
        sub = Subscription(where, self._queue_size, on_overflow=self._overflowed, batched=batch)
        # Subscribed before anything is read: a feed looks at the shared buffer from the newest
        # revision published now on; what is read below covers everything up to it.
        self._add(sub, self.published_revision)
        limit = MAX_BATCH if batch else 1
        try:
            if start_revision is None:
                if current is not None:
                    snapshot, last = await current()
                    current = None  # the reader is not kept while the watch waits either
                    # A transaction not seen yet has no state to show: say how far we are.
                    opening: WatchEvent = Current(snapshot, last) if snapshot else Progress(last)
                    # Not kept while the watch waits for changes: thousands of watches would
                    # each hold their transaction's state.
                    del snapshot
                    yield opening
                    del opening
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
                    replayed: list[ChangeRecord] = []
                    async for change in self._replay(where, last, lenient):
                        sub.active()
                        if not batch:
                            await self._turns.take()
                            yield change
                            last = change.revision
                            continue
                        replayed.append(change)
                        if len(replayed) == MAX_BATCH:
                            yield Batch(tuple(replayed))
                            last, replayed = change.revision, []
                    if replayed:
                        yield Batch(tuple(replayed)) if len(replayed) > 1 else replayed[0]
                        last = replayed[-1].revision
                    # Not kept while the watch then waits: the changes read from the log (up to
                    # a batch of them), and the loop's variable, which outlives the loop.
                    replayed = []
                    with contextlib.suppress(NameError):  # unbound if nothing was replayed
                        del change
                    replay_needed = lenient = False
                    continue
                fresh = self._take(sub, last, limit)
                if sub.behind:
                    continue
                if not fresh:
                    while (waiter := self._waiter(sub)) is not None:
                        try:
                            await waiter
                        finally:
                            sub.waiter = waiter = None
                    if sub.progress_due and not (sub.behind or sub.closed or self._has_more(sub)):
                        sub.active()
                        yield Progress(max(last, self.published_revision))
                    continue
                sub.active()
                if not batch:
                    await self._turns.take()
                yield Batch(tuple(fresh)) if len(fresh) > 1 else fresh[0]
                last = fresh[-1].revision
                if batch:
                    # Paced: after a message, rest for the interval (jittered, so that watches
                    # do not all send at one moment) while changes gather; a change after a
                    # quiet spell longer than that goes out at once. Resting, a watch costs
                    # publishing nothing.
                    await asyncio.sleep(self.batch_interval() * random.uniform(0.5, 1.5))
        finally:
            self._remove(sub)

    async def _replay(
        self, where: WatchFilter, after: int, lenient: bool
    ) -> AsyncIterator[ChangeRecord]:
        """Matching changes with revision > after, from the change log, up to its current end."""
        ids: tuple[str, ...] = ()
        if key := where.key:
            # The key's changes are under its own id (a transaction's, or an order's legacy
            # stand-in) and under the transaction its order belongs to now.
            snapshot, _ = await self._store.get_by_order(key)
            ids = (key, snapshot.view.id) if snapshot and snapshot.view.id != key else (key,)
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
                if (selected := where.select(change)) is not None:
                    yield selected
                    after = change.revision
            if len(page.changes) < self._page_size:
                return


class ChangeFeed:
    """Publishes every committed change to the hub exactly once, in revision order, whichever
    process committed it.

    Changes this process commits are handed over at once (`committed`) when they follow the last
    published revision. Otherwise (another replica committed revisions in between) the feed tails
    the change log from the last published revision: on a wake-up from the store (PostgreSQL
    LISTEN/NOTIFY), after every reconnect, and every `poll_seconds` in case a notification was
    lost. The change log is the truth; notifications only say "look now".

    A store no other process writes (SQLite) has gaps too: a commit whose write raised although
    its rows landed (COMMIT reported an error after writing them, or the write was cancelled
    while SQLite committed) is never handed over. The next commit then follows a gap, and the
    feed reads it from the log (without polling or notifications: only such a commit wakes it).
    """

    def __init__(
        self,
        store: ChangeLog,
        hub: ChangeHub,
        *,
        poll_seconds: float = 1.0,
        page_size: int = 500,
        shared: bool = False,
    ) -> None:
        self._store = store
        self._hub = hub
        self._poll_seconds = poll_seconds
        self._page_size = page_size
        # Whether other processes write to the store too; if not, the log is read only after a
        # gap `committed` found.
        self._shared = shared
        self._wakeup = asyncio.Event()
        self.published = 0

    async def start(self) -> None:
        """Publish from the store's head revision on (call before taking traffic)."""
        self.published = await self._store.head_revision()
        self._hub.published_revision = self.published

    def committed(self, changes: Sequence[ChangeRecord]) -> None:
        """Changes this process just committed, in revision order."""
        fresh = [c for c in changes if c.revision > self.published]
        if not fresh:
            return
        if fresh[0].revision == self.published + 1:
            self._publish(fresh)
        else:
            # Another process committed the revisions in between: read them all from the log.
            self._wakeup.set()

    def _publish(self, changes: Sequence[ChangeRecord]) -> None:
        self._hub.publish(changes)
        self.published = changes[-1].revision

    async def run(self) -> None:
        """Tail the change log whenever there may be something new; runs until cancelled."""
        listener = asyncio.create_task(self._listen(), name="change-notifications")
        # Failed reads in a row: the fault is logged when it starts and when it ends, not at
        # every retry (a database down for 30 s would otherwise log 30 tracebacks).
        failures = 0
        try:
            while True:
                # Not shared: only `committed` finding a gap wakes it (or a failed read, to retry).
                poll = self._poll_seconds if self._shared or failures else None
                try:
                    async with asyncio.timeout(poll):
                        await self._wakeup.wait()
                except TimeoutError:
                    pass
                self._wakeup.clear()
                try:
                    await self.catch_up()
                except Unavailable as exc:
                    failures += 1
                    if failures == 1:
                        log.warning(
                            "change feed: cannot read the change log: %s; retrying every %gs",
                            exc.message.removesuffix(" Retry later.").rstrip("."),
                            self._poll_seconds,
                        )
                    continue
                except Exception:
                    failures += 1
                    if failures == 1:  # not a store fault: worth its traceback, once
                        log.exception(
                            "change feed: reading the change log failed; retrying every %gs",
                            self._poll_seconds,
                        )
                    continue
                if failures:
                    log.warning(
                        "change feed: reading the change log again after %d failed attempt%s",
                        failures,
                        "" if failures == 1 else "s",
                    )
                    failures = 0
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    async def _listen(self) -> None:
        async for _ in self._store.change_notifications():
            self._wakeup.set()

    async def catch_up(self) -> None:
        """Publish everything committed after the last published revision."""
        while True:
            page = await self._store.changes_after(self.published, self._page_size)
            if page.compacted_revision > self.published:
                # This process fell further behind than the log keeps (it was cut off from the
                # store for longer than the retention): its subscribers re-read what they can
                # from the log, and those who needed trimmed changes are told so.
                log.warning(
                    "change log trimmed past revision %d before it was published here",
                    self.published,
                )
                self._hub.mark_all_behind()
                self.published = page.compacted_revision
                self._hub.published_revision = max(self._hub.published_revision, self.published)
                continue
            fresh = [c for c in page.changes if c.revision > self.published]
            if fresh:
                self._publish(fresh)
            if len(page.changes) < self._page_size:
                return
