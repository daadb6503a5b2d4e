"""The client for code that is not async: the same names, blocking.

`transaction_client.sync.TransactionClient` runs the asyncio client on an event loop of its own,
in a daemon thread, and waits for each call; iterators (pages, watches, back-fills) yield as the
asyncio ones do, with the same bounded buffer and the same resumption. `TransactionCache` runs
its handlers, plain functions here, in a worker thread, so that a slow handler does not stall
the loop that keeps the watch alive.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Generic, Literal, TypeVar, overload

from transaction_client import cache as _cache
from transaction_client import client as _client
from transaction_client.cache import CacheStopped, HandlerCall, HandlerErrors, Predicate
from transaction_client.checkpoint import Checkpoint
from transaction_client.connection import TLS
from transaction_client.watch import OnCompacted, Progress, Watch, WatchItem, WatchRequest
from transactions.v1 import transactions_pb2 as pb

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["CacheStopped", "HandlerCall", "SyncIterator", "TransactionCache", "TransactionClient"]


class _LoopThread:
    """An event loop running in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="transaction-client", daemon=True
        )
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, R]) -> R:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.run(self.loop.shutdown_asyncgens())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class SyncIterator(Generic[T]):
    """A blocking iterator over an async one running on the client's loop."""

    def __init__(self, loop: _LoopThread, iterator: AsyncIterator[T]) -> None:
        self._loop = loop
        self._iterator = iterator

    def __iter__(self) -> SyncIterator[T]:
        return self

    def __next__(self) -> T:
        async def step() -> T:
            return await anext(self._iterator)

        try:
            return self._loop.run(step())
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        """Stop the iteration (a watch saves its position)."""
        closer = getattr(self._iterator, "aclose", None)
        if closer is not None:

            async def close() -> None:
                await closer()

            self._loop.run(close())


class SyncTransactionList(SyncIterator[pb.Transaction]):
    """`TransactionList`, blocking; `revision` as there."""

    def __init__(self, loop: _LoopThread, listing: _client.TransactionList) -> None:
        super().__init__(loop, listing.__aiter__())
        self._listing = listing

    @property
    def revision(self) -> int:
        return self._listing.revision


class SyncTransactionHistory(SyncIterator[pb.TransactionEvent]):
    """`TransactionHistory`, blocking; `transaction_id` and `revision` as there."""

    def __init__(self, loop: _LoopThread, history: _client.TransactionHistory) -> None:
        super().__init__(loop, history.__aiter__())
        self._history = history

    @property
    def transaction_id(self) -> str:
        return self._history.transaction_id

    @property
    def revision(self) -> int:
        return self._history.revision


class SyncWatch(SyncIterator[T]):
    """`Watch`, blocking; `revision`, `reconnects` and `resyncs` as there."""

    def __init__(self, loop: _LoopThread, watch: Watch[T]) -> None:
        super().__init__(loop, watch.__aiter__())
        self.watch = watch

    @property
    def revision(self) -> int | None:
        return self.watch.revision

    @property
    def reconnects(self) -> int:
        return self.watch.reconnects

    @property
    def resyncs(self) -> int:
        return self.watch.resyncs


