"""`TransactionClient`: the service's calls with deadlines, retries and typed errors."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from transaction_client.connection import TLS, channel_options, open_channel, token_metadata
from transaction_client.errors import TransactionServiceError, from_rpc_error
from transaction_client.multiplex import WatchStreams
from transaction_client.watch import (
    OnCompacted,
    Progress,
    Snapshot,
    Watch,
    WatchItem,
    WatchRequest,
)
from transactions.v1 import transactions_pb2 as pb
from transactions.v1 import transactions_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from transaction_client.checkpoint import Checkpoint

Request = TypeVar("Request")
Response = TypeVar("Response")

# The service answers at most this many transactions per page.
MAX_PAGE_SIZE = 500
# ... and at most this many entries of a transaction's history per page.
MAX_HISTORY_PAGE_SIZE = 1000
RECONCILE_TIMEOUT = 120.0


def lookup(transaction_id: str | None, order_id: str | None) -> dict[str, str]:
    """The `lookup` oneof of a request: exactly one of the two ids."""
    if (transaction_id is None) == (order_id is None):
        raise ValueError("give exactly one of transaction_id and order_id")
    return (
        {"transaction_id": transaction_id}
        if transaction_id is not None
        else {"order_id": order_id or ""}
    )


def _get_request(transaction_id: str | None, order_id: str | None) -> pb.GetTransactionRequest:
    """A GetTransactionRequest by one of the two ids (GetTransactionRequest's constructor also
    takes a revision, so the lookup dict cannot be passed to it as keywords)."""
    ids = lookup(transaction_id, order_id)
    request = pb.GetTransactionRequest()
    if "transaction_id" in ids:
        request.transaction_id = ids["transaction_id"]
    else:
        request.order_id = ids["order_id"]
    return request


def timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC))
    return stamp


class TransactionClient:
    """An asyncio client of the transaction service.

    `target` is a gRPC target: `host:port`, or several replicas as
    `ipv4:10.0.0.1:50051,10.0.0.2:50051` with `load_balancing="round_robin"`. `token` is the
    bearer token (default: $TRANSACTION_SERVICE_TOKEN); `tls` is `True` (trust the system's
    CAs) or a `TLS` (a CA of your own, a client certificate). Unary calls get `timeout` seconds
    by default, retries included: UNAVAILABLE is retried with jittered exponential backoff
    (`retry_attempts` attempts at most, gRPC caps them at 5). `progress_interval` is the
    server's watch progress interval (`watch_progress_seconds`, 10 s by default): a watch that
    hears nothing for three of them reconnects. With `watches_per_stream` N > 0, watches share
    `Watch` streams, N a stream (at most the server's `watch_max_per_stream`, 1,000 by default),
    instead of a stream each: a stream costs the server about ten times what a watch on a
    shared one does (docs/performance.md); see `transaction_client.multiplex`.

    Use it as `async with TransactionClient(...) as client:`, or call `await client.close()`.
    The channel opens at the first call, in the running event loop.
    """

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
        if watches_per_stream < 0:
            raise ValueError("watches_per_stream must not be negative")
        self.target = target
        self.tls: TLS | None = TLS() if tls is True else (tls or None)
        self.timeout = timeout
        self.progress_interval = progress_interval
        self.metadata = token_metadata(token)
        self._options = _options(
            retry_attempts,
            keepalive_seconds,
            keepalive_timeout_seconds,
            load_balancing,
            self.tls.server_name if self.tls else None,
            channel_options,
        )
        if self.tls is not None:
            self.tls.credentials()  # an unreadable file is a mistake to report now, not later
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.TransactionServiceAsyncStub | None = None
        # How often `close` was called: a watch iterating across a close ends (watch.py).
        self.closes = 0
        self.watch_streams = WatchStreams(self, watches_per_stream) if watches_per_stream else None

    # -- plumbing, also for calls this class does not wrap yet ----------------------------------

    @property
    def channel(self) -> grpc.aio.Channel:
        """The channel (opened on first use, in the running event loop)."""
        if self._channel is None:
            self._channel = open_channel(self.target, self.tls, self._options)
        return self._channel

    @property
    def stub(self) -> pb_grpc.TransactionServiceAsyncStub:
        """The typed generated stub on this client's channel. Pass `metadata=client.metadata`;
        `client.call()` does that, adds the deadline and turns errors into typed ones."""
        if self._stub is None:
            self._stub = pb_grpc.TransactionServiceStub(self.channel)
        return self._stub

    def error(self, exc: grpc.RpcError) -> TransactionServiceError:
        """The typed error for a failed call of this client."""
        return from_rpc_error(exc, self.target, tls=self.tls is not None)

    async def call(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[Request, Response],
        request: Request,
        *,
        timeout: float | None = None,
    ) -> Response:
        """Call a unary method of `stub` with this client's token, deadline, retries and typed
        errors: `await client.call(client.stub.GetTransaction, request)`."""
        try:
            return await method(request, metadata=self.metadata, timeout=timeout or self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise self.error(exc) from None

    async def close(self) -> None:
        """Close the channel. Watches being iterated end (each saves its position first);
        the client opens a new channel if it is used again."""
        self.closes += 1
        if self.watch_streams is not None:
            self.watch_streams.close()
        if self._channel is not None:
            await self._channel.close()
            self._channel, self._stub = None, None

    async def __aenter__(self) -> TransactionClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- reads ----------------------------------------------------------------------------------

    async def get_transaction(
        self,
        *,
        transaction_id: str | None = None,
        order_id: str | None = None,
        revision: int | None = None,
        timeout: float | None = None,
    ) -> pb.GetTransactionResponse:
        """A transaction's state (`.transaction`) and the head revision of the read
        (`.revision`), by its id or one of its orders'. NotFound if no webhook mentioned it.
        With `revision`, its state as it was at that revision (RevisionCompacted once the
        change log no longer holds it)."""
        request = _get_request(transaction_id, order_id)
        if revision is not None:
            request.revision = revision
        return await self.call(self.stub.GetTransaction, request, timeout=timeout)

    def list_transaction_events(
        self,
        *,
        transaction_id: str | None = None,
        order_id: str | None = None,
        include_bodies: bool = False,
        page_size: int = MAX_HISTORY_PAGE_SIZE,
        timeout: float | None = None,
    ) -> TransactionHistory:
        """Why a transaction is in its state: every delivery the service took in for it, oldest
        first, with its outcome and the reason in words (a `TransactionEvent` each), paging by
        itself. `include_bodies` needs an ingest token (PermissionDenied otherwise)."""
        lookup(transaction_id, order_id)  # exactly one
        request = pb.ListTransactionEventsRequest(
            include_bodies=include_bodies, page_size=page_size
        )
        if transaction_id is not None:
            request.transaction_id = transaction_id
        else:
            request.order_id = order_id or ""
        return TransactionHistory(self, request, timeout)

    def list_transactions(
        self,
        *,
        status: pb.TransactionStatus.ValueType = pb.TRANSACTION_STATUS_UNSPECIFIED,
        team_id: str = "",
        user_id: str = "",
        updated_since: datetime | None = None,
        page_size: int = MAX_PAGE_SIZE,
        timeout: float | None = None,
    ) -> TransactionList:
        """Every matching transaction, oldest change first, paging by itself (each page is a call
        of its own, with its own deadline and retries). A transaction that changes while the pages
        are read comes again later; see `TransactionList`."""
        request = pb.ListTransactionsRequest(
            status=status, team_id=team_id, user_id=user_id, page_size=page_size
        )
        if updated_since is not None:
            request.updated_since.CopyFrom(timestamp(updated_since))
        return TransactionList(self, request, timeout)

    async def batch_get_transactions(
        self,
        *,
        transaction_ids: Sequence[str] = (),
        order_ids: Sequence[str] = (),
        timeout: float | None = None,
    ) -> pb.BatchGetTransactionsResponse:
        """Up to 500 transactions read in one snapshot: one result per id, transaction ids first,
        then order ids, in the order given (`found` false for an unknown one)."""
        lookups = [pb.GetTransactionRequest(transaction_id=i) for i in transaction_ids]
        lookups += [pb.GetTransactionRequest(order_id=i) for i in order_ids]
        request = pb.BatchGetTransactionsRequest(lookups=lookups)
        return await self.call(self.stub.BatchGetTransactions, request, timeout=timeout)

    async def get_transaction_results(
        self,
        *,
        transaction_id: str | None = None,
        order_id: str | None = None,
        timeout: float | None = None,
    ) -> pb.GetTransactionResultsResponse:
        """A completed transaction's combined results (FailedPrecondition RESULTS_NOT_READY
        before they are fetched)."""
        request = pb.GetTransactionResultsRequest(**lookup(transaction_id, order_id))
        return await self.call(self.stub.GetTransactionResults, request, timeout=timeout)

    # -- writes ---------------------------------------------------------------------------------

    async def ingest_event(
        self,
        body: Mapping[str, Any] | str | bytes,
        *,
        event_id: str = "",
        timeout: float | None = None,
    ) -> pb.IngestEventResponse:
        """Ingest one webhook body (a JSON object, or its raw text, sent byte for byte) under
        its `svix-id` (`event_id`; empty: the server derives one from the body). Returns once
        the event is committed. Retried on UNAVAILABLE like every call: the same event id is
        never applied twice (a retry that finds it committed answers DUPLICATE)."""
        if isinstance(body, bytes):
            body = body.decode()
        elif not isinstance(body, str):
            body = json.dumps(body, ensure_ascii=False)
        request = pb.IngestEventRequest(event_id=event_id, payload_json=body)
        return await self.call(self.stub.IngestEvent, request, timeout=timeout)

    async def reconcile_transaction(
        self,
        *,
        transaction_id: str | None = None,
        order_id: str | None = None,
        timeout: float | None = RECONCILE_TIMEOUT,
    ) -> pb.ReconcileTransactionResponse:
        """Have the server read one transaction from Junction's API and take in what it says."""
        request = pb.ReconcileTransactionRequest(**lookup(transaction_id, order_id))
        return await self.call(self.stub.ReconcileTransaction, request, timeout=timeout)

    async def backfill_transactions(
        self, *, since: datetime, until: datetime | None = None, resend: bool = False
    ) -> AsyncIterator[pb.BackfillTransactionsResponse]:
        """Reconcile every transaction Junction updated in the window; one message per
        transaction done, the last with `done` set. Stopping the iteration stops the back-fill."""
        request = pb.BackfillTransactionsRequest(since=timestamp(since), resend=resend)
        if until is not None:
            request.until.CopyFrom(timestamp(until))
        call = self.stub.BackfillTransactions(request, metadata=self.metadata)
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as exc:
            raise self.error(exc) from None
        finally:
            call.cancel()

    # -- watches --------------------------------------------------------------------------------

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
    ) -> Watch[WatchItem]: ...

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
    ) -> Watch[WatchItem | Progress]: ...

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
    ) -> Watch[WatchItem] | Watch[WatchItem | Progress]:
        """The changes of one transaction, by its id or one of its orders' (it need not exist
        yet), as an async iterator that resumes by itself; see `Watch`. Without
        `start_revision` (and without a saved checkpoint) the first item is a `Snapshot` of the
        current state, if the transaction exists."""
        key = lookup(transaction_id, order_id)
        return self.open_watch(
            WatchRequest(lookup=next(iter(key.items()))),
            start_revision=start_revision,
            checkpoint=checkpoint,
            on_compacted=on_compacted,
            progress=progress,
            buffer_size=buffer_size,
            connect_timeout=connect_timeout,
            silence_timeout=silence_timeout,
        )

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
    ) -> Watch[WatchItem]: ...

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
    ) -> Watch[WatchItem | Progress]: ...

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
    ) -> Watch[WatchItem] | Watch[WatchItem | Progress]:
        """The changes of every transaction (only those with one of `kinds`, of `team_id`), as
        an async iterator that resumes by itself; see `Watch`. Without `start_revision` (and
        without a saved checkpoint) it starts with the changes after the head revision."""
        return self.open_watch(
            WatchRequest(kinds=tuple(kinds), team_id=team_id),
            start_revision=start_revision,
            checkpoint=checkpoint,
            on_compacted=on_compacted,
            progress=progress,
            buffer_size=buffer_size,
            connect_timeout=connect_timeout,
            silence_timeout=silence_timeout,
        )

    def open_watch(
        self,
        request: WatchRequest,
        *,
        start_revision: int | None,
        checkpoint: Checkpoint | None,
        on_compacted: OnCompacted,
        progress: bool,
        buffer_size: int,
        connect_timeout: float | None,
        silence_timeout: float | None,
    ) -> Watch[Any]:
        """The watch that `watch_transaction` and `watch_transactions` make, for a request given
        as a `WatchRequest` (the command line uses it; its items are typed loosely)."""
        return Watch(
            self,
            request,
            start_revision=start_revision,
            checkpoint=checkpoint,
            on_compacted=on_compacted,
            progress=progress,
            buffer_size=buffer_size,
            connect_timeout=connect_timeout,
            silence_timeout=silence_timeout,
        )


