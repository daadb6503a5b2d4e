import datetime

from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class IngestOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INGEST_OUTCOME_UNSPECIFIED: _ClassVar[IngestOutcome]
    INGEST_OUTCOME_APPLIED: _ClassVar[IngestOutcome]
    INGEST_OUTCOME_DUPLICATE: _ClassVar[IngestOutcome]
    INGEST_OUTCOME_STALE: _ClassVar[IngestOutcome]
    INGEST_OUTCOME_IGNORED: _ClassVar[IngestOutcome]

class TransactionStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRANSACTION_STATUS_UNSPECIFIED: _ClassVar[TransactionStatus]
    TRANSACTION_STATUS_ACTIVE: _ClassVar[TransactionStatus]
    TRANSACTION_STATUS_COMPLETED: _ClassVar[TransactionStatus]
    TRANSACTION_STATUS_CANCELLED: _ClassVar[TransactionStatus]

class OrderOrigin(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ORDER_ORIGIN_UNSPECIFIED: _ClassVar[OrderOrigin]
    ORDER_ORIGIN_INITIAL: _ClassVar[OrderOrigin]
    ORDER_ORIGIN_REDRAW: _ClassVar[OrderOrigin]
    ORDER_ORIGIN_RECREATION: _ClassVar[OrderOrigin]

class ChangeKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHANGE_KIND_UNSPECIFIED: _ClassVar[ChangeKind]
    CHANGE_KIND_TRANSACTION_CREATED: _ClassVar[ChangeKind]
    CHANGE_KIND_ORDER_ADDED: _ClassVar[ChangeKind]
    CHANGE_KIND_ORDER_STATUS_CHANGED: _ClassVar[ChangeKind]
    CHANGE_KIND_REDRAW_AVAILABLE: _ClassVar[ChangeKind]
    CHANGE_KIND_TRANSACTION_COMPLETED: _ClassVar[ChangeKind]
    CHANGE_KIND_TRANSACTION_CANCELLED: _ClassVar[ChangeKind]
    CHANGE_KIND_RESULTS_CORRECTED: _ClassVar[ChangeKind]
    CHANGE_KIND_TRANSACTION_REOPENED: _ClassVar[ChangeKind]
    CHANGE_KIND_LEGACY_MERGED: _ClassVar[ChangeKind]
    CHANGE_KIND_DETAILS_CHANGED: _ClassVar[ChangeKind]
    CHANGE_KIND_CURRENT_ORDER_CHANGED: _ClassVar[ChangeKind]
    CHANGE_KIND_RESULTS_READY: _ClassVar[ChangeKind]

class ReconcileOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RECONCILE_OUTCOME_UNSPECIFIED: _ClassVar[ReconcileOutcome]
    RECONCILE_OUTCOME_CHANGED: _ClassVar[ReconcileOutcome]
    RECONCILE_OUTCOME_UNCHANGED: _ClassVar[ReconcileOutcome]
    RECONCILE_OUTCOME_FAILED: _ClassVar[ReconcileOutcome]

class EventSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_SOURCE_UNSPECIFIED: _ClassVar[EventSource]
    EVENT_SOURCE_WEBHOOK: _ClassVar[EventSource]
    EVENT_SOURCE_GRPC: _ClassVar[EventSource]
    EVENT_SOURCE_JUNCTION_API: _ClassVar[EventSource]
    EVENT_SOURCE_RESULTS_FETCH: _ClassVar[EventSource]
    EVENT_SOURCE_REBUILD: _ClassVar[EventSource]
INGEST_OUTCOME_UNSPECIFIED: IngestOutcome
INGEST_OUTCOME_APPLIED: IngestOutcome
INGEST_OUTCOME_DUPLICATE: IngestOutcome
INGEST_OUTCOME_STALE: IngestOutcome
INGEST_OUTCOME_IGNORED: IngestOutcome
TRANSACTION_STATUS_UNSPECIFIED: TransactionStatus
TRANSACTION_STATUS_ACTIVE: TransactionStatus
TRANSACTION_STATUS_COMPLETED: TransactionStatus
TRANSACTION_STATUS_CANCELLED: TransactionStatus
ORDER_ORIGIN_UNSPECIFIED: OrderOrigin
ORDER_ORIGIN_INITIAL: OrderOrigin
ORDER_ORIGIN_REDRAW: OrderOrigin
ORDER_ORIGIN_RECREATION: OrderOrigin
CHANGE_KIND_UNSPECIFIED: ChangeKind
CHANGE_KIND_TRANSACTION_CREATED: ChangeKind
CHANGE_KIND_ORDER_ADDED: ChangeKind
CHANGE_KIND_ORDER_STATUS_CHANGED: ChangeKind
CHANGE_KIND_REDRAW_AVAILABLE: ChangeKind
CHANGE_KIND_TRANSACTION_COMPLETED: ChangeKind
CHANGE_KIND_TRANSACTION_CANCELLED: ChangeKind
CHANGE_KIND_RESULTS_CORRECTED: ChangeKind
CHANGE_KIND_TRANSACTION_REOPENED: ChangeKind
CHANGE_KIND_LEGACY_MERGED: ChangeKind
CHANGE_KIND_DETAILS_CHANGED: ChangeKind
CHANGE_KIND_CURRENT_ORDER_CHANGED: ChangeKind
CHANGE_KIND_RESULTS_READY: ChangeKind
RECONCILE_OUTCOME_UNSPECIFIED: ReconcileOutcome
RECONCILE_OUTCOME_CHANGED: ReconcileOutcome
RECONCILE_OUTCOME_UNCHANGED: ReconcileOutcome
RECONCILE_OUTCOME_FAILED: ReconcileOutcome
EVENT_SOURCE_UNSPECIFIED: EventSource
EVENT_SOURCE_WEBHOOK: EventSource
EVENT_SOURCE_GRPC: EventSource
EVENT_SOURCE_JUNCTION_API: EventSource
EVENT_SOURCE_RESULTS_FETCH: EventSource
EVENT_SOURCE_REBUILD: EventSource

class IngestEventRequest(_message.Message):
    __slots__ = ("event_id", "payload", "payload_json")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_JSON_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    payload: _struct_pb2.Struct
    payload_json: str
    def __init__(self, event_id: _Optional[str] = ..., payload: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., payload_json: _Optional[str] = ...) -> None: ...

class IngestEventResponse(_message.Message):
    __slots__ = ("outcome", "transaction", "revision", "event_id", "error")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    outcome: IngestOutcome
    transaction: Transaction
    revision: int
    event_id: str
    error: IngestError
    def __init__(self, outcome: _Optional[_Union[IngestOutcome, str]] = ..., transaction: _Optional[_Union[Transaction, _Mapping]] = ..., revision: _Optional[int] = ..., event_id: _Optional[str] = ..., error: _Optional[_Union[IngestError, _Mapping]] = ...) -> None: ...

class GetTransactionRequest(_message.Message):
    __slots__ = ("transaction_id", "order_id", "revision")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    order_id: str
    revision: int
    def __init__(self, transaction_id: _Optional[str] = ..., order_id: _Optional[str] = ..., revision: _Optional[int] = ...) -> None: ...

class GetTransactionResponse(_message.Message):
    __slots__ = ("transaction", "revision")
    TRANSACTION_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    transaction: Transaction
    revision: int
    def __init__(self, transaction: _Optional[_Union[Transaction, _Mapping]] = ..., revision: _Optional[int] = ...) -> None: ...

class ListTransactionsRequest(_message.Message):
    __slots__ = ("status", "team_id", "user_id", "updated_since", "page_size", "page_token")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TEAM_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    UPDATED_SINCE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    status: TransactionStatus
    team_id: str
    user_id: str
    updated_since: _timestamp_pb2.Timestamp
    page_size: int
    page_token: str
    def __init__(self, status: _Optional[_Union[TransactionStatus, str]] = ..., team_id: _Optional[str] = ..., user_id: _Optional[str] = ..., updated_since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListTransactionsResponse(_message.Message):
    __slots__ = ("transactions", "next_page_token", "revision")
    TRANSACTIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    transactions: _containers.RepeatedCompositeFieldContainer[Transaction]
    next_page_token: str
    revision: int
    def __init__(self, transactions: _Optional[_Iterable[_Union[Transaction, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., revision: _Optional[int] = ...) -> None: ...

class Transaction(_message.Message):
    __slots__ = ("id", "status", "orders", "initial_order_id", "redraw_order_id", "current_order_id", "redraw_available", "user_id", "team_id", "created_at", "updated_at", "revision", "provider_status", "legacy", "client_user_id")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ORDERS_FIELD_NUMBER: _ClassVar[int]
    INITIAL_ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    REDRAW_ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    REDRAW_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    TEAM_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_STATUS_FIELD_NUMBER: _ClassVar[int]
    LEGACY_FIELD_NUMBER: _ClassVar[int]
    CLIENT_USER_ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    status: TransactionStatus
    orders: _containers.RepeatedCompositeFieldContainer[Order]
    initial_order_id: str
    redraw_order_id: str
    current_order_id: str
    redraw_available: bool
    user_id: str
    team_id: str
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    revision: int
    provider_status: str
    legacy: bool
    client_user_id: str
    def __init__(self, id: _Optional[str] = ..., status: _Optional[_Union[TransactionStatus, str]] = ..., orders: _Optional[_Iterable[_Union[Order, _Mapping]]] = ..., initial_order_id: _Optional[str] = ..., redraw_order_id: _Optional[str] = ..., current_order_id: _Optional[str] = ..., redraw_available: _Optional[bool] = ..., user_id: _Optional[str] = ..., team_id: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revision: _Optional[int] = ..., provider_status: _Optional[str] = ..., legacy: _Optional[bool] = ..., client_user_id: _Optional[str] = ...) -> None: ...

class Order(_message.Message):
    __slots__ = ("id", "origin", "low_level_status", "high_level_status", "collection_method", "status_reached_at", "created_at", "updated_at", "sample_id", "lab", "lab_test_name", "has_missing_results", "interpretation", "parent_order_id", "seen_own_event")
    ID_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    LOW_LEVEL_STATUS_FIELD_NUMBER: _ClassVar[int]
    HIGH_LEVEL_STATUS_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_METHOD_FIELD_NUMBER: _ClassVar[int]
    STATUS_REACHED_AT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    LAB_FIELD_NUMBER: _ClassVar[int]
    LAB_TEST_NAME_FIELD_NUMBER: _ClassVar[int]
    HAS_MISSING_RESULTS_FIELD_NUMBER: _ClassVar[int]
    INTERPRETATION_FIELD_NUMBER: _ClassVar[int]
    PARENT_ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    SEEN_OWN_EVENT_FIELD_NUMBER: _ClassVar[int]
    id: str
    origin: OrderOrigin
    low_level_status: str
    high_level_status: str
    collection_method: str
    status_reached_at: _timestamp_pb2.Timestamp
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    sample_id: str
    lab: str
    lab_test_name: str
    has_missing_results: bool
    interpretation: str
    parent_order_id: str
    seen_own_event: bool
    def __init__(self, id: _Optional[str] = ..., origin: _Optional[_Union[OrderOrigin, str]] = ..., low_level_status: _Optional[str] = ..., high_level_status: _Optional[str] = ..., collection_method: _Optional[str] = ..., status_reached_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., sample_id: _Optional[str] = ..., lab: _Optional[str] = ..., lab_test_name: _Optional[str] = ..., has_missing_results: _Optional[bool] = ..., interpretation: _Optional[str] = ..., parent_order_id: _Optional[str] = ..., seen_own_event: _Optional[bool] = ...) -> None: ...

class WatchTransactionRequest(_message.Message):
    __slots__ = ("transaction_id", "order_id", "start_revision", "batch_changes")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    START_REVISION_FIELD_NUMBER: _ClassVar[int]
    BATCH_CHANGES_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    order_id: str
    start_revision: int
    batch_changes: bool
    def __init__(self, transaction_id: _Optional[str] = ..., order_id: _Optional[str] = ..., start_revision: _Optional[int] = ..., batch_changes: _Optional[bool] = ...) -> None: ...

class WatchTransactionResponse(_message.Message):
    __slots__ = ("change", "current", "progress", "changes")
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    change: TransactionChange
    current: TransactionSnapshot
    progress: WatchProgress
    changes: ChangeBatch
    def __init__(self, change: _Optional[_Union[TransactionChange, _Mapping]] = ..., current: _Optional[_Union[TransactionSnapshot, _Mapping]] = ..., progress: _Optional[_Union[WatchProgress, _Mapping]] = ..., changes: _Optional[_Union[ChangeBatch, _Mapping]] = ...) -> None: ...

class WatchTransactionsRequest(_message.Message):
    __slots__ = ("kinds", "team_id", "start_revision", "batch_changes")
    KINDS_FIELD_NUMBER: _ClassVar[int]
    TEAM_ID_FIELD_NUMBER: _ClassVar[int]
    START_REVISION_FIELD_NUMBER: _ClassVar[int]
    BATCH_CHANGES_FIELD_NUMBER: _ClassVar[int]
    kinds: _containers.RepeatedScalarFieldContainer[ChangeKind]
    team_id: str
    start_revision: int
    batch_changes: bool
    def __init__(self, kinds: _Optional[_Iterable[_Union[ChangeKind, str]]] = ..., team_id: _Optional[str] = ..., start_revision: _Optional[int] = ..., batch_changes: _Optional[bool] = ...) -> None: ...

class WatchTransactionsResponse(_message.Message):
    __slots__ = ("change", "progress", "changes")
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    change: TransactionChange
    progress: WatchProgress
    changes: ChangeBatch
    def __init__(self, change: _Optional[_Union[TransactionChange, _Mapping]] = ..., progress: _Optional[_Union[WatchProgress, _Mapping]] = ..., changes: _Optional[_Union[ChangeBatch, _Mapping]] = ...) -> None: ...

class ChangeBatch(_message.Message):
    __slots__ = ("changes",)
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    changes: _containers.RepeatedCompositeFieldContainer[TransactionChange]
    def __init__(self, changes: _Optional[_Iterable[_Union[TransactionChange, _Mapping]]] = ...) -> None: ...

class TransactionChange(_message.Message):
    __slots__ = ("revision", "kinds", "transaction", "order_id", "event_id", "recorded_at", "merged_transaction_ids", "diff")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_FIELD_NUMBER: _ClassVar[int]
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    RECORDED_AT_FIELD_NUMBER: _ClassVar[int]
    MERGED_TRANSACTION_IDS_FIELD_NUMBER: _ClassVar[int]
    DIFF_FIELD_NUMBER: _ClassVar[int]
    revision: int
    kinds: _containers.RepeatedScalarFieldContainer[ChangeKind]
    transaction: Transaction
    order_id: str
    event_id: str
    recorded_at: _timestamp_pb2.Timestamp
    merged_transaction_ids: _containers.RepeatedScalarFieldContainer[str]
    diff: TransactionDiff
    def __init__(self, revision: _Optional[int] = ..., kinds: _Optional[_Iterable[_Union[ChangeKind, str]]] = ..., transaction: _Optional[_Union[Transaction, _Mapping]] = ..., order_id: _Optional[str] = ..., event_id: _Optional[str] = ..., recorded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., merged_transaction_ids: _Optional[_Iterable[str]] = ..., diff: _Optional[_Union[TransactionDiff, _Mapping]] = ...) -> None: ...

class TransactionDiff(_message.Message):
    __slots__ = ("changed_fields", "previous", "orders")
    CHANGED_FIELDS_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    ORDERS_FIELD_NUMBER: _ClassVar[int]
    changed_fields: _field_mask_pb2.FieldMask
    previous: Transaction
    orders: _containers.RepeatedCompositeFieldContainer[OrderDiff]
    def __init__(self, changed_fields: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ..., previous: _Optional[_Union[Transaction, _Mapping]] = ..., orders: _Optional[_Iterable[_Union[OrderDiff, _Mapping]]] = ...) -> None: ...

class OrderDiff(_message.Message):
    __slots__ = ("order_id", "added", "removed", "changed_fields", "previous")
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELDS_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    order_id: str
    added: bool
    removed: bool
    changed_fields: _field_mask_pb2.FieldMask
    previous: Order
    def __init__(self, order_id: _Optional[str] = ..., added: _Optional[bool] = ..., removed: _Optional[bool] = ..., changed_fields: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ..., previous: _Optional[_Union[Order, _Mapping]] = ...) -> None: ...

class TransactionSnapshot(_message.Message):
    __slots__ = ("transaction", "progress_revision")
    TRANSACTION_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_REVISION_FIELD_NUMBER: _ClassVar[int]
    transaction: Transaction
    progress_revision: int
    def __init__(self, transaction: _Optional[_Union[Transaction, _Mapping]] = ..., progress_revision: _Optional[int] = ...) -> None: ...

class WatchProgress(_message.Message):
    __slots__ = ("revision",)
    REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: int
    def __init__(self, revision: _Optional[int] = ...) -> None: ...

class ReconcileTransactionRequest(_message.Message):
    __slots__ = ("transaction_id", "order_id")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    order_id: str
    def __init__(self, transaction_id: _Optional[str] = ..., order_id: _Optional[str] = ...) -> None: ...

class ReconcileTransactionResponse(_message.Message):
    __slots__ = ("transaction", "answers", "changed", "revision")
    TRANSACTION_FIELD_NUMBER: _ClassVar[int]
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    transaction: Transaction
    answers: _containers.RepeatedCompositeFieldContainer[ReconciledAnswer]
    changed: bool
    revision: int
    def __init__(self, transaction: _Optional[_Union[Transaction, _Mapping]] = ..., answers: _Optional[_Iterable[_Union[ReconciledAnswer, _Mapping]]] = ..., changed: _Optional[bool] = ..., revision: _Optional[int] = ...) -> None: ...

class ReconciledAnswer(_message.Message):
    __slots__ = ("event_id", "endpoint", "order_id", "outcome", "revision")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    endpoint: str
    order_id: str
    outcome: IngestOutcome
    revision: int
    def __init__(self, event_id: _Optional[str] = ..., endpoint: _Optional[str] = ..., order_id: _Optional[str] = ..., outcome: _Optional[_Union[IngestOutcome, str]] = ..., revision: _Optional[int] = ...) -> None: ...

class BackfillTransactionsRequest(_message.Message):
    __slots__ = ("since", "until", "resend")
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    RESEND_FIELD_NUMBER: _ClassVar[int]
    since: _timestamp_pb2.Timestamp
    until: _timestamp_pb2.Timestamp
    resend: bool
    def __init__(self, since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., resend: _Optional[bool] = ...) -> None: ...

class BackfillTransactionsResponse(_message.Message):
    __slots__ = ("transaction_id", "outcome", "error", "orders_total", "orders_read", "transactions_changed", "transactions_unchanged", "transactions_failed", "orders_resent", "done")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ORDERS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ORDERS_READ_FIELD_NUMBER: _ClassVar[int]
    TRANSACTIONS_CHANGED_FIELD_NUMBER: _ClassVar[int]
    TRANSACTIONS_UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    TRANSACTIONS_FAILED_FIELD_NUMBER: _ClassVar[int]
    ORDERS_RESENT_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    outcome: ReconcileOutcome
    error: str
    orders_total: int
    orders_read: int
    transactions_changed: int
    transactions_unchanged: int
    transactions_failed: int
    orders_resent: int
    done: bool
    def __init__(self, transaction_id: _Optional[str] = ..., outcome: _Optional[_Union[ReconcileOutcome, str]] = ..., error: _Optional[str] = ..., orders_total: _Optional[int] = ..., orders_read: _Optional[int] = ..., transactions_changed: _Optional[int] = ..., transactions_unchanged: _Optional[int] = ..., transactions_failed: _Optional[int] = ..., orders_resent: _Optional[int] = ..., done: _Optional[bool] = ...) -> None: ...

class GetTransactionResultsRequest(_message.Message):
    __slots__ = ("transaction_id", "order_id")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    order_id: str
    def __init__(self, transaction_id: _Optional[str] = ..., order_id: _Optional[str] = ...) -> None: ...

class GetTransactionResultsResponse(_message.Message):
    __slots__ = ("transaction_id", "status", "results_json", "fetched_at", "revision")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RESULTS_JSON_FIELD_NUMBER: _ClassVar[int]
    FETCHED_AT_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    status: str
    results_json: str
    fetched_at: _timestamp_pb2.Timestamp
    revision: int
    def __init__(self, transaction_id: _Optional[str] = ..., status: _Optional[str] = ..., results_json: _Optional[str] = ..., fetched_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revision: _Optional[int] = ...) -> None: ...

class GetTransactionResultsPdfRequest(_message.Message):
    __slots__ = ("transaction_id", "order_id")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    order_id: str
    def __init__(self, transaction_id: _Optional[str] = ..., order_id: _Optional[str] = ...) -> None: ...

class GetTransactionResultsPdfResponse(_message.Message):
    __slots__ = ("chunk",)
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    chunk: bytes
    def __init__(self, chunk: _Optional[bytes] = ...) -> None: ...

class IngestError(_message.Message):
    __slots__ = ("code", "message", "reason", "field_violations")
    class FieldViolation(_message.Message):
        __slots__ = ("field", "description")
        FIELD_FIELD_NUMBER: _ClassVar[int]
        DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
        field: str
        description: str
        def __init__(self, field: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FIELD_VIOLATIONS_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    reason: str
    field_violations: _containers.RepeatedCompositeFieldContainer[IngestError.FieldViolation]
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., reason: _Optional[str] = ..., field_violations: _Optional[_Iterable[_Union[IngestError.FieldViolation, _Mapping]]] = ...) -> None: ...

class BatchGetTransactionsRequest(_message.Message):
    __slots__ = ("lookups",)
    LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    lookups: _containers.RepeatedCompositeFieldContainer[GetTransactionRequest]
    def __init__(self, lookups: _Optional[_Iterable[_Union[GetTransactionRequest, _Mapping]]] = ...) -> None: ...

class BatchGetTransactionsResponse(_message.Message):
    __slots__ = ("results", "revision")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[BatchGetTransactionsResult]
    revision: int
    def __init__(self, results: _Optional[_Iterable[_Union[BatchGetTransactionsResult, _Mapping]]] = ..., revision: _Optional[int] = ...) -> None: ...

class BatchGetTransactionsResult(_message.Message):
    __slots__ = ("found", "transaction")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_FIELD_NUMBER: _ClassVar[int]
    found: bool
    transaction: Transaction
    def __init__(self, found: _Optional[bool] = ..., transaction: _Optional[_Union[Transaction, _Mapping]] = ...) -> None: ...

class ListTransactionEventsRequest(_message.Message):
    __slots__ = ("transaction_id", "order_id", "page_size", "page_token", "include_bodies")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_BODIES_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    order_id: str
    page_size: int
    page_token: str
    include_bodies: bool
    def __init__(self, transaction_id: _Optional[str] = ..., order_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., include_bodies: _Optional[bool] = ...) -> None: ...

class ListTransactionEventsResponse(_message.Message):
    __slots__ = ("transaction_id", "events", "next_page_token", "revision")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    events: _containers.RepeatedCompositeFieldContainer[TransactionEvent]
    next_page_token: str
    revision: int
    def __init__(self, transaction_id: _Optional[str] = ..., events: _Optional[_Iterable[_Union[TransactionEvent, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., revision: _Optional[int] = ...) -> None: ...

class TransactionEvent(_message.Message):
    __slots__ = ("event_id", "source", "event_type", "order_id", "received_at", "provider_time", "claimed_status", "claimed_transaction_status", "outcome", "reason", "revision", "duplicate_count", "last_duplicate_at", "kinds", "diff", "digest", "body_erased", "body_json")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_TIME_FIELD_NUMBER: _ClassVar[int]
    CLAIMED_STATUS_FIELD_NUMBER: _ClassVar[int]
    CLAIMED_TRANSACTION_STATUS_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_COUNT_FIELD_NUMBER: _ClassVar[int]
    LAST_DUPLICATE_AT_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    DIFF_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    BODY_ERASED_FIELD_NUMBER: _ClassVar[int]
    BODY_JSON_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    source: EventSource
    event_type: str
    order_id: str
    received_at: _timestamp_pb2.Timestamp
    provider_time: _timestamp_pb2.Timestamp
    claimed_status: str
    claimed_transaction_status: str
    outcome: IngestOutcome
    reason: str
    revision: int
    duplicate_count: int
    last_duplicate_at: _timestamp_pb2.Timestamp
    kinds: _containers.RepeatedScalarFieldContainer[ChangeKind]
    diff: TransactionDiff
    digest: str
    body_erased: bool
    body_json: str
    def __init__(self, event_id: _Optional[str] = ..., source: _Optional[_Union[EventSource, str]] = ..., event_type: _Optional[str] = ..., order_id: _Optional[str] = ..., received_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., provider_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., claimed_status: _Optional[str] = ..., claimed_transaction_status: _Optional[str] = ..., outcome: _Optional[_Union[IngestOutcome, str]] = ..., reason: _Optional[str] = ..., revision: _Optional[int] = ..., duplicate_count: _Optional[int] = ..., last_duplicate_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., kinds: _Optional[_Iterable[_Union[ChangeKind, str]]] = ..., diff: _Optional[_Union[TransactionDiff, _Mapping]] = ..., digest: _Optional[str] = ..., body_erased: _Optional[bool] = ..., body_json: _Optional[str] = ...) -> None: ...
