"""Watches that resume by themselves: the hard half of the watch protocol, on the client.

The server's half (see the proto and docs/watch.md): every change has a revision; a watch opened
with `start_revision` N replays every matching change after N, then goes live, with no gap and
no repeat; idle streams get `progress` messages; SIGTERM ends streams with UNAVAILABLE
SHUTTING_DOWN; a revision older than the change log keeps ends them with OUT_OF_RANGE
REVISION_COMPACTED.

This half: a `Watch` is an async iterator of changes that

- remembers the revision of the last message it received and, when the stream breaks
  (UNAVAILABLE, SHUTTING_DOWN, a lost connection, a restart, another replica), opens it again
  from there after a jittered, growing pause: every revision once, in order, none missing;
- treats a stream that says nothing, not even progress, for `silence_timeout` (3 progress
  intervals) as broken (a frozen server, a half-open connection), and reconnects;
- on REVISION_COMPACTED re-reads the current state and goes on from its revision, yielding it
  as `Snapshot` items marked `resync=True` (or raises `RevisionCompacted`, if asked);
- reads ahead into a buffer of at most `buffer_size` items: when the consumer is slower than
  the stream, the reader stops reading, HTTP/2 flow control stops the server, and the server
  parks the stream and later catches it up from its change log (memory stays bounded on both
  sides);
- saves its position to a `Checkpoint` (at most once a second, and when it stops), so that a
  consumer process that restarts resumes where it stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar, cast

import grpc

from transaction_client.errors import (
    RevisionCompacted,
    TransactionServiceError,
    Unavailable,
)
from transactions.v1 import transactions_pb2 as pb

if TYPE_CHECKING:
    from transaction_client.checkpoint import Checkpoint
    from transaction_client.client import TransactionClient

log = logging.getLogger("transaction_client")

OnCompacted = Literal["resync", "raise"]
# Pauses between reconnection attempts grow from the first to the last, each drawn at random
# between half and all of its value (so clients cut off together do not return together).
FIRST_PAUSE = 0.25
LAST_PAUSE = 5.0
# A watch saves its position to its checkpoint at most this often (and always when it stops).
CHECKPOINT_EVERY = 1.0
# Silence this many progress intervals long means the stream is dead. The server sends progress
# after one interval of quiet, give or take a quarter (its ticker), so two would do on an idle
# machine; three leave room for a loaded one.
SILENT_INTERVALS = 3.0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A transaction's state read without its history: the first item of a single-transaction
    watch opened without a start revision, or, with `resync` true, the state after the history
    it would have needed was compacted away (every transaction of a feed's team, one item each,
    then the changes after). `revision` is the head revision of the read: the state includes
    every change up to it. `kinds` is always empty, so that a consumer can read `.transaction`,
    `.revision` and `.kinds` of any item."""

    transaction: pb.Transaction
    revision: int
    resync: bool = False
    kinds: tuple[pb.ChangeKind.ValueType, ...] = ()


@dataclass(frozen=True, slots=True)
class Progress:
    """Every matching change up to `revision` has been received (only with `progress=True`)."""

    revision: int


WatchItem = pb.TransactionChange | Snapshot
T = TypeVar("T")


@dataclass(frozen=True)
class WatchRequest:
    """Which stream to open: one transaction (`lookup`), or the feed filtered by kinds and team."""

    lookup: tuple[str, str] | None = None
    kinds: tuple[pb.ChangeKind.ValueType, ...] = ()
    team_id: str = ""

    def open(self, client: TransactionClient, start: int | None) -> Any:
        """The stream call from `start` (None: from now), or with a client that shares streams
        between watches, the watch on a `Watch` stream read alike (multiplex.py). Batches are
        asked for: cheaper for the server, and split into changes here."""
        if self.lookup is not None:
            name, key = self.lookup
            single = pb.WatchTransactionRequest(batch_changes=True)
            if name == "transaction_id":
                single.transaction_id = key
            else:
                single.order_id = key
            if start is not None:
                single.start_revision = start
            if client.watch_streams is not None:
                return client.watch_streams.open(pb.WatchCreateRequest(transaction=single))
            return client.stub.WatchTransaction(single, metadata=client.metadata)
        feed = pb.WatchTransactionsRequest(
            kinds=self.kinds, team_id=self.team_id, batch_changes=True
        )
        if start is not None:
            feed.start_revision = start
        if client.watch_streams is not None:
            return client.watch_streams.open(pb.WatchCreateRequest(transactions=feed))
        return client.stub.WatchTransactions(feed, metadata=client.metadata)


@dataclass(frozen=True)
class _Failure:
    error: BaseException


# What the reader hands the consumer: an item to yield (or None) and the position once the
# consumer is done with it (None: the position does not move, as for a resync's snapshots, which
# only count once all of them are through).
_Entry = tuple[object | None, int | None] | _Failure


class _Silence(Exception):
    pass


