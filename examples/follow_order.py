"""Follow one lab order's transaction until it is done, as an internal service would.

    .venv/bin/python examples/follow_order.py ORDER_ID [ADDRESS]

Prints when a redraw becomes available or the order to follow changes, and exits when the
transaction is completed or cancelled. It survives server restarts: it remembers the revision of
the last message and resumes from it, so it misses nothing and sees nothing twice.
"""

from __future__ import annotations

import sys
import time

import grpc

from transactions.v1 import transactions_pb2 as pb
from transactions.v1 import transactions_pb2_grpc as pb_grpc

DONE = {pb.TRANSACTION_STATUS_COMPLETED: "completed", pb.TRANSACTION_STATUS_CANCELLED: "cancelled"}


def follow(order_id: str, address: str = "localhost:50051") -> str:
    last: int | None = None  # the revision to resume from
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.TransactionServiceStub(channel)
        while True:
            request = pb.WatchTransactionRequest(order_id=order_id)
            if last is not None:
                request.start_revision = last
            try:
                for message in stub.WatchTransaction(request):
                    event = message.WhichOneof("event")
                    if event == "progress":
                        last = message.progress.revision
                        continue
                    if event == "current":  # the state when the watch opened
                        last, transaction = (
                            message.current.progress_revision,
                            message.current.transaction,
                        )
                        kinds: list[int] = []
                    else:
                        last, transaction = message.change.revision, message.change.transaction
                        kinds = list(message.change.kinds)
                    if pb.CHANGE_KIND_REDRAW_AVAILABLE in kinds:
                        print(f"redraw available: follow order {transaction.current_order_id}")
                    elif pb.CHANGE_KIND_CURRENT_ORDER_CHANGED in kinds:
                        print(f"follow order {transaction.current_order_id}")
                    if transaction.status in DONE:
                        print(f"transaction {transaction.id} {DONE[transaction.status]}")
                        return DONE[transaction.status]
            except grpc.RpcError as error:
                # UNAVAILABLE: server restarting or unreachable; resume from `last`. Anything else
                # (OUT_OF_RANGE: our revision was compacted) needs a fresh GetTransaction first.
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                time.sleep(1)


if __name__ == "__main__":
    follow(*sys.argv[1:3])
