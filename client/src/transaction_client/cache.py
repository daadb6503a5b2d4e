"""`TransactionCache`: an informer. Lists, then watches, into an in-memory index; handlers that
fire once per transaction.

How handlers stay exactly-once (docs/client.md says it for users):

- A handler is a name, a predicate on a transaction's state, and a function. It fires for a
  transaction the first time the cache observes a state of it for which the predicate holds:
  a change's state (`TransactionChange.transaction`), or, after a resync, the re-listed state.
  Each call's key, `"name:transaction_id"`, is recorded; a recorded key never fires again. When a
  change folds legacy stand-in transactions into a real one, their keys carry over to it (it is
  the same order).
- The cache observes every change after its start revision once, in order (the watch
  guarantees it across reconnects, replicas and server restarts).
- With a checkpoint, the keys are saved as they are recorded, with the revision up to which
  every change was handled; a restarted process lists the current state into its index, then
  replays the changes after the saved revision, so handlers see exactly the states an
  uninterrupted process would have seen, and the recorded keys keep them from firing twice.
- If the changes after the saved revision were compacted (the cache was away longer than the
  server's change retention, or fell that far behind), the cache re-lists: every transaction's
  current state is observed; the keys keep old ones from firing again. A state that came and went
  inside the compacted history cannot be observed (nothing is left to show it): e.g. a
  transaction completed and reopened while the cache was away fires no `on_completed` until it
  completes again.
- A handler runs to completion before the cache goes on; its key is saved only when it returned.
  A handler that raises stops the cache (by default): the key is not recorded, and after a
  restart the handler is called again for that transaction. So is a handler that was running when
  its process died: exactly-once everywhere else, at-least-once for a call the crash
  interrupted; a handler whose effect must not happen twice even then can use `call.key` as an
  idempotency key.
- On the very first start (no checkpoint saved), transactions that already satisfy a predicate
  are recorded without a call (they happened before the consumer existed), unless
  `fire_on_initial_list` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Literal

from transaction_client.errors import RevisionCompacted
from transaction_client.watch import CHECKPOINT_EVERY, Progress
from transactions.v1 import transactions_pb2 as pb

if TYPE_CHECKING:
    from transaction_client.checkpoint import Checkpoint
    from transaction_client.client import TransactionClient

log = logging.getLogger("transaction_client")

Predicate = Callable[[pb.Transaction], bool]
HandlerErrors = Literal["stop", "log"]


@dataclass(frozen=True)
class HandlerCall:
    """What a handler is called with: the transaction's state that satisfied its predicate, and
    the revision at which the cache observed it."""

    handler: str
    transaction: pb.Transaction
    revision: int

    @property
    def key(self) -> str:
        """`"handler:transaction_id"`: the same for every call of this handler for this
        transaction, across restarts; an idempotency key for effects that must not repeat."""
        return f"{self.handler}:{self.transaction.id}"


Handler = Callable[[HandlerCall], Awaitable[None] | None]


@dataclass(frozen=True)
class _Handler:
    name: str
    predicate: Predicate
    function: Handler


class CacheStopped(Exception):
    """The cache stopped (closed, or a handler raised); `__cause__` says why."""


class TransactionCache:
    """An in-memory index of every transaction (of `team_id`, if given), kept current by a
    watch; see the module's documentation for the handlers' guarantee.

        async with TransactionCache(client, checkpoint=FileCheckpoint("cache.ckpt")) as cache:
            @cache.on_completed
            async def completed(call: HandlerCall) -> None: ...

    Register handlers before `start()` (or before entering the `async with`)."""

    def __init__(
        self,
        client: TransactionClient,
        *,
        team_id: str = "",
        checkpoint: Checkpoint | None = None,
        fire_on_initial_list: bool = False,
        handler_errors: HandlerErrors = "stop",
    ) -> None:
        self._client = client
        self._team_id = team_id
        self._checkpoint = checkpoint
        self._fire_initial = fire_on_initial_list
        self._handler_errors = handler_errors
        self._handlers: list[_Handler] = []
        self._by_id: dict[str, pb.Transaction] = {}
        self._by_order: dict[str, str] = {}
        self._by_status: dict[int, set[str]] = {}
        self._fired: set[str] = set()
        # Every change up to `_position` has been handled; the index holds every transaction at
        # least as new as it was at `_list_head`.
        self._position = 0
        self._list_head = 0
        self._saved_position = 0
        self._saved_at = 0.0
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self.resyncs = 0

    # -- handlers -------------------------------------------------------------------------------

    def on(self, name: str, predicate: Predicate, handler: Handler) -> Handler:
        """Call `handler` once per transaction, the first time the cache observes a state of it
        for which `predicate` holds. `name` keys the calls in the checkpoint: keep it stable."""
        if self._task is not None:
            raise RuntimeError("register handlers before the cache starts")
        if any(h.name == name for h in self._handlers) or ":" in name:
            raise ValueError(f"handler name {name!r} is taken or contains ':'")
        self._handlers.append(_Handler(name, predicate, handler))
        return handler

    def on_redraw_available(self, handler: Handler) -> Handler:
        """Once per transaction, when it is known to need a redraw (`redraw_available`)."""
        return self.on("redraw_available", lambda t: t.redraw_available, handler)

    def on_completed(self, handler: Handler) -> Handler:
        """Once per transaction, when its status is COMPLETED."""
        return self.on("completed", lambda t: t.status == pb.TRANSACTION_STATUS_COMPLETED, handler)

    def on_cancelled(self, handler: Handler) -> Handler:
        """Once per transaction, when its status is CANCELLED."""
        return self.on("cancelled", lambda t: t.status == pb.TRANSACTION_STATUS_CANCELLED, handler)

    # -- reads ----------------------------------------------------------------------------------

    @property
    def revision(self) -> int:
        """Every change up to this revision is in the index."""
        return max(self._position, self._list_head)

    @property
    def handled_revision(self) -> int:
        """Every change up to this revision has been handled: its handlers called. After a
        restart it trails `revision` while the changes made meanwhile are replayed."""
        return self._position

    def __len__(self) -> int:
        return len(self._by_id)

    def peek(
        self, *, transaction_id: str | None = None, order_id: str | None = None
    ) -> pb.Transaction | None:
        """The cached state, as it is now (no waiting)."""
        if (transaction_id is None) == (order_id is None):
            raise ValueError("give exactly one of transaction_id and order_id")
        if order_id is not None:
            transaction_id = self._by_order.get(order_id)
        return self._by_id.get(transaction_id or "")

    async def get(
        self,
        *,
        transaction_id: str | None = None,
        order_id: str | None = None,
        min_revision: int = 0,
        timeout: float | None = None,
    ) -> pb.Transaction | None:
        """The cached state once the cache holds every change up to `min_revision` (for
        read-your-writes: the revision an ingest returned). Waits at most `timeout` seconds
        (default: the client's), then raises TimeoutError."""
        if self.revision < min_revision:
            await self._wait(lambda: self.revision >= min_revision, timeout)
        self._check()
        return self.peek(transaction_id=transaction_id, order_id=order_id)

    async def wait_for(
        self,
        order_id: str | None = None,
        predicate: Predicate = lambda t: True,
        timeout: float | None = None,
        *,
        transaction_id: str | None = None,
    ) -> pb.Transaction:
        """The transaction of `order_id` (or `transaction_id`) once its cached state satisfies
        `predicate`; TimeoutError after `timeout` seconds (None: no limit)."""
        found: list[pb.Transaction] = []

        def ready() -> bool:
            state = self.peek(transaction_id=transaction_id, order_id=order_id)
            if state is not None and predicate(state):
                found.append(state)
                return True
            return False

        if not ready():
            await self._wait(ready, timeout, default=False)
        return found[0]

    def transactions(
        self, status: pb.TransactionStatus.ValueType | None = None
    ) -> list[pb.Transaction]:
        """Every cached transaction, or those in `status`."""
        if status is None:
            return list(self._by_id.values())
        return [self._by_id[i] for i in self._by_status.get(status, ())]

    async def _wait(
        self, ready: Callable[[], bool], timeout: float | None, *, default: bool = True
    ) -> None:
        limit = self._client.timeout if timeout is None and default else timeout
        async with asyncio.timeout(limit):
            while not ready():
                self._check()
                changed = self._changed
                await changed.wait()

    def _check(self) -> None:
        if self._failure is not None:
            raise CacheStopped(str(self._failure)) from self._failure
        if self._task is None:
            raise CacheStopped("the cache is not running: start() it first")

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """List every transaction into the index, then keep it current in the background.
        Returns once the index holds the listed state."""
        if self._task is not None:
            raise RuntimeError("the cache has started already")
        saved = await self._checkpoint.load() if self._checkpoint is not None else None
        if saved is not None:
            self._fired = set(saved.fired)
            self._position = self._saved_position = saved.revision
        await self._relist("replay" if saved is not None else "first")
        if saved is None:
            self._position = self._list_head
        self._task = asyncio.create_task(self._run(), name="transaction-cache")
        self._task.add_done_callback(self._stopped)

    def _stopped(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._failure = task.exception()
            log.error("transaction cache stopped: %s", self._failure)
        elif self._failure is None:
            self._failure = CacheStopped("the cache was closed")
        self._notify()

    async def close(self) -> None:
        """Stop watching, and save the position. Raises what stopped the cache, if anything did
        before."""
        task, self._task = self._task, None
        failure = self._failure
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._checkpoint is not None and self._position > self._saved_position:
            await self._checkpoint.save(self._position)
            self._saved_position = self._position
        if failure is not None and not isinstance(failure, CacheStopped):
            raise CacheStopped(str(failure)) from failure

    async def __aenter__(self) -> TransactionCache:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.close()
        else:
            with contextlib.suppress(CacheStopped):
                await self.close()

    # -- keeping the index current --------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            watch = self._client.watch_transactions(
                team_id=self._team_id,
                start_revision=self._position,
                on_compacted="raise",
                progress=True,
            )
            try:
                async for item in watch:
                    if isinstance(item, Progress):
                        await self._advance(item.revision)
                    elif isinstance(item, pb.TransactionChange):
                        await self._apply(item)
            except RevisionCompacted as compacted:
                self.resyncs += 1
                log.warning(
                    "transaction cache: changes after revision %d compacted (up to %d); "
                    "re-listing every transaction",
                    self._position,
                    compacted.compacted_revision,
                )
                await self._relist("resync")
                await self._advance(self._list_head)

    async def _relist(self, why: Literal["first", "replay", "resync"]) -> None:
        """Read every transaction into a new index. On the first start, record (or, with
        fire_on_initial_list, fire) the handlers their states satisfy; after a resync, fire the
        handlers their states satisfy that have not fired. With a checkpoint to replay from,
        the replay observes the states instead."""
        listing = self._client.list_transactions(team_id=self._team_id)
        states: dict[str, pb.Transaction] = {}
        async for transaction in listing:
            known = states.get(transaction.id)
            if known is None or known.revision < transaction.revision:
                states[transaction.id] = transaction
        self._by_id, self._by_order, self._by_status = {}, {}, {}
        for transaction in states.values():
            self._put(transaction)
        self._list_head = listing.revision
        self._notify()
        if why == "replay":
            return
        if why == "first" and not self._fire_initial:
            keys = [
                f"{h.name}:{t.id}"
                for t in states.values()
                for h in self._handlers
                if h.predicate(t)
            ]
            self._fired.update(keys)
            if self._checkpoint is not None:
                await self._checkpoint.save(self._list_head, keys)
                self._saved_position = self._list_head
            return
        for transaction in states.values():
            await self._observe(transaction, listing.revision)

    async def _apply(self, change: pb.TransactionChange) -> None:
        transaction = change.transaction
        carried = [
            f"{h.name}:{transaction.id}"
            for h in self._handlers
            for merged in change.merged_transaction_ids
            if f"{h.name}:{merged}" in self._fired
            and f"{h.name}:{transaction.id}" not in self._fired
        ]
        if carried:
            self._fired.update(carried)
            await self._save_fired(carried)
        for merged in change.merged_transaction_ids:
            self._remove(merged)
        known = self._by_id.get(transaction.id)
        if known is None or known.revision < change.revision:
            self._put(transaction)
        await self._observe(transaction, change.revision)
        await self._advance(change.revision)

    async def _observe(self, transaction: pb.Transaction, revision: int) -> None:
        """Fire every handler whose predicate this state satisfies and that has not fired for
        the transaction."""
        for handler in self._handlers:
            key = f"{handler.name}:{transaction.id}"
            if key in self._fired or not handler.predicate(transaction):
                continue
            call = HandlerCall(handler.name, transaction, revision)
            try:
                result = handler.function(call)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                if self._handler_errors == "stop":
                    raise
                log.exception("handler %s failed for transaction %s", key, transaction.id)
            self._fired.add(key)
            await self._save_fired([key])

    async def _save_fired(self, keys: list[str]) -> None:
        if self._checkpoint is not None:
            # Everything up to the position is handled; the change being handled is not yet.
            await self._checkpoint.save(self._position, keys)
            self._saved_position = self._position

    async def _advance(self, revision: int) -> None:
        if revision <= self._position:
            return
        self._position = revision
        self._notify()
        if self._checkpoint is not None and time.monotonic() - self._saved_at >= CHECKPOINT_EVERY:
            await self._checkpoint.save(revision)
            self._saved_position, self._saved_at = revision, time.monotonic()

    def _put(self, transaction: pb.Transaction) -> None:
        self._remove(transaction.id)
        self._by_id[transaction.id] = transaction
        for order in transaction.orders:
            self._by_order[order.id] = transaction.id
        self._by_status.setdefault(transaction.status, set()).add(transaction.id)

    def _remove(self, transaction_id: str) -> None:
        old = self._by_id.pop(transaction_id, None)
        if old is None:
            return
        for order in old.orders:
            if self._by_order.get(order.id) == transaction_id:
                del self._by_order[order.id]
        self._by_status.get(old.status, set()).discard(transaction_id)
