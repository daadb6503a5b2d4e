"""The gRPC servicer: translate requests, delegate, translate answers. No business logic here."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import itertools
import json
import logging
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import aclosing
from functools import partial
from typing import Any

import grpc

from transaction_service.api.access import current_call
from transaction_service.api.convert import (
    OUTCOME_TO_PB,
    backfill_progress_to_pb,
    from_timestamp,
    history_event_to_pb,
    kind_from_pb,
    reconciled_to_pb,
    results_to_pb,
    status_from_pb,
    struct_to_dict,
)
from transaction_service.api.errors import (
    Context,
    StatusOnError,
    UndecodableRequest,
    grpc_errors,
    ingest_error,
    status_for,
    tolerant_deserializer,
)
from transaction_service.api.multiplex import (
    TRANSACTION_FIELD,
    TRANSACTIONS_FIELD,
    WatchStream,
    canceled,
    framed,
    internal_status,
)
from transaction_service.api.window import OrderedWindow
from transaction_service.api.wire import (
    ChangeEncoder,
    Once,
    TransactionEncoder,
    field,
    passthrough_serializer,
    string_field,
    varint_field,
)
from transaction_service.app import App
from transaction_service.auth import BearerTokens, Role
from transaction_service.domain.payload import DOT_SEGMENT_MESSAGE, DOT_SEGMENTS
from transaction_service.errors import (
    DeadlinePassed,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Overloaded,
    Reason,
    ServiceError,
    TooLarge,
    Unavailable,
    echo,
)
from transaction_service.store.base import (
    ChangeRecord,
    ListFilter,
    Results,
    TransactionReads,
    TransactionSnapshot,
)
from transaction_service.usecases.admission import Flow, Lane
from transaction_service.usecases.history import (
    HistoryStore,
    Lookup,
    state_at,
    transaction_history,
)
from transaction_service.usecases.ingest import (
    Delivery,
    IngestorStopped,
    IngestResult,
    decode_delivery,
)
from transaction_service.usecases.results import results_pdf, stored_results
from transaction_service.usecases.watch import Batch, Current, Progress, WatchEvent, WatchFilter
from transactions.v1 import transactions_pb2 as pb
from transactions.v1 import transactions_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
# Entries of one ListTransactionEvents page (documented in the proto and docs/limits.md).
DEFAULT_HISTORY_PAGE_SIZE = 100
MAX_HISTORY_PAGE_SIZE = 1000
# Field numbers in the watch responses: `change` (the same in both), and in each the
# ChangeBatch `changes`, `current` and `progress`.
_CHANGE_FIELD = pb.WatchTransactionsResponse.DESCRIPTOR.fields_by_name["change"].number
_FEED_BATCH_FIELD = pb.WatchTransactionsResponse.DESCRIPTOR.fields_by_name["changes"].number
_ONE_BATCH_FIELD = pb.WatchTransactionResponse.DESCRIPTOR.fields_by_name["changes"].number
_CURRENT_FIELD = pb.WatchTransactionResponse.DESCRIPTOR.fields_by_name["current"].number
_ONE_PROGRESS_FIELD = pb.WatchTransactionResponse.DESCRIPTOR.fields_by_name["progress"].number
_FEED_PROGRESS_FIELD = pb.WatchTransactionsResponse.DESCRIPTOR.fields_by_name["progress"].number
# Lookups in one BatchGetTransactions call (documented in the proto).
MAX_BATCH_LOOKUPS = 500
# A BatchGetTransactionsResult on the wire, as an element of the response's `results`: not found
# (an empty message), and the start of a found one (`found` true; `transaction` follows).
_NOT_FOUND = field(1, b"")
_FOUND = varint_field(1, 1)
# Deliveries in one IngestEvents request (documented in the proto): a request is at most
# max_message_bytes anyway; this bounds what one request holds decoded and in the queue.
MAX_DELIVERIES_PER_REQUEST = 500
# The `results` field of an IngestEventResponse answering a request of several deliveries.
_RESULTS_FIELD = pb.IngestEventResponse.DESCRIPTOR.fields_by_name["results"].number


class TransactionServicer(pb_grpc.TransactionServiceServicer):
    """The API. A method answers with the response message, or with its bytes already encoded
    (`bytes`: built from cached parts, api/wire.py; watch messages in a `Once`), which
    `passthrough_serializer` sends as they are. The generated base declares messages only: the
    methods that answer with bytes override it on purpose (`type: ignore[override]`)."""

    def __init__(self, app: App) -> None:
        self._app = app
        # The roles it reads (see store/base.py); it never writes but through the use cases.
        self._reads: TransactionReads = app.store
        self._results: Results = app.store
        self._history: HistoryStore = app.store
        self._hub = app.hub
        self._max_body_bytes = app.settings.max_body_bytes
        self._limits = app.limits
        self._encoder = ChangeEncoder(_CHANGE_FIELD)
        self._transactions = TransactionEncoder()
        self._metrics = app.metrics
        # Who may read bodies (api/gateway.py decides who may call at all).
        self._tokens = BearerTokens(app.settings.ingest_tokens, app.settings.read_tokens)
        # A batch message stays well inside the largest message gRPC may send.
        self._batch_bytes = app.settings.max_message_bytes // 2
        # Names IngestEvents streams apart (each is a flow of the ingest queue).
        self._streams = itertools.count(1)
        # The windows of the IngestEvents streams open: told to stop reading when shutdown
        # begins, so that a stream waiting for a request that does not come ends at once.
        self._windows: weakref.WeakSet[OrderedWindow[Any, Any]] = weakref.WeakSet()
        app.on_shutdown.append(self._stop_reading_streams)
        # The Watch streams open: told when shutdown begins (the hub ends their watches).
        self._watch_streams: set[WatchStream] = set()
        app.on_shutdown.append(self._shut_down_watch_streams)

    @grpc_errors
    async def IngestEvent(  # type: ignore[override]
        self, request: pb.IngestEventRequest, context: Context
    ) -> bytes:
        if request.deliveries:
            raise InvalidArgument(
                [
                    FieldViolation(
                        "deliveries",
                        "IngestEvent takes one delivery (event_id and a body); send several "
                        "deliveries per request in an IngestEvents stream",
                    )
                ]
            )
        if self._app.stopping:
            # A call arriving while the server drains is new work: refused, as new webhooks are,
            # so that the drain ends (api/drain.py).
            raise IngestorStopped
        # Each client connection is a flow of the unary lane; its deadline bounds the wait.
        result = await self._app.ingestor.ingest(
            self._decode(request),
            flow=Flow(Lane.UNARY, context.peer()),
            time_remaining=context.time_remaining(),
        )
        return self._ingest_response(result)

    def _ingest_response(self, result: IngestResult) -> bytes:
        """IngestEventResponse, built from the transaction's cached bytes (api/wire.py)."""
        transaction = result.transaction
        return (
            varint_field(1, OUTCOME_TO_PB[result.outcome])
            + (field(2, self._transactions.encode(transaction)) if transaction else b"")
            + varint_field(3, result.revision)
            + string_field(4, result.event_id)
        )

    def _decode(self, request: pb.IngestEventRequest) -> Delivery:
        body = request.WhichOneof("body")
        return decode_delivery(
            request.event_id,
            payload_json=request.payload_json if body == "payload_json" else None,
            payload=struct_to_dict(request.payload) if body == "payload" else None,
            max_body_bytes=self._max_body_bytes,
            source="grpc",
            limits=self._limits,
        )

    @grpc_errors
    async def GetTransaction(self, request: pb.GetTransactionRequest, context: Context) -> bytes:  # type: ignore[override]
        lookup = request.WhichOneof("lookup")
        violations = _lookup_violations(request)
        if violations:
            raise InvalidArgument(violations)
        assert lookup is not None
        key = getattr(request, lookup)
        snapshot: TransactionSnapshot | None
        if request.HasField("revision"):
            if request.revision < 0:
                raise InvalidArgument([FieldViolation("revision", "must not be negative")])
            found = Lookup(key, by_order=lookup == "order_id")
            snapshot = await state_at(self._history, found, request.revision)
            head = await self._history.head_revision()
        elif lookup == "transaction_id":
            snapshot, head = await self._reads.get(key)
        else:
            snapshot, head = await self._reads.get_by_order(key)
        if snapshot is None:
            raise NotFound(f"no transaction known for {lookup} {echo(key)}")
        # GetTransactionResponse, built from the transaction's cached bytes (api/wire.py): a
        # revision names one state of one transaction, as-of reads included.
        return field(1, self._transactions.encode(snapshot)) + varint_field(2, head)

    @grpc_errors
    async def ListTransactions(  # type: ignore[override]
        self, request: pb.ListTransactionsRequest, context: Context
    ) -> bytes:
        violations = []
        try:
            status = status_from_pb(request.status)
        except KeyError:
            status = None
            violations.append(FieldViolation("status", f"unknown status {request.status}"))
        if not 0 <= request.page_size <= MAX_PAGE_SIZE:
            violations.append(FieldViolation("page_size", f"must be 0 to {MAX_PAGE_SIZE}"))
        updated_since = None
        if request.HasField("updated_since"):
            try:
                updated_since = from_timestamp(request.updated_since)
            except ValueError as exc:
                violations.append(FieldViolation("updated_since", str(exc)))
        where = ListFilter(
            status=status,
            team_id=request.team_id,
            user_id=request.user_id,
            updated_since=updated_since,
        )
        after = 0
        if request.page_token:
            try:
                after = _decode_page_token(request.page_token, _filter_fingerprint(where))
            except ValueError as exc:
                violations.append(FieldViolation("page_token", str(exc)))
        if violations:
            raise InvalidArgument(violations)
        limit = request.page_size or DEFAULT_PAGE_SIZE
        # One extra row tells whether another page follows.
        snapshots, head = await self._reads.list_transactions(where, after, limit + 1)
        page = snapshots[:limit]
        next_token = (
            _encode_page_token(page[-1].revision, _filter_fingerprint(where))
            if len(snapshots) > limit
            else ""
        )
        # ListTransactionsResponse, built from each transaction's cached bytes (api/wire.py).
        return (
            b"".join(field(1, self._transactions.encode(s)) for s in page)
            + string_field(2, next_token)
            + varint_field(3, head)
        )

    async def WatchTransaction(  # type: ignore[override]
        self, request: pb.WatchTransactionRequest, context: Context
    ) -> AsyncIterator[Once]:
        async with StatusOnError(request, context, "WatchTransaction"):
            where, current = self._one_watch(request)
            # Each message goes out in a `Once` (api/wire.py): gRPC and every layer between keep
            # the last one yielded while the watch waits, thousands of watches at once.
            async for event in self._watch(where, request, current):
                if isinstance(event, Current):
                    yield Once(self._current(event))
                elif isinstance(event, Progress):
                    yield Once(_progress(event, _ONE_PROGRESS_FIELD))
                else:
                    # The loop's variable outlives the loop: a Once, emptied once sent.
                    for message in map(Once, self._changes(event, _ONE_BATCH_FIELD)):
                        yield message
                # Not kept while the watch waits (thousands of watches wait at once).
                del event

    async def WatchTransactions(  # type: ignore[override]
        self, request: pb.WatchTransactionsRequest, context: Context
    ) -> AsyncIterator[Once]:
        async with StatusOnError(request, context, "WatchTransactions"):
            where = _feed_filter(request)
            async for event in self._watch(where, request, None):
                if isinstance(event, Progress):
                    yield Once(_progress(event, _FEED_PROGRESS_FIELD))
                elif isinstance(event, ChangeRecord | Batch):
                    # The loop's variable outlives the loop: a Once, emptied once sent.
                    for message in map(Once, self._changes(event, _FEED_BATCH_FIELD)):
                        yield message
                del event

    async def Watch(  # type: ignore[override]
        self, requests: AsyncIterator[pb.WatchRequest | UndecodableRequest], context: Context
    ) -> AsyncIterator[Once]:
        """Many watches on one stream (api/multiplex.py): each runs the hub's watch exactly as
        WatchTransaction or WatchTransactions does, its messages framed with its id."""
        async with StatusOnError(None, context, "Watch"):
            if self._app.stopping:
                raise _watch_stream_shutting_down()
            settings = self._app.settings
            stream = WatchStream(
                max_watches=settings.watch_max_per_stream,
                creates_per_second=settings.watch_creates_per_second,
            )
            reader = asyncio.get_running_loop().create_task(
                self._read_watch_requests(requests, stream), name="watch-requests"
            )
            stream.reader = reader
            self._watch_streams.add(stream)
            try:
                async for data in stream.messages(_watch_stream_shutting_down):
                    yield Once(data)
                    del data
            finally:
                self._watch_streams.discard(stream)
                reader.cancel()
                stream.close()

    async def _read_watch_requests(
        self, requests: AsyncIterator[pb.WatchRequest | UndecodableRequest], stream: WatchStream
    ) -> None:
        """A Watch stream's requests, each done at once; the next is read only while the
        stream's buffer has room."""
        try:
            async for request in requests:
                if isinstance(request, UndecodableRequest):
                    stream.fail(request.error)
                    return
                which = request.WhichOneof("request")
                if which == "cancel":
                    stream.cancel(request.cancel.watch_id)
                elif which == "create":
                    await stream.create_budget()
                    self._create_watch(stream, request.create)
                else:
                    stream.fail(
                        InvalidArgument([FieldViolation("request", "set create or cancel")])
                    )
                    return
                del request
                await stream.room()
        except grpc.aio.BaseError:
            pass  # the call ended (the handler ends with it)
        except Exception as exc:  # a fault of ours: the stream ends INTERNAL, logged
            stream.fail(exc)
            return
        stream.half_closed()

    def _create_watch(self, stream: WatchStream, create: pb.WatchCreateRequest) -> None:
        """Open a watch of a Watch stream, or answer its create with `canceled` (a refusal), or
        end the stream (a duplicate id)."""
        watch_id = create.watch_id
        if watch_id in stream.watches:
            stream.fail(
                InvalidArgument(
                    [
                        FieldViolation(
                            "create.watch_id",
                            f"watch {watch_id} is open on this stream already: cancel it and "
                            "wait for its `canceled`, or choose another id",
                        )
                    ]
                )
            )
            return
        target = create.WhichOneof("target")
        try:
            if watch_id <= 0:
                raise InvalidArgument([FieldViolation("create.watch_id", "must be greater than 0")])
            if target is None:
                raise InvalidArgument(
                    [FieldViolation("create.target", "set transaction or transactions")]
                )
            request: pb.WatchTransactionRequest | pb.WatchTransactionsRequest
            current = None
            try:
                if target == "transaction":
                    request = create.transaction
                    where, current = self._one_watch(request)
                else:
                    request = create.transactions
                    where = _feed_filter(request)
            except InvalidArgument as exc:
                raise InvalidArgument(
                    [
                        FieldViolation(f"create.{target}.{v.field}", v.description)
                        for v in exc.violations
                    ]
                ) from None
            if len(stream.watches) >= stream.max_watches:
                raise Overloaded(
                    f"this stream has {stream.max_watches} watches open, the most it may have: "
                    "cancel one, or open another stream",
                    reason=Reason.TOO_MANY_WATCHES,
                    metadata={"max_watches": str(stream.max_watches)},
                )
        except ServiceError as exc:
            stream.push(canceled(watch_id, status_for(exc)))
            return
        start = request.start_revision if request.HasField("start_revision") else None
        events = self._hub.watch(where, start, current=current, batch=request.batch_changes)
        stream.start(watch_id, self._run_watch(stream, watch_id, target == "transaction", events))

    async def _run_watch(
        self,
        stream: WatchStream,
        watch_id: int,
        one: bool,
        events: AsyncGenerator[WatchEvent, None],
    ) -> None:
        """One watch of a Watch stream: its messages into the stream's buffer, then its end."""
        response = TRANSACTION_FIELD if one else TRANSACTIONS_FIELD
        batch = _ONE_BATCH_FIELD if one else _FEED_BATCH_FIELD
        progress = _ONE_PROGRESS_FIELD if one else _FEED_PROGRESS_FIELD
        # Nothing made here is kept while the watch waits (a thousand watches wait at once):
        # the status only once it ended.
        status = None
        try:
            async for event in events:
                # Each message is made once the buffer has room for it, and queued at once: a
                # watch that waits for room holds its event, not the event's encoding twice
                # over (a batch's message is up to half of max_message_bytes; a thousand
                # batched feeds replaying on a stream not read held 780 MB).
                if isinstance(event, Current):
                    await stream.room()
                    stream.push(framed(watch_id, response, self._current(event)))
                elif isinstance(event, Progress):
                    await stream.room()
                    stream.push(framed(watch_id, response, _progress(event, progress)))
                else:
                    messages = self._changes(event, batch)
                    while True:
                        await stream.room()
                        message = next(messages, None)
                        if message is None:
                            break
                        stream.push(framed(watch_id, response, message))
                    del messages
                del event
        except ServiceError as exc:
            status = status_for(exc)
        except Exception:
            log.exception("unexpected error in a watch of a Watch stream")
            status = internal_status()
        finally:
            # Cancelled while it waited for room: the hub's watch is suspended at a yield.
            await events.aclose()
        stream.ended(watch_id, status)

    @grpc_errors
    async def ReconcileTransaction(
        self, request: pb.ReconcileTransactionRequest, context: Context
    ) -> pb.ReconcileTransactionResponse:
        key, lookup = _lookup(request)
        reconciled = await self._app.reconciler.reconcile(**{lookup: key}, trigger="rpc")
        return reconciled_to_pb(reconciled)

    @grpc_errors
    async def BackfillTransactions(
        self, request: pb.BackfillTransactionsRequest, context: Context
    ) -> AsyncIterator[pb.BackfillTransactionsResponse]:
        violations = []
        since = until = None
        if not request.HasField("since"):
            violations.append(FieldViolation("since", "required: the start of the window"))
        for name in ("since", "until"):
            if request.HasField(name):
                try:
                    value = from_timestamp(getattr(request, name))
                except ValueError as exc:
                    violations.append(FieldViolation(name, str(exc)))
                    continue
                since, until = (value, until) if name == "since" else (since, value)
        if since is not None and until is not None and until < since:
            violations.append(FieldViolation("until", "must not be before since"))
        if violations:
            raise InvalidArgument(violations)
        assert since is not None
        if request.resend:
            resent = await self._app.reconciler.resend(since, until)
            yield pb.BackfillTransactionsResponse(orders_resent=resent, done=True)
            return
        async for progress in self._app.reconciler.backfill(since, until):
            if self._app.stopping:
                raise Unavailable(
                    "the server is shutting down; run the back-fill again (what it took in is "
                    "kept, and taking it in again changes nothing)",
                    reason=Reason.SHUTTING_DOWN,
                )
            yield backfill_progress_to_pb(progress)

    @grpc_errors
    async def GetTransactionResults(
        self, request: pb.GetTransactionResultsRequest, context: Context
    ) -> pb.GetTransactionResultsResponse:
        snapshot = await self._find(request)
        return results_to_pb(await stored_results(self._results, snapshot.view))

    @grpc_errors
    async def GetTransactionResultsPdf(
        self, request: pb.GetTransactionResultsPdfRequest, context: Context
    ) -> AsyncIterator[pb.GetTransactionResultsPdfResponse]:
        # Only a transaction the service knows may cause a request to Junction: NOT_FOUND first.
        snapshot = await self._find(request)
        settings = self._app.settings
        # The whole call, fetching and sending, has a deadline of the server's own: a caller
        # that stops reading would otherwise keep its place in the PDF budget (and the PDF in
        # memory) for as long as its connection lives. Checked before each message: a caller
        # that reads gets DEADLINE_EXCEEDED then (after what it was sent). One that has not
        # taken the message sent before by twice the deadline is not reading at all (HTTP/2
        # lets a client buffer a few MiB: a slow reader drains them well within that): the
        # call's task is cancelled, which closes the PDF's iterator and gives its place back.
        # grpc.aio cannot end a call whose message waits for flow control, so that caller is
        # told nothing; the access line says DEADLINE_EXCEEDED.
        seconds = settings.results_pdf_call_seconds
        loop = asyncio.get_running_loop()
        ends = loop.time() + seconds
        task = asyncio.current_task()
        assert task is not None
        call = current_call.get()

        def expire() -> None:
            if call is not None:
                call.deadline = time.monotonic()
            task.cancel()

        too_slow = DeadlinePassed(
            f"the results PDF was not fetched and read within {seconds:g} s "
            "(TRANSACTION_SERVICE_RESULTS_PDF_CALL_SECONDS); ask again, reading faster"
        )
        stalled = loop.call_later(2 * seconds, expire)
        try:
            async with aclosing(
                results_pdf(
                    self._app.junction,
                    snapshot.view,
                    self._app.pdf_budget,
                    max_bytes=settings.results_pdf_max_bytes,
                )
            ) as chunks:
                while True:
                    if loop.time() >= ends:
                        raise too_slow
                    try:
                        async with asyncio.timeout_at(ends):
                            chunk = await anext(chunks)
                    except StopAsyncIteration:
                        return
                    except TimeoutError:
                        raise too_slow from None
                    yield pb.GetTransactionResultsPdfResponse(chunk=chunk)
        finally:
            stalled.cancel()

    async def _find(self, request: _LookupRequest) -> TransactionSnapshot:
        """The transaction a request's lookup names; NotFound if no webhook mentioned it."""
        key, lookup = _lookup(request)
        if lookup == "transaction_id":
            snapshot, _ = await self._reads.get(key)
        else:
            snapshot, _ = await self._reads.get_by_order(key)
        if snapshot is None:
            raise NotFound(f"no transaction known for {lookup} {echo(key)}")
        return snapshot

    @grpc_errors
    async def IngestEvents(  # type: ignore[override]
        self,
        requests: AsyncIterator[pb.IngestEventRequest | UndecodableRequest],
        context: Context,
    ) -> AsyncIterator[pb.IngestEventResponse | bytes]:
        settings = self._app.settings
        # Each stream is a flow of the stream lane: it waits for room in its share of the
        # ingest queue (its window then stops reading) instead of being refused.
        flow = Flow(Lane.STREAM, f"stream-{next(self._streams)}")
        window = OrderedWindow(
            requests,
            partial(self._ingest_one, flow=flow, context=context),
            max_requests=settings.ingest_stream_window,
            max_bytes=settings.ingest_stream_window_bytes,
            size=_body_size,
            weight=_deliveries,
            # On shutdown: stop reading, answer what was read, then end the stream.
            keep_reading=lambda: not self._app.stopping,
            on_read=self._app.metrics.ingest_stream_read,
        )
        self._windows.add(window)
        answered = 0
        async for response in window.answers():
            yield response
            answered += 1
        if window.stopped_early:
            raise Unavailable(
                f"the server is shutting down; the first {answered} requests of this stream "
                "were answered: send the others again, on another replica or later",
                reason=Reason.SHUTTING_DOWN,
                metadata={"answered": str(answered)},
            )

    def _stop_reading_streams(self) -> None:
        for window in list(self._windows):
            window.stop_reading()

    async def _ingest_one(
        self,
        request: pb.IngestEventRequest | UndecodableRequest,
        *,
        flow: Flow,
        context: Context,
    ) -> pb.IngestEventResponse | bytes:
        """One request of an IngestEvents stream: its response, or its error in the response."""
        if isinstance(request, UndecodableRequest):
            return pb.IngestEventResponse(error=ingest_error(request.error))
        if request.deliveries:
            return await self._ingest_several(request, flow=flow, context=context)
        event_id = request.event_id
        try:
            delivery = self._decode(request)
            event_id = delivery.event_id
            result = await self._app.ingestor.ingest(
                delivery, flow=flow, time_remaining=context.time_remaining(), wait=True
            )
        except Exception as exc:
            # A bug is logged with its traceback; the caller learns only it was not stored.
            return _refused(event_id, exc)
        return self._ingest_response(result)

    async def _ingest_several(
        self,
        request: pb.IngestEventRequest,
        *,
        flow: Flow,
        context: Context,
    ) -> pb.IngestEventResponse | bytes:
        """A request of several deliveries: one response per delivery in `results`, in order,
        each what the delivery alone would have got. The deliveries are queued together, so
        they share group commits (and the stream's place in the queue) like single requests."""
        deliveries = request.deliveries
        violations = []
        if len(deliveries) > MAX_DELIVERIES_PER_REQUEST:
            violations.append(
                FieldViolation(
                    "deliveries",
                    f"at most {MAX_DELIVERIES_PER_REQUEST} deliveries per request, got "
                    f"{len(deliveries)}",
                )
            )
        if request.event_id or request.WhichOneof("body") is not None:
            violations.append(
                FieldViolation(
                    "deliveries",
                    "set either deliveries or the request's own event_id and body, not both",
                )
            )
        if violations:
            return pb.IngestEventResponse(error=ingest_error(InvalidArgument(violations)))
        answers: list[bytes] = [b""] * len(deliveries)
        decoded: list[Delivery] = []
        places: list[int] = []
        for i, one in enumerate(deliveries):
            try:
                if one.deliveries:
                    raise InvalidArgument(
                        [
                            FieldViolation(
                                "deliveries", "a delivery cannot carry deliveries of its own"
                            )
                        ]
                    )
                decoded.append(self._decode(one))
                places.append(i)
            except ServiceError as exc:
                answers[i] = pb.IngestEventResponse(
                    event_id=one.event_id, error=ingest_error(exc)
                ).SerializeToString()
        outcomes = await self._app.ingestor.ingest_many(
            decoded, flow=flow, time_remaining=context.time_remaining(), wait=True
        )
        for i, delivery, outcome in zip(places, decoded, outcomes, strict=True):
            if isinstance(outcome, IngestResult):
                answers[i] = self._ingest_response(outcome)
            else:
                answers[i] = _refused(delivery.event_id, outcome).SerializeToString()
        # IngestEventResponse with `results`, built from bytes (api/wire.py).
        return b"".join(field(_RESULTS_FIELD, answer) for answer in answers)

    @grpc_errors
    async def BatchGetTransactions(  # type: ignore[override]
        self, request: pb.BatchGetTransactionsRequest, context: Context
    ) -> bytes:
        lookups = request.lookups
        violations = []
        if not 1 <= len(lookups) <= MAX_BATCH_LOOKUPS:
            violations.append(
                FieldViolation(
                    "lookups", f"give 1 to {MAX_BATCH_LOOKUPS} lookups, got {len(lookups)}"
                )
            )
        keys: list[tuple[str, str]] = []
        for i, lookup in enumerate(lookups[:MAX_BATCH_LOOKUPS]):
            if lookup.HasField("revision"):
                violations.append(
                    FieldViolation(
                        f"lookups[{i}].revision",
                        "as-of reads are one at a time: use GetTransaction with a revision",
                    )
                )
            for violation in _lookup_violations(lookup):
                name = violation.field if violation.field != "lookup" else ""
                violations.append(
                    FieldViolation(
                        f"lookups[{i}]" + (f".{name}" if name else ""), violation.description
                    )
                )
            which = lookup.WhichOneof("lookup")
            keys.append((which or "", getattr(lookup, which) if which else ""))
        if violations:
            raise InvalidArgument(violations)
        # The response is bounded while it is built: the store reads each transaction once, in
        # chunks of a sixteenth of a message of stored state, and each transaction's answer is
        # framed (from its cached bytes, api/wire.py) as its chunk arrives; once the
        # transactions found so far would not fit in one response, the read stops there.
        max_bytes = self._app.settings.max_message_bytes
        answers: dict[int, bytes] = {}
        found_bytes = 0

        def frame(chunk: Sequence[TransactionSnapshot]) -> None:
            nonlocal found_bytes
            for snapshot in chunk:
                answer = field(1, _FOUND + field(2, self._transactions.encode(snapshot)))
                answers[snapshot.revision] = answer
                found_bytes += len(answer)
            if found_bytes > max_bytes:
                raise TooLarge(
                    f"the transactions found are more than one response may carry "
                    f"({max_bytes} bytes, max_message_bytes): {len(answers)} of them are "
                    f"{found_bytes} bytes already; ask for fewer at a time"
                )

        by_id, by_order, head = await self._reads.get_many(
            [key for kind, key in keys if kind == "transaction_id"],
            [key for kind, key in keys if kind == "order_id"],
            chunk_bytes=max_bytes // 16,
            on_chunk=frame,
        )
        # One framed answer per transaction found (a revision names one state of one
        # transaction), shared by every lookup that found it.
        tail = varint_field(2, head)
        parts: list[bytes] = []
        size = len(tail)
        for i, (kind, key) in enumerate(keys):
            found = (by_id if kind == "transaction_id" else by_order).get(key)
            part = _NOT_FOUND if found is None else answers[found.revision]
            size += len(part)
            if size > max_bytes:
                raise TooLarge(
                    f"the answers to the first {i + 1} of {len(keys)} lookups are already "
                    f"{size} bytes, more than one response may carry ({max_bytes}, "
                    "max_message_bytes); ask for fewer at a time"
                )
            parts.append(part)
        # BatchGetTransactionsResponse, built from each transaction's cached bytes (api/wire.py).
        return b"".join(parts) + tail

    @grpc_errors
    async def ListTransactionEvents(
        self, request: pb.ListTransactionEventsRequest, context: Context
    ) -> pb.ListTransactionEventsResponse:
        violations = _lookup_violations(request)
        if not 0 <= request.page_size <= MAX_HISTORY_PAGE_SIZE:
            violations.append(FieldViolation("page_size", f"must be 0 to {MAX_HISTORY_PAGE_SIZE}"))
        lookup = request.WhichOneof("lookup")
        fingerprint = _fingerprint(
            lookup, getattr(request, lookup or "transaction_id"), request.include_bodies
        )
        after = 0
        if request.page_token:
            try:
                after = _decode_page_token(
                    request.page_token, fingerprint, "lookup and include_bodies"
                )
            except ValueError as exc:
                violations.append(FieldViolation("page_token", str(exc)))
        if violations:
            raise InvalidArgument(violations)
        assert lookup is not None
        if request.include_bodies:
            # Bodies hold patient data: the ingest role only (reads need only a read token).
            self._tokens.authorize(_authorization(context), Role.INGEST)
        page = await transaction_history(
            self._history,
            Lookup(getattr(request, lookup), by_order=lookup == "order_id"),
            after_seq=after,
            limit=request.page_size or DEFAULT_HISTORY_PAGE_SIZE,
            bodies=request.include_bodies,
        )
        response = pb.ListTransactionEventsResponse(
            transaction_id=page.transaction_id, revision=page.head_revision
        )
        size = 0
        last = after
        for event in page.events:
            entry = history_event_to_pb(event)
            size += entry.ByteSize()
            if response.events and size > self._batch_bytes:
                break  # the page ends early: bodies (or large diffs) fill it
            response.events.append(entry)
            last = event.seq
        if page.more or len(response.events) < len(page.events):
            response.next_page_token = _encode_page_token(last, fingerprint)
        return response

    def _one_watch(
        self, request: pb.WatchTransactionRequest
    ) -> tuple[WatchFilter, Callable[[], Awaitable[tuple[TransactionSnapshot | None, int]]]]:
        """A single-transaction watch's filter and the reader of its opening state;
        InvalidArgument (fields named as in the request) if the request is unusable."""
        lookup = request.WhichOneof("lookup")
        violations = _start_revision_violations(request) + _lookup_violations(request)
        if violations:
            raise InvalidArgument(violations)
        assert lookup is not None
        key = getattr(request, lookup)
        read: Callable[[str], Awaitable[tuple[TransactionSnapshot | None, int]]] = (
            self._reads.get if lookup == "transaction_id" else self._reads.get_by_order
        )
        return WatchFilter(**{lookup: key}), partial(read, key)

    def _shut_down_watch_streams(self) -> None:
        for stream in list(self._watch_streams):
            stream.shut_down()

    def _watch(
        self,
        where: WatchFilter,
        request: pb.WatchTransactionRequest | pb.WatchTransactionsRequest,
        current: Callable[[], Awaitable[tuple[TransactionSnapshot | None, int]]] | None,
    ) -> AsyncIterator[WatchEvent]:
        start = request.start_revision if request.HasField("start_revision") else None
        return self._hub.watch(where, start, current=current, batch=request.batch_changes)

    def _current(self, event: Current) -> bytes:
        """The opening `current` message, built from the transaction's cached bytes: the last
        message a stream sent stays referenced by gRPC while the watch waits, and bytes are a
        fraction of a message object's size."""
        snapshot = pb.TransactionSnapshot.DESCRIPTOR.fields_by_name
        return field(
            _CURRENT_FIELD,
            field(snapshot["transaction"].number, self._transactions.encode(event.snapshot))
            + varint_field(snapshot["progress_revision"].number, event.revision),
        )

    def _changes(self, event: ChangeRecord | Batch, batch: int) -> Iterator[bytes]:
        """The response messages, pre-built from bytes shared by every watcher (api/wire.py)."""
        oldest = event.changes[0] if isinstance(event, Batch) else event
        self._metrics.watch_sent(time.time() - oldest.recorded_at.timestamp())
        if isinstance(event, Batch):
            yield from self._encoder.batches(event.changes, batch, self._batch_bytes)
        else:
            yield self._encoder.single(event)


