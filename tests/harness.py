"""An in-process server for tests, with a stub and a look into its database; and what a gRPC
error's rich status carries, for tests of in-process and real servers alike."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import struct_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.pg import table_counts
from transaction_service.config import Settings
from transaction_service.server import TransactionService
from transactions.v1 import transactions_pb2 as pb
from transactions.v1 import transactions_pb2_grpc as pb_grpc

TABLES = ("events", "transactions", "changes", "order_transactions")
M = TypeVar("M", bound=Message)


@dataclass
class Running:
    service: TransactionService
    stub: pb_grpc.TransactionServiceStub
    # A SQLite file path or a PostgreSQL URL.
    db: Path | str

    def counts(self) -> dict[str, int]:
        """Rows per table: tests check that a refused request left nothing behind."""
        if str(self.db).startswith("postgresql://"):
            return table_counts(str(self.db), TABLES)
        with sqlite3.connect(self.db) as conn:
            return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}


def loopback_settings(db: Path | str, **overrides: Any) -> Settings:
    """Settings for a service a test starts in process: loopback, free ports (0), the database
    `db` (a SQLite file or a PostgreSQL URL), SQLite's faster NORMAL sync, a short shutdown
    grace; `overrides` replace or add to these."""
    values: dict[str, Any] = {
        "grpc_host": "127.0.0.1",
        "grpc_port": 0,
        "http_host": "127.0.0.1",
        "http_port": 0,
        "db": db,
        "sqlite_synchronous": "NORMAL",
        "shutdown_grace_seconds": 1,
    }
    return Settings(**(values | overrides))


# The streams one connection carries at once (grpc_max_concurrent_streams, docs/limits.md).
STREAMS_PER_CONNECTION = Settings.model_fields["grpc_max_concurrent_streams"].default


def separate_channels(address: str, streams: int) -> list[grpc.aio.Channel]:
    """Enough channels for `streams` long-lived streams, each channel its own connection (gRPC
    shares one connection between channels to the same address unless told not to): what a
    client with more watches than a connection carries must do."""
    count = -(-streams // STREAMS_PER_CONNECTION)
    options = [("grpc.use_local_subchannel_pool", 1)]
    return [grpc.aio.insecure_channel(address, options=options) for _ in range(count)]


def struct(body: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(body)
    return s


async def ingest(api: Running, event_id: str, body: dict[str, Any]) -> pb.IngestEventResponse:
    return await api.stub.IngestEvent(
        pb.IngestEventRequest(event_id=event_id, payload=struct(body))
    )


def check_expect(txn: pb.Transaction, expect: dict[str, Any]) -> None:
    assert txn.id == expect["transaction_id"]
    assert pb.TransactionStatus.Name(txn.status) == expect["status"]
    assert txn.initial_order_id == expect["initial_order_id"]
    assert txn.redraw_order_id == expect["redraw_order_id"]
    assert txn.current_order_id == expect["current_order_id"]
    assert txn.redraw_available == expect["redraw_available"]
    got = {o.id: [pb.OrderOrigin.Name(o.origin), o.low_level_status] for o in txn.orders}
    assert got == expect["orders"]


def status_detail(error: grpc.RpcError, detail: M) -> M:
    """The first detail of the error's rich status, unpacked into `detail` (an empty ErrorInfo or
    BadRequest, say); the test fails if there is no such status or its first detail is another
    type."""
    status = rpc_status.from_call(error)
    assert status is not None, error
    assert status.details, status
    assert status.details[0].Unpack(detail), status
    return detail


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    return status_detail(error, error_details_pb2.ErrorInfo())


def violated_fields(error: grpc.RpcError) -> list[str]:
    """The fields an INVALID_ARGUMENT's BadRequest names."""
    bad_request = status_detail(error, error_details_pb2.BadRequest())
    return [v.field for v in bad_request.field_violations]