class _Stop(Exception):
    pass


# Handed to the consumer when the client was closed: the iteration ends.
_CLOSED = _Failure(StopAsyncIteration())


def _cancelled_here() -> bool:
    """Whether the running task is being cancelled (rather than a gRPC call it awaits:
    grpc.aio raises CancelledError from a call cancelled on this side, as by closing its
    channel)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def pause(failures: int) -> float:
    """The jittered pause before reconnection attempt number `failures + 1`."""
    cap = min(LAST_PAUSE, FIRST_PAUSE * 2**failures)
    return random.uniform(cap / 2, cap)


class Watch(Generic[T]):
    """An async iterator of a watch's items (`TransactionChange` and `Snapshot`, and `Progress`
    if asked for), resuming by itself. Made by `TransactionClient.watch_transaction` and
    `watch_transactions`.

    `revision` is its position: every item up to it has been handled by the consumer (an item
    counts as handled once the consumer asks for the next one). Iterating the same `Watch` again
    after a `break`, or after `client.close()` ended it, continues from there. With a
    `checkpoint`, the position is saved at most once a second and when the iteration ends, and
    a new `Watch` with the same checkpoint starts from it (rather than from `start_revision`).

    Errors that a retry cannot cure are raised from the iteration: `RevisionInFuture` (the
    start revision is not from this server's history), `RevisionCompacted` with
    `on_compacted="raise"`, `Unauthenticated`, `PermissionDenied`, `InvalidArgument`. Everything
    else is retried for ever, unless the watch never received anything and `connect_timeout`
    has passed since it started (0: the first failure is raised, as the CLI does so that a
    wrong address is reported at once).
    """

    def __init__(
        self,
        client: TransactionClient,
        request: WatchRequest,
        *,
        start_revision: int | None,
        checkpoint: Checkpoint | None,
        on_compacted: OnCompacted,
        progress: bool,
        buffer_size: int,
        connect_timeout: float | None,
        silence_timeout: float | None,
    ) -> None:
        if buffer_size < 1:
            raise ValueError("buffer_size must be at least 1")
        if on_compacted not in ("resync", "raise"):
            raise ValueError('on_compacted must be "resync" or "raise"')
        self._client = client
        self._request = request
        self._checkpoint = checkpoint
        self._on_compacted = on_compacted
        self._progress = progress
        self._buffer_size = buffer_size
        self._connect_timeout = connect_timeout
        self.silence_timeout = silence_timeout or SILENT_INTERVALS * client.progress_interval
        self.revision: int | None = start_revision
        self._loaded = checkpoint is None
        self._saved: int | None = None
        self._saved_at = 0.0
        self._active: AsyncIterator[T] | None = None
        # How often the stream broke and was opened again, and how often history was lost.
        self.reconnects = 0
        self.resyncs = 0

    def __aiter__(self) -> AsyncIterator[T]:
        if self._active is not None:
            raise RuntimeError(
                "this watch is already being iterated: one iteration at a time (after a break, "
                "`await watch.aclose()` ends the previous one at once)"
            )
        self._active = self._items()
        return self._active

    async def aclose(self) -> None:
        """End the iteration in progress (its position is saved)."""
        if self._active is not None:
            await cast(Any, self._active).aclose()

    async def _items(self) -> AsyncIterator[T]:
        try:
            if not self._loaded:
                assert self._checkpoint is not None
                saved = await self._checkpoint.load()
                if saved is not None:
                    self.revision = self._saved = saved.revision
                self._loaded = True
            queue: asyncio.Queue[_Entry] = asyncio.Queue(maxsize=self._buffer_size)
            reader = asyncio.create_task(self._read(self.revision, queue), name="watch-reader")
            done: int | None = None
            try:
                while True:
                    if done is not None:
                        await self._advance(done)
                        done = None
                    entry = await queue.get()
                    if entry is _CLOSED:
                        return
                    if isinstance(entry, _Failure):
                        raise entry.error
                    item, position = entry
                    if item is None:
                        await self._advance(position)
                        continue
                    done = position
                    yield cast(T, item)
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
                await self._save()
        finally:
            self._active = None

    async def _advance(self, position: int | None) -> None:
        if position is None or (self.revision is not None and position <= self.revision):
            return
        self.revision = position
        if time.monotonic() - self._saved_at >= CHECKPOINT_EVERY:
            await self._save()

    async def _save(self) -> None:
        if self._checkpoint is None or self.revision is None or self.revision == self._saved:
            return
        await self._checkpoint.save(self.revision)
        self._saved, self._saved_at = self.revision, time.monotonic()

    # -- the reader: one stream after another, into the queue -----------------------------------

    async def _read(self, start: int | None, queue: asyncio.Queue[_Entry]) -> None:
        try:
            await self._read_streams(start, queue)
        except _Stop:
            pass
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a bug here must reach the consumer, not vanish
            await queue.put(_Failure(exc))

    async def _read_streams(self, start: int | None, queue: asyncio.Queue[_Entry]) -> None:
        position = start
        # Per transaction, the revision a feed's resync listed it at: older changes are skipped.
        listed: dict[str, int] = {}
        resyncing = False
        failures = 0
        began = time.monotonic()
        heard = False
        closes = self._client.closes
        while True:
            if self._client.closes != closes:  # closed: since the last call, or during a pause
                await queue.put(_CLOSED)
                return
            call = self._request.open(self._client, position)
            error: TransactionServiceError
            try:
                while True:
                    try:
                        async with asyncio.timeout(self.silence_timeout):
                            message = await call.read()
                    except TimeoutError:
                        raise _Silence from None
                    if message is grpc.aio.EOF:
                        raise Unavailable(grpc.StatusCode.UNAVAILABLE, "the stream ended")
                    if failures:
                        log.info("watch resumed from revision %s", position)
                    failures, heard = 0, True
                    for entry in self._entries(message, position, listed, resyncing):
                        await queue.put(entry)
                        if entry[1] is not None:
                            position = entry[1]
                    resyncing = False
                    if listed and position is not None and position >= max(listed.values()):
                        listed = {}
            except grpc.aio.AioRpcError as exc:
                error = self._client.error(exc)
            except Unavailable as exc:
                error = exc
            except _Silence:
                error = Unavailable(
                    grpc.StatusCode.UNAVAILABLE,
                    f"no message for {self.silence_timeout:g} s, not even progress (sent every "
                    f"{self._client.progress_interval:g} s): the server or the connection is stuck",
                )
            except asyncio.CancelledError:
                if _cancelled_here() or self._client.closes == closes:
                    raise
                error = Unavailable(grpc.StatusCode.CANCELLED, "the client was closed")
            finally:
                call.cancel()
            if self._client.closes != closes:
                continue  # not retried: the loop's first step ends the iteration
            if isinstance(error, RevisionCompacted) and self._on_compacted == "resync":
                self.resyncs += 1
                log.warning(
                    "watch: the changes after revision %s were compacted (up to %s); re-reading "
                    "the current state",
                    position,
                    error.compacted_revision,
                )
                if self._request.lookup is not None:
                    # Opened without a start revision, the stream begins with the current state.
                    position, resyncing = None, True
                else:
                    position, listed = await self._resync_feed(queue)
                continue
            gave_up = (
                not heard
                and self._connect_timeout is not None
                and time.monotonic() - began >= self._connect_timeout
            )
            if not error.retryable or gave_up:
                await queue.put(_Failure(error))
                return
            delay = pause(failures)
            if not failures:
                log.warning("watch interrupted: %s; resuming from revision %s", error, position)
            failures += 1
            self.reconnects += 1
            await asyncio.sleep(delay)

    def _entries(
        self,
        message: pb.WatchTransactionResponse | pb.WatchTransactionsResponse,
        position: int | None,
        listed: dict[str, int],
        resyncing: bool,
    ) -> list[tuple[object | None, int | None]]:
        event = message.WhichOneof("event")
        if event == "progress":
            revision = message.progress.revision
            return [(Progress(revision) if self._progress else None, revision)]
        if event == "current":
            assert isinstance(message, pb.WatchTransactionResponse)
            current = message.current
            snapshot = Snapshot(current.transaction, current.progress_revision, resync=resyncing)
            return [(snapshot, current.progress_revision)]
        changes = [message.change] if event == "change" else list(message.changes.changes)
        entries: list[tuple[object | None, int | None]] = []
        for change in changes:
            if position is not None and change.revision <= position:
                continue  # sent before: never twice
            position = change.revision
            if change.revision <= listed.get(change.transaction.id, 0):
                entries.append((None, change.revision))  # the resync's snapshot was newer
            else:
                entries.append((change, change.revision))
        return entries

    async def _resync_feed(self, queue: asyncio.Queue[_Entry]) -> tuple[int, dict[str, int]]:
        """Every transaction of the feed's team as it is now, as resync snapshots; then the
        position to go on from (the head revision of the listing's first page), and the
        transactions the listing showed newer than that."""
        seen: dict[str, int] = {}
        failures = 0
        while True:
            listing = self._client.list_transactions(team_id=self._request.team_id)
            try:
                async for page in listing.pages():
                    for transaction in page.transactions:
                        if transaction.revision <= seen.get(transaction.id, 0):
                            continue
                        seen[transaction.id] = transaction.revision
                        snapshot = Snapshot(transaction, page.revision, resync=True)
                        await queue.put((snapshot, None))
            except TransactionServiceError as error:
                if not error.retryable:
                    await queue.put(_Failure(error))
                    raise _Stop from None
                failures += 1
                await asyncio.sleep(pause(failures))
                continue
            head = listing.revision
            await queue.put((None, head))
            return head, {i: r for i, r in seen.items() if r > head}