def _progress(event: Progress, field_number: int) -> bytes:
    """A watch response whose `progress` field (number `field_number`) says `event`."""
    return field(field_number, varint_field(1, event.revision))


def _body_size(request: pb.IngestEventRequest | UndecodableRequest) -> int:
    """About what a request holds in memory, for the stream's byte window."""
    if isinstance(request, UndecodableRequest):
        return 0
    if request.WhichOneof("body") == "payload_json":
        return len(request.payload_json)
    return request.ByteSize()


def _deliveries(request: pb.IngestEventRequest | UndecodableRequest) -> int:
    """How many deliveries a request carries, for the stream's window (at least 1)."""
    if isinstance(request, UndecodableRequest):
        return 1
    return max(1, len(request.deliveries))


def _refused(event_id: str, exc: Exception) -> pb.IngestEventResponse:
    """The response of one refused delivery of a stream; a bug is logged and not shown."""
    if isinstance(exc, ServiceError):
        return pb.IngestEventResponse(event_id=event_id, error=ingest_error(exc))
    log.error("unexpected error ingesting a delivery of IngestEvents", exc_info=exc)
    return pb.IngestEventResponse(
        event_id=event_id,
        error=pb.IngestError(
            code=grpc.StatusCode.INTERNAL.value[0],
            message="internal error; it was logged on the server. Retry later.",
        ),
    )