class TransactionList:
    """The transactions of a `list_transactions` call, read page by page as they are iterated.

    `revision` is the head revision the first page was read at (0 before it is read): every
    transaction iterated is at least as new as it was then, so a cache filled from the list and
    then watching from `revision` misses nothing. A transaction that changes while the pages are
    read moves to the end of the list and comes a second time, newer."""

    def __init__(
        self, client: TransactionClient, request: pb.ListTransactionsRequest, timeout: float | None
    ) -> None:
        self._client = client
        self._request = request
        self._timeout = timeout
        self.revision = 0

    async def pages(self) -> AsyncIterator[pb.ListTransactionsResponse]:
        request = pb.ListTransactionsRequest()
        request.CopyFrom(self._request)
        while True:
            page = await self._client.call(
                self._client.stub.ListTransactions, request, timeout=self._timeout
            )
            if not self.revision:
                self.revision = page.revision
            yield page
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    async def __aiter__(self) -> AsyncIterator[pb.Transaction]:
        async for page in self.pages():
            for transaction in page.transactions:
                yield transaction


class TransactionHistory:
    """The entries of a `list_transaction_events` call, read page by page as they are
    iterated. `transaction_id` (the transaction the lookup found) and `revision` (the head
    revision of the first page) are set once the first page is read."""

    def __init__(
        self,
        client: TransactionClient,
        request: pb.ListTransactionEventsRequest,
        timeout: float | None,
    ) -> None:
        self._client = client
        self._request = request
        self._timeout = timeout
        self.transaction_id = ""
        self.revision = 0

    async def pages(self) -> AsyncIterator[pb.ListTransactionEventsResponse]:
        request = pb.ListTransactionEventsRequest()
        request.CopyFrom(self._request)
        while True:
            page = await self._client.call(
                self._client.stub.ListTransactionEvents, request, timeout=self._timeout
            )
            if not self.revision:
                self.transaction_id, self.revision = page.transaction_id, page.revision
            yield page
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    async def __aiter__(self) -> AsyncIterator[pb.TransactionEvent]:
        async for page in self.pages():
            for event in page.events:
                yield event


def _options(
    attempts: int,
    keepalive: float,
    keepalive_timeout: float,
    load_balancing: str | None,
    server_name: str | None,
    extra: Sequence[tuple[str, Any]],
) -> list[tuple[str, Any]]:
    return channel_options(
        attempts=attempts,
        keepalive_seconds=keepalive,
        keepalive_timeout_seconds=keepalive_timeout,
        load_balancing=load_balancing,
        server_name=server_name,
        extra=extra,
    )


__all__ = ["Snapshot", "TransactionClient", "TransactionHistory", "TransactionList"]