class TransactionClient:
    """`transaction_client.TransactionClient`, blocking. The same arguments; `close()` it, or use
    it as a context manager."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: TLS | bool | None = None,
        timeout: float = 10.0,
        retry_attempts: int = 5,
        keepalive_seconds: float = 30.0,
        keepalive_timeout_seconds: float = 10.0,
        load_balancing: str | None = None,
        progress_interval: float = 10.0,
        channel_options: Sequence[tuple[str, Any]] = (),
        watches_per_stream: int = 0,
    ) -> None:
        self.aio = _client.TransactionClient(
            target,
            token=token,
            tls=tls,
            timeout=timeout,
            retry_attempts=retry_attempts,
            keepalive_seconds=keepalive_seconds,
            keepalive_timeout_seconds=keepalive_timeout_seconds,
            load_balancing=load_balancing,
            progress_interval=progress_interval,
            channel_options=channel_options,
            watches_per_stream=watches_per_stream,
        )
        self._loop = _LoopThread()

    def _run(self, awaitable: Awaitable[R]) -> R:
        async def wait() -> R:
            return await awaitable

        return self._loop.run(wait())

    def close(self) -> None:
        if not self._loop.loop.is_closed():
            self._run(self.aio.close())
            self._loop.stop()

    def __enter__(self) -> TransactionClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def get_transaction(
        self,
        *,
        transaction_id: str | None = None,
        order_id: str | None = None,
        revision: int | None = None,
        timeout: float | None = None,
    ) -> pb.GetTransactionResponse:
        return self._run(
            self.aio.get_transaction(
                transaction_id=transaction_id, order_id=order_id, revision=revision, timeout=timeout
            )
        )

    def list_transaction_events(
        self,
        *,
        transaction_id: str | None = None,
        order_id: str | None = None,
        include_bodies: bool = False,
        page_size: int = _client.MAX_HISTORY_PAGE_SIZE,
        timeout: float | None = None,
    ) -> SyncTransactionHistory:
        history = self.aio.list_transaction_events(
            transaction_id=transaction_id,
            order_id=order_id,
            include_bodies=include_bodies,
            page_size=page_size,
            timeout=timeout,
        )
        return SyncTransactionHistory(self._loop, history)

    def list_transactions(
        self,
        *,
        status: pb.TransactionStatus.ValueType = pb.TRANSACTION_STATUS_UNSPECIFIED,
        team_id: str = "",
        user_id: str = "",
        updated_since: datetime | None = None,
        page_size: int = _client.MAX_PAGE_SIZE,
        timeout: float | None = None,
    ) -> SyncTransactionList:
        listing = self.aio.list_transactions(
            status=status,
            team_id=team_id,
            user_id=user_id,
            updated_since=updated_since,
            page_size=page_size,
            timeout=timeout,
        )
        return SyncTransactionList(self._loop, listing)

    def batch_get_transactions(
        self,
        *,
        transaction_ids: Sequence[str] = (),
        order_ids: Sequence[str] = (),
        timeout: float | None = None,
    ) -> pb.BatchGetTransactionsResponse:
        return self._run(
            self.aio.batch_get_transactions(
                transaction_ids=transaction_ids, order_ids=order_ids, timeout=timeout
            )
        )

    def get_transaction_results(
        self,
        *,
        transaction_id: str | None = None,
        order_id: str | None = None,
        timeout: float | None = None,
    ) -> pb.GetTransactionResultsResponse:
        return self._run(
            self.aio.get_transaction_results(
                transaction_id=transaction_id, order_id=order_id, timeout=timeout
            )
        )

    def ingest_event(
        self,
        body: Mapping[str, Any] | str | bytes,
        *,
        event_id: str = "",
        timeout: float | None = None,
    ) -> pb.IngestEventResponse:
        return self._run(self.aio.ingest_event(body, event_id=event_id, timeout=timeout))

    def reconcile_transaction(
        self,
        *,
        transaction_id: str | None = None,
        order_id: str | None = None,
        timeout: float | None = _client.RECONCILE_TIMEOUT,
    ) -> pb.ReconcileTransactionResponse:
        return self._run(
            self.aio.reconcile_transaction(
                transaction_id=transaction_id, order_id=order_id, timeout=timeout
            )
        )

    def backfill_transactions(
        self, *, since: datetime, until: datetime | None = None, resend: bool = False
    ) -> SyncIterator[pb.BackfillTransactionsResponse]:
        stream = self.aio.backfill_transactions(since=since, until=until, resend=resend)
        return SyncIterator(self._loop, stream)

    @overload
    def watch_transaction(
        self,
        *,
        transaction_id: str | None = ...,
        order_id: str | None = ...,
        start_revision: int | None = ...,
        checkpoint: Checkpoint | None = ...,
        on_compacted: OnCompacted = ...,
        progress: Literal[False] = ...,
        buffer_size: int = ...,
        connect_timeout: float | None = ...,
        silence_timeout: float | None = ...,
    ) -> SyncWatch[WatchItem]: ...

    @overload
    def watch_transaction(
        self,
        *,
        transaction_id: str | None = ...,
        order_id: str | None = ...,
        start_revision: int | None = ...,
        checkpoint: Checkpoint | None = ...,
        on_compacted: OnCompacted = ...,
        progress: Literal[True],
        buffer_size: int = ...,
        connect_timeout: float | None = ...,
        silence_timeout: float | None = ...,
    ) -> SyncWatch[WatchItem | Progress]: ...

    def watch_transaction(
        self,
        *,
        transaction_id: str | None = None,
        order_id: str | None = None,
        start_revision: int | None = None,
        checkpoint: Checkpoint | None = None,
        on_compacted: OnCompacted = "resync",
        progress: bool = False,
        buffer_size: int = 1000,
        connect_timeout: float | None = None,
        silence_timeout: float | None = None,
    ) -> SyncWatch[WatchItem] | SyncWatch[WatchItem | Progress]:
        key = _client.lookup(transaction_id, order_id)
        watch: Watch[Any] = self.aio.open_watch(
            WatchRequest(lookup=next(iter(key.items()))),
            start_revision=start_revision,
            checkpoint=checkpoint,
            on_compacted=on_compacted,
            progress=progress,
            buffer_size=buffer_size,
            connect_timeout=connect_timeout,
            silence_timeout=silence_timeout,
        )
        return SyncWatch(self._loop, watch)

    @overload
    def watch_transactions(
        self,
        *,
        kinds: Sequence[pb.ChangeKind.ValueType] = ...,
        team_id: str = ...,
        start_revision: int | None = ...,
        checkpoint: Checkpoint | None = ...,
        on_compacted: OnCompacted = ...,
        progress: Literal[False] = ...,
        buffer_size: int = ...,
        connect_timeout: float | None = ...,
        silence_timeout: float | None = ...,
    ) -> SyncWatch[WatchItem]: ...

    @overload
    def watch_transactions(
        self,
        *,
        kinds: Sequence[pb.ChangeKind.ValueType] = ...,
        team_id: str = ...,
        start_revision: int | None = ...,
        checkpoint: Checkpoint | None = ...,
        on_compacted: OnCompacted = ...,
        progress: Literal[True],
        buffer_size: int = ...,
        connect_timeout: float | None = ...,
        silence_timeout: float | None = ...,
    ) -> SyncWatch[WatchItem | Progress]: ...

    def watch_transactions(
        self,
        *,
        kinds: Sequence[pb.ChangeKind.ValueType] = (),
        team_id: str = "",
        start_revision: int | None = None,
        checkpoint: Checkpoint | None = None,
        on_compacted: OnCompacted = "resync",
        progress: bool = False,
        buffer_size: int = 1000,
        connect_timeout: float | None = None,
        silence_timeout: float | None = None,
    ) -> SyncWatch[WatchItem] | SyncWatch[WatchItem | Progress]:
        watch: Watch[Any] = self.aio.open_watch(
            WatchRequest(kinds=tuple(kinds), team_id=team_id),
            start_revision=start_revision,
            checkpoint=checkpoint,
            on_compacted=on_compacted,
            progress=progress,
            buffer_size=buffer_size,
            connect_timeout=connect_timeout,
            silence_timeout=silence_timeout,
        )
        return SyncWatch(self._loop, watch)


SyncHandler = Callable[[HandlerCall], None]


class TransactionCache:
    """`transaction_client.TransactionCache`, blocking, on a sync client. Handlers are plain
    functions, run in a worker thread one at a time."""

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
        self.aio = _cache.TransactionCache(
            client.aio,
            team_id=team_id,
            checkpoint=checkpoint,
            fire_on_initial_list=fire_on_initial_list,
            handler_errors=handler_errors,
        )

    def on(self, name: str, predicate: Predicate, handler: SyncHandler) -> SyncHandler:
        async def in_thread(call: HandlerCall) -> None:
            await asyncio.to_thread(handler, call)

        self.aio.on(name, predicate, in_thread)
        return handler

    def on_redraw_available(self, handler: SyncHandler) -> SyncHandler:
        return self.on("redraw_available", lambda t: t.redraw_available, handler)

    def on_completed(self, handler: SyncHandler) -> SyncHandler:
        return self.on("completed", lambda t: t.status == pb.TRANSACTION_STATUS_COMPLETED, handler)

    def on_cancelled(self, handler: SyncHandler) -> SyncHandler:
        return self.on("cancelled", lambda t: t.status == pb.TRANSACTION_STATUS_CANCELLED, handler)

    @property
    def revision(self) -> int:
        return self.aio.revision

    def start(self) -> None:
        self._client._run(self.aio.start())

    def close(self) -> None:
        self._client._run(self.aio.close())

    def __enter__(self) -> TransactionCache:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._client._run(self.aio.__aexit__(exc_type, exc, tb))

    def peek(
        self, *, transaction_id: str | None = None, order_id: str | None = None
    ) -> pb.Transaction | None:
        return self.aio.peek(transaction_id=transaction_id, order_id=order_id)

    def get(
        self,
        *,
        transaction_id: str | None = None,
        order_id: str | None = None,
        min_revision: int = 0,
        timeout: float | None = None,
    ) -> pb.Transaction | None:
        return self._client._run(
            self.aio.get(
                transaction_id=transaction_id,
                order_id=order_id,
                min_revision=min_revision,
                timeout=timeout,
            )
        )

    def wait_for(
        self,
        order_id: str | None = None,
        predicate: Predicate = lambda t: True,
        timeout: float | None = None,
        *,
        transaction_id: str | None = None,
    ) -> pb.Transaction:
        return self._client._run(
            self.aio.wait_for(order_id, predicate, timeout, transaction_id=transaction_id)
        )

    def transactions(
        self, status: pb.TransactionStatus.ValueType | None = None
    ) -> list[pb.Transaction]:
        return self.aio.transactions(status)