_LookupRequest = (
    pb.GetTransactionRequest
    | pb.WatchTransactionRequest
    | pb.ReconcileTransactionRequest
    | pb.GetTransactionResultsRequest
    | pb.GetTransactionResultsPdfRequest
    | pb.ListTransactionEventsRequest
)


def _lookup(request: _LookupRequest) -> tuple[str, str]:
    """(id, "transaction_id" or "order_id") of a request's lookup; InvalidArgument if unusable."""
    violations = _lookup_violations(request)
    if violations:
        raise InvalidArgument(violations)
    lookup = request.WhichOneof("lookup")
    assert lookup is not None
    return getattr(request, lookup), lookup


def _lookup_violations(request: _LookupRequest) -> list[FieldViolation]:
    lookup = request.WhichOneof("lookup")
    if lookup is None:
        return [FieldViolation("lookup", "set transaction_id or order_id")]
    value = getattr(request, lookup)
    if not value.strip():
        return [FieldViolation(lookup, "must contain a non-space character")]
    if value in DOT_SEGMENTS:
        # No such id is ever stored (ingest refuses it), and a reconcile or results request
        # would reach another path of Junction's API.
        return [FieldViolation(lookup, DOT_SEGMENT_MESSAGE)]
    return []


def _feed_filter(request: pb.WatchTransactionsRequest) -> WatchFilter:
    """A feed watch's filter; InvalidArgument (fields named as in the request) if unusable."""
    violations = _start_revision_violations(request)
    kinds = set()
    for i, value in enumerate(request.kinds):
        try:
            kinds.add(kind_from_pb(value))
        except KeyError:
            violations.append(FieldViolation(f"kinds[{i}]", f"not a change kind: {value}"))
    if violations:
        raise InvalidArgument(violations)
    return WatchFilter(kinds=frozenset(kinds), team_id=request.team_id)


