"""The gRPC servicer: translate requests, delegate, translate answers. No business logic here."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from functools import partial

import grpc

from transaction_service.api.convert import (
    from_timestamp,
    kind_from_pb,
    snapshot_to_pb,
    status_from_pb,
    struct_to_dict,
)
from transaction_service.api.errors import grpc_errors, tolerant_deserializer
from transaction_service.api.wire import (
    ChangeEncoder,
    TransactionEncoder,
    field,
    passthrough_serializer,
    string_field,
    varint_field,
)
from transaction_service.app import App
from transaction_service.errors import FieldViolation, InvalidArgument, NotFound, echo
from transaction_service.ingest import Outcome, decode_delivery
from transaction_service.store.base import ChangeRecord, ListFilter, TransactionSnapshot
from transaction_service.watch import Batch, Current, Progress, WatchEvent, WatchFilter
from transactions.v1 import transactions_pb2 as pb
from transactions.v1 import transactions_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
# Field numbers in the watch responses: `change` in both, the ChangeBatch `changes` in each.
_CHANGE_FIELD = pb.WatchTransactionsResponse.DESCRIPTOR.fields_by_name["change"].number
_FEED_BATCH_FIELD = pb.WatchTransactionsResponse.DESCRIPTOR.fields_by_name["changes"].number
_ONE_BATCH_FIELD = pb.WatchTransactionResponse.DESCRIPTOR.fields_by_name["changes"].number

_OUTCOME_TO_PB = {
    Outcome.APPLIED: pb.INGEST_OUTCOME_APPLIED,
    Outcome.DUPLICATE: pb.INGEST_OUTCOME_DUPLICATE,
    Outcome.STALE: pb.INGEST_OUTCOME_STALE,
    Outcome.IGNORED: pb.INGEST_OUTCOME_IGNORED,
}


class TransactionServicer(pb_grpc.TransactionServiceServicer):
    def __init__(self, app: App) -> None:
        self._app = app
        self._store = app.store
        self._hub = app.hub
        self._max_body_bytes = app.settings.max_body_bytes
        self._limits = app.limits
        self._encoder = ChangeEncoder()
        self._transactions = TransactionEncoder()
        # A batch message stays well inside the largest message gRPC may send.
        self._batch_bytes = app.settings.max_message_bytes // 2

    @grpc_errors
    async def IngestEvent(
        self, request: pb.IngestEventRequest, context: grpc.aio.ServicerContext
    ) -> pb.IngestEventResponse:
        body = request.WhichOneof("body")
        delivery = decode_delivery(
            request.event_id,
            payload_json=request.payload_json if body == "payload_json" else None,
            payload=struct_to_dict(request.payload) if body == "payload" else None,
            max_body_bytes=self._max_body_bytes,
            limits=self._limits,
        )
        result = await self._app.ingest(delivery, source="grpc")
        # IngestEventResponse, built from the transaction's cached bytes (api/wire.py).
        transaction = result.transaction
        return (  # type: ignore[return-value]
            varint_field(1, _OUTCOME_TO_PB[result.outcome])
            + (field(2, self._transactions.encode(transaction)) if transaction else b"")
            + varint_field(3, result.revision)
            + string_field(4, result.event_id)
        )

    @grpc_errors
    async def GetTransaction(
        self, request: pb.GetTransactionRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetTransactionResponse:
        lookup = request.WhichOneof("lookup")
        violations = _lookup_violations(request)
        if violations:
            raise InvalidArgument(violations)
        assert lookup is not None
        key = getattr(request, lookup)
        if lookup == "transaction_id":
            snapshot, head = await self._store.get(key)
        else:
            snapshot, head = await self._store.get_by_order(key)
        if snapshot is None:
            raise NotFound(f"no transaction known for {lookup} {echo(key)}")
        # GetTransactionResponse, built from the transaction's cached bytes (api/wire.py).
        return field(1, self._transactions.encode(snapshot)) + varint_field(2, head)  # type: ignore[return-value]

    @grpc_errors
    async def ListTransactions(
        self, request: pb.ListTransactionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListTransactionsResponse:
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
                after = _decode_page_token(request.page_token, where)
            except ValueError as exc:
                violations.append(FieldViolation("page_token", str(exc)))
        if violations:
            raise InvalidArgument(violations)
        limit = request.page_size or DEFAULT_PAGE_SIZE
        # One extra row tells whether another page follows.
        snapshots, head = await self._store.list(where, after, limit + 1)
        page = snapshots[:limit]
        next_token = _encode_page_token(page[-1].revision, where) if len(snapshots) > limit else ""
        # ListTransactionsResponse, built from each transaction's cached bytes (api/wire.py).
        return (  # type: ignore[return-value]
            b"".join(field(1, self._transactions.encode(s)) for s in page)
            + string_field(2, next_token)
            + varint_field(3, head)
        )

    @grpc_errors
    async def WatchTransaction(
        self, request: pb.WatchTransactionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchTransactionResponse]:
        lookup = request.WhichOneof("lookup")
        violations = _start_revision_violations(request) + _lookup_violations(request)
        if violations:
            raise InvalidArgument(violations)
        assert lookup is not None
        key = getattr(request, lookup)
        where = WatchFilter(**{lookup: key})
        read: Callable[[str], Awaitable[tuple[TransactionSnapshot | None, int]]] = (
            self._store.get if lookup == "transaction_id" else self._store.get_by_order
        )
        async for event in self._watch(where, request, partial(read, key)):
            if isinstance(event, Current):
                yield pb.WatchTransactionResponse(
                    current=pb.TransactionSnapshot(
                        transaction=snapshot_to_pb(event.snapshot),
                        progress_revision=event.revision,
                    )
                )
            elif isinstance(event, Progress):
                yield pb.WatchTransactionResponse(
                    progress=pb.WatchProgress(revision=event.revision)
                )
            else:
                for message in self._changes(event, _CHANGE_FIELD, _ONE_BATCH_FIELD):
                    yield message

    @grpc_errors
    async def WatchTransactions(
        self, request: pb.WatchTransactionsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchTransactionsResponse]:
        violations = _start_revision_violations(request)
        kinds = set()
        for i, value in enumerate(request.kinds):
            try:
                kinds.add(kind_from_pb(value))
            except KeyError:
                violations.append(FieldViolation(f"kinds[{i}]", f"not a change kind: {value}"))
        if violations:
            raise InvalidArgument(violations)
        where = WatchFilter(kinds=frozenset(kinds), team_id=request.team_id)
        async for event in self._watch(where, request, None):
            if isinstance(event, Progress):
                yield pb.WatchTransactionsResponse(
                    progress=pb.WatchProgress(revision=event.revision)
                )
            elif isinstance(event, ChangeRecord | Batch):
                for message in self._changes(event, _CHANGE_FIELD, _FEED_BATCH_FIELD):
                    yield message

    def _watch(
        self,
        where: WatchFilter,
        request: pb.WatchTransactionRequest | pb.WatchTransactionsRequest,
        current: Callable[[], Awaitable[tuple[TransactionSnapshot | None, int]]] | None,
    ) -> AsyncIterator[WatchEvent]:
        start = request.start_revision if request.HasField("start_revision") else None
        return self._hub.watch(where, start, current=current, batch=request.batch_changes)

    def _changes(self, event: ChangeRecord | Batch, single: int, batch: int) -> Iterator[bytes]:
        """The response messages, pre-built from bytes shared by every watcher (api/wire.py)."""
        if isinstance(event, Batch):
            yield from self._encoder.batches(event.changes, batch, self._batch_bytes)
        else:
            yield self._encoder.single(event, single)


def _lookup_violations(
    request: pb.GetTransactionRequest | pb.WatchTransactionRequest,
) -> list[FieldViolation]:
    lookup = request.WhichOneof("lookup")
    if lookup is None:
        return [FieldViolation("lookup", "set transaction_id or order_id")]
    if not getattr(request, lookup).strip():
        return [FieldViolation(lookup, "must contain a non-space character")]
    return []


def _start_revision_violations(
    request: pb.WatchTransactionRequest | pb.WatchTransactionsRequest,
) -> list[FieldViolation]:
    if request.HasField("start_revision") and request.start_revision < 0:
        return [FieldViolation("start_revision", "must not be negative")]
    return []


def _filter_fingerprint(where: ListFilter) -> str:
    text = repr((where.status, where.team_id, where.user_id, where.updated_since))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _encode_page_token(after_revision: int, where: ListFilter) -> str:
    raw = json.dumps({"after": after_revision, "filter": _filter_fingerprint(where)})
    return base64.urlsafe_b64encode(raw.encode()).decode()


def _decode_page_token(token: str, where: ListFilter) -> int:
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        after, fingerprint = data["after"], data["filter"]
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise ValueError("not a page token issued by this service") from None
    if not isinstance(after, int) or after < 0:
        raise ValueError("not a page token issued by this service")
    if fingerprint != _filter_fingerprint(where):
        raise ValueError("the token was issued for other filters; repeat the same filters")
    return after


def add_to_server(servicer: TransactionServicer, server: grpc.aio.Server) -> None:
    """Register the servicer, like the generated `add_TransactionServiceServicer_to_server`, but
    with deserializers that turn an undecodable request into INVALID_ARGUMENT (see
    `api.errors.tolerant_deserializer`) instead of gRPC's UNKNOWN with the parser's text."""
    service = pb.DESCRIPTOR.services_by_name["TransactionService"]
    handlers = {}
    for method in service.methods:
        request_type = getattr(pb, method.input_type.name)
        make_handler = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make_handler(
            getattr(servicer, method.name),
            request_deserializer=tolerant_deserializer(request_type),
            # Watch streams send pre-built bytes (api/wire.py); everything else is a message.
            response_serializer=passthrough_serializer,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)
