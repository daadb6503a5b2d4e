"""Conversions between protobuf messages and domain objects, in one place."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.struct_pb2 import ListValue, Struct, Value
from google.protobuf.timestamp_pb2 import Timestamp

from transaction_service.domain.diff import ViewDiff
from transaction_service.domain.state import (
    ChangeKind,
    OrderOrigin,
    OrderView,
    TransactionStatus,
    TransactionView,
)
from transaction_service.store.base import (
    ChangeRecord,
    HistoryEvent,
    StoredResults,
    TransactionSnapshot,
)
from transaction_service.usecases.ingest import Outcome
from transaction_service.usecases.reconcile import BackfillProgress, Reconciled
from transactions.v1 import transactions_pb2 as pb

_STATUS_TO_PB = {
    TransactionStatus.ACTIVE: pb.TRANSACTION_STATUS_ACTIVE,
    TransactionStatus.COMPLETED: pb.TRANSACTION_STATUS_COMPLETED,
    TransactionStatus.CANCELLED: pb.TRANSACTION_STATUS_CANCELLED,
}
_STATUS_FROM_PB = {v: k for k, v in _STATUS_TO_PB.items()}
_ORIGIN_TO_PB = {
    OrderOrigin.UNSPECIFIED: pb.ORDER_ORIGIN_UNSPECIFIED,
    OrderOrigin.INITIAL: pb.ORDER_ORIGIN_INITIAL,
    OrderOrigin.REDRAW: pb.ORDER_ORIGIN_REDRAW,
    OrderOrigin.RECREATION: pb.ORDER_ORIGIN_RECREATION,
}

_KIND_TO_PB = {kind: pb.ChangeKind.Value(f"CHANGE_KIND_{kind.name}") for kind in ChangeKind}
_KIND_FROM_PB = {v: k for k, v in _KIND_TO_PB.items()}


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp(value: datetime | None) -> Timestamp | None:
    # What Timestamp.FromDatetime computes, without its pure-Python detour through
    # calendar.timegm: a fifth of building an ingest response (issue 21's profile).
    if value is None:
        return None
    since = (value if value.tzinfo is not None else value.astimezone(UTC)) - _EPOCH
    return Timestamp(seconds=since.days * 86400 + since.seconds, nanos=since.microseconds * 1000)


def from_timestamp(value: Timestamp) -> datetime:
    """ValueError, with a message for the caller, when `value` is not a valid Timestamp."""
    try:
        return value.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise ValueError(
            "must be a valid Timestamp: from 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z, "
            "nanos from 0 to 999999999"
        ) from None


def struct_to_dict(struct: Struct) -> dict[str, Any]:
    """A Struct as plain Python values; never raises.

    Unlike json_format.MessageToDict, NaN and Infinity stay floats and any depth converts (without
    recursion), so the use case can refuse them with a violation naming the field.
    """
    root: dict[str, Any] = {}
    pending: list[tuple[Struct | ListValue, dict[str, Any] | list[Any]]] = [(struct, root)]
    while pending:
        source, target = pending.pop()
        if isinstance(target, dict):
            assert isinstance(source, Struct)
            for key, value in source.fields.items():
                target[key] = _plain(value, pending)
        else:
            assert isinstance(source, ListValue)
            target.extend(_plain(value, pending) for value in source.values)
    return root


def _plain(
    value: Value, pending: list[tuple[Struct | ListValue, dict[str, Any] | list[Any]]]
) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        obj: dict[str, Any] = {}
        pending.append((value.struct_value, obj))
        return obj
    if kind == "list_value":
        items: list[Any] = []
        pending.append((value.list_value, items))
        return items
    if kind is None or kind == "null_value":
        return None
    return getattr(value, kind)


def status_from_pb(value: pb.TransactionStatus.ValueType) -> TransactionStatus | None:
    """None for UNSPECIFIED (any); KeyError for a number the enum does not define."""
    if value == pb.TRANSACTION_STATUS_UNSPECIFIED:
        return None
    return _STATUS_FROM_PB[value]


def order_to_pb(order: OrderView) -> pb.Order:
    msg = pb.Order(
        id=order.id,
        origin=_ORIGIN_TO_PB[order.origin],
        low_level_status=order.low_level_status,
        high_level_status=order.high_level_status,
        collection_method=order.collection_method,
        status_reached_at=timestamp(order.status_reached_at),
        created_at=timestamp(order.created_at),
        updated_at=timestamp(order.updated_at),
        sample_id=order.sample_id,
        lab=order.lab,
        lab_test_name=order.lab_test_name,
        interpretation=order.interpretation,
        parent_order_id=order.parent_order_id,
        seen_own_event=order.seen_own_event,
    )
    if order.has_missing_results is not None:
        msg.has_missing_results = order.has_missing_results
    return msg


def transaction_to_pb(view: TransactionView, revision: int) -> pb.Transaction:
    return pb.Transaction(
        id=view.id,
        status=_STATUS_TO_PB[view.status],
        orders=[order_to_pb(o) for o in view.orders],
        initial_order_id=view.initial_order_id,
        redraw_order_id=view.redraw_order_id,
        current_order_id=view.current_order_id,
        redraw_available=view.redraw_available,
        user_id=view.user_id,
        team_id=view.team_id,
        created_at=timestamp(view.created_at),
        updated_at=timestamp(view.updated_at),
        revision=revision,
        provider_status=view.provider_status,
        legacy=view.legacy,
        client_user_id=view.client_user_id,
    )


def snapshot_to_pb(snapshot: TransactionSnapshot | None) -> pb.Transaction | None:
    return transaction_to_pb(snapshot.view, snapshot.revision) if snapshot else None


def kind_from_pb(value: pb.ChangeKind.ValueType) -> ChangeKind:
    """KeyError for UNSPECIFIED or a number the enum does not define."""
    return _KIND_FROM_PB[value]


def change_to_pb(change: ChangeRecord) -> pb.TransactionChange:
    return pb.TransactionChange(
        revision=change.revision,
        kinds=[_KIND_TO_PB[k] for k in change.kinds],
        transaction=transaction_to_pb(change.view, change.revision),
        order_id=change.order_id or "",
        event_id=change.event_id,
        recorded_at=timestamp(change.recorded_at),
        merged_transaction_ids=[standin for standin, _ in change.merged],
        trace_id=change.trace_id,
        span_id=change.span_id,
        diff=diff_to_pb(change.diff),
    )


def diff_to_pb(diff: ViewDiff | None) -> pb.TransactionDiff | None:
    """The diff; the values before are the view's before, masked to the fields that changed
    (view field names are the proto's)."""
    if diff is None:
        return None
    message = pb.TransactionDiff(changed_fields=FieldMask(paths=diff.fields))
    if diff.before is None:
        message.orders.extend(
            pb.OrderDiff(order_id=o.id, added=True, changed_fields=FieldMask(paths=o.fields))
            for o in diff.orders
        )
        return message
    before = transaction_to_pb(diff.before, 0)
    scalars = FieldMask(paths=[f for f in diff.fields if f != "orders"])
    scalars.MergeMessage(before, message.previous, replace_message_field=True)
    message.previous.SetInParent()
    old_orders = {o.id: o for o in before.orders}
    for order in diff.orders:
        entry = message.orders.add(
            order_id=order.id,
            added=order.added,
            removed=order.removed,
            changed_fields=FieldMask(paths=order.fields),
        )
        previous = old_orders.get(order.id)
        if previous is None:
            continue
        if order.removed:
            entry.previous.CopyFrom(previous)
        else:
            FieldMask(paths=order.fields).MergeMessage(
                previous, entry.previous, replace_message_field=True
            )
            entry.previous.SetInParent()
    return message


SOURCE_TO_PB = {
    "webhook": pb.EVENT_SOURCE_WEBHOOK,
    "grpc": pb.EVENT_SOURCE_GRPC,
    "api": pb.EVENT_SOURCE_JUNCTION_API,
    "results": pb.EVENT_SOURCE_RESULTS_FETCH,
    "rebuild": pb.EVENT_SOURCE_REBUILD,
}


def history_event_to_pb(event: HistoryEvent) -> pb.TransactionEvent:
    return pb.TransactionEvent(
        event_id=event.event_id,
        source=SOURCE_TO_PB.get(event.source, pb.EVENT_SOURCE_UNSPECIFIED),
        event_type=event.event_type,
        order_id=event.order_id or "",
        received_at=timestamp(event.received_at),
        provider_time=timestamp(event.provider_time),
        claimed_status=event.claimed_status,
        claimed_transaction_status=event.claimed_transaction_status,
        outcome=_STORED_OUTCOME_TO_PB.get(event.outcome, pb.INGEST_OUTCOME_UNSPECIFIED),
        reason=event.reason,
        revision=event.revision or 0,
        duplicate_count=event.duplicates,
        last_duplicate_at=timestamp(event.last_duplicate_at),
        kinds=[_KIND_TO_PB[k] for k in event.kinds or ()],
        diff=diff_to_pb(event.diff),
        digest=event.digest,
        body_erased=event.body_erased,
        # The body is UTF-8 JSON; a stray byte must not make the answer unserialisable.
        body_json=event.body.decode("utf-8", "replace") if event.body is not None else "",
    )


OUTCOME_TO_PB = {
    Outcome.APPLIED: pb.INGEST_OUTCOME_APPLIED,
    Outcome.DUPLICATE: pb.INGEST_OUTCOME_DUPLICATE,
    Outcome.STALE: pb.INGEST_OUTCOME_STALE,
    Outcome.IGNORED: pb.INGEST_OUTCOME_IGNORED,
}
_STORED_OUTCOME_TO_PB = {outcome.value: value for outcome, value in OUTCOME_TO_PB.items()}
_RECONCILE_OUTCOME_TO_PB = {
    "": pb.RECONCILE_OUTCOME_UNSPECIFIED,
    "changed": pb.RECONCILE_OUTCOME_CHANGED,
    "unchanged": pb.RECONCILE_OUTCOME_UNCHANGED,
    "failed": pb.RECONCILE_OUTCOME_FAILED,
}


def reconciled_to_pb(reconciled: Reconciled) -> pb.ReconcileTransactionResponse:
    return pb.ReconcileTransactionResponse(
        transaction=snapshot_to_pb(reconciled.transaction),
        answers=[
            pb.ReconciledAnswer(
                event_id=a.result.event_id,
                endpoint=a.endpoint,
                order_id=a.order_id,
                outcome=OUTCOME_TO_PB[a.result.outcome],
                revision=a.result.revision,
            )
            for a in reconciled.answers
        ],
        changed=reconciled.changed,
        revision=reconciled.head_revision,
    )


def backfill_progress_to_pb(progress: BackfillProgress) -> pb.BackfillTransactionsResponse:
    return pb.BackfillTransactionsResponse(
        transaction_id=progress.transaction_id,
        outcome=_RECONCILE_OUTCOME_TO_PB[progress.outcome],
        error=progress.error,
        orders_total=progress.orders_total,
        orders_read=progress.orders_read,
        transactions_changed=progress.changed,
        transactions_unchanged=progress.unchanged,
        transactions_failed=progress.failed,
        done=progress.done,
    )


def results_to_pb(results: StoredResults) -> pb.GetTransactionResultsResponse:
    assert results.body is not None
    return pb.GetTransactionResultsResponse(
        transaction_id=results.transaction_id,
        status=results.status,
        # The provider's JSON is UTF-8; a stray byte must not make the answer unserialisable.
        results_json=results.body.decode("utf-8", "replace"),
        fetched_at=timestamp(results.fetched_at),
        revision=results.revision,
    )