def _watch_stream_shutting_down() -> Unavailable:
    return Unavailable(
        "the server is shutting down; each watch of this stream was canceled with the revision "
        "to resume it from (last_sent_revision): create them again on another replica or later",
        reason=Reason.SHUTTING_DOWN,
    )


def _start_revision_violations(
    request: pb.WatchTransactionRequest | pb.WatchTransactionsRequest,
) -> list[FieldViolation]:
    if request.HasField("start_revision") and request.start_revision < 0:
        return [FieldViolation("start_revision", "must not be negative")]
    return []


def _fingerprint(*request: object) -> str:
    """What a page token is bound to: the request's other fields that choose the list."""
    return hashlib.sha256(repr(request).encode()).hexdigest()[:16]


def _filter_fingerprint(where: ListFilter) -> str:
    return _fingerprint(where.status, where.team_id, where.user_id, where.updated_since)


def _encode_page_token(after: int, fingerprint: str) -> str:
    raw = json.dumps({"after": after, "filter": fingerprint})
    return base64.urlsafe_b64encode(raw.encode()).decode()


_MAX_POSITION = 2**63 - 1
# The tokens issued are under 80 characters. A longer one is a forgery, refused before it is
# decoded: a token of nested brackets (`[[[[...`) made json.loads raise RecursionError (INTERNAL).
_MAX_PAGE_TOKEN_LENGTH = 256


