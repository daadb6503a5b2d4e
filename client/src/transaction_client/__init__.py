"""A typed Python client of the order transaction service.

    from transaction_client import TransactionClient

    async with TransactionClient("localhost:50051") as client:
        async for item in client.watch_transaction(order_id="..."):
            print(item.revision, list(item.kinds), item.transaction.status)

`transaction_client.sync` has the same client for code that is not async. The generated
messages and stubs are the `transactions.v1` package, shipped with this distribution; the ones
a consumer meets most are re-exported here. See docs/client.md in the repository.
"""

from transaction_client.cache import CacheStopped, HandlerCall, TransactionCache
from transaction_client.checkpoint import Checkpoint, FileCheckpoint, MemoryCheckpoint, Saved
from transaction_client.client import TransactionClient, TransactionHistory, TransactionList
from transaction_client.connection import TLS
from transaction_client.errors import (
    AlreadyExists,
    Cancelled,
    ClientSetupError,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    RevisionCompacted,
    RevisionInFuture,
    ShuttingDown,
    TransactionServiceError,
    Unauthenticated,
    Unavailable,
)
from transaction_client.watch import Progress, Snapshot, Watch, WatchItem
from transactions.v1.transactions_pb2 import (
    ChangeKind,
    IngestOutcome,
    Transaction,
    TransactionChange,
    TransactionEvent,
    TransactionStatus,
)

__all__ = [
    "TLS",
    "AlreadyExists",
    "CacheStopped",
    "Cancelled",
    "ChangeKind",
    "Checkpoint",
    "ClientSetupError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "FileCheckpoint",
    "HandlerCall",
    "IngestOutcome",
    "Internal",
    "InvalidArgument",
    "MemoryCheckpoint",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "Progress",
    "ResourceExhausted",
    "RevisionCompacted",
    "RevisionInFuture",
    "Saved",
    "ShuttingDown",
    "Snapshot",
    "Transaction",
    "TransactionCache",
    "TransactionChange",
    "TransactionClient",
    "TransactionEvent",
    "TransactionHistory",
    "TransactionList",
    "TransactionServiceError",
    "TransactionStatus",
    "Unauthenticated",
    "Unavailable",
    "Watch",
    "WatchItem",
]