def _decode_page_token(token: str, fingerprint: str, bound_to: str = "filters") -> int:
    """The position a token continues after; ValueError (for the caller) if it is not one of
    ours or was issued for another request (other `bound_to`)."""
    if len(token) > _MAX_PAGE_TOKEN_LENGTH:
        raise ValueError("not a page token issued by this service")
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        after, issued_for = data["after"], data["filter"]
    except (binascii.Error, ValueError, KeyError, TypeError, RecursionError):
        raise ValueError("not a page token issued by this service") from None
    # Positions are revisions and event sequence numbers, 64-bit in both stores: a forged token
    # past them must be refused here, not reach the store (SQLite overflows, PostgreSQL refuses).
    if not isinstance(after, int) or isinstance(after, bool) or not 0 <= after <= _MAX_POSITION:
        raise ValueError("not a page token issued by this service")
    if issued_for != fingerprint:
        raise ValueError(f"the token was issued for other {bound_to}; repeat the same {bound_to}")
    return after


def _authorization(context: Context) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else None
    return None


def method_handlers(servicer: TransactionServicer) -> tuple[str, dict[str, Any]]:
    """The service's name and its handlers by method name, like those the generated
    `add_TransactionServiceServicer_to_server` registers, but with deserializers that turn an
    undecodable request into INVALID_ARGUMENT (see `api.errors.tolerant_deserializer`) instead
    of gRPC's UNKNOWN with the parser's text. Served through `api/gateway.py`."""
    service = pb.DESCRIPTOR.services_by_name["TransactionService"]
    handlers = {}
    for method in service.methods:
        request_type = getattr(pb, method.input_type.name)
        make_handler = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[method.client_streaming, method.server_streaming]
        handlers[method.name] = make_handler(
            getattr(servicer, method.name),
            request_deserializer=tolerant_deserializer(request_type),
            # Some answers are pre-built bytes (api/wire.py); the others are messages.
            response_serializer=passthrough_serializer,
        )
    return service.full_name, handlers
