"""Follow one lab order's transaction until it is done, as an internal service would.

    .venv/bin/python examples/follow_order.py ORDER_ID [ADDRESS]

Prints when a redraw becomes available or the order to follow changes, and returns when the
transaction is completed or cancelled. The client's watch resumes by itself after a server
restart or a lost connection, from the last revision it received: nothing missed, nothing twice.
`follow` is the blocking form (transaction_client.sync), `follow_async` the asyncio one.
"""

from __future__ import annotations

import asyncio
import sys

from transaction_client import ChangeKind, Snapshot, TransactionChange, TransactionClient, sync
from transaction_client import TransactionStatus as Status

DONE = {
    Status.TRANSACTION_STATUS_COMPLETED: "completed",
    Status.TRANSACTION_STATUS_CANCELLED: "cancelled",
}


def report(item: TransactionChange | Snapshot) -> str | None:
    """Print what `item` means for whoever follows the order; the outcome once it is done."""
    transaction = item.transaction
    if ChangeKind.CHANGE_KIND_REDRAW_AVAILABLE in item.kinds:
        print(f"redraw available: follow order {transaction.current_order_id}")
    elif ChangeKind.CHANGE_KIND_CURRENT_ORDER_CHANGED in item.kinds:
        print(f"follow order {transaction.current_order_id}")
    if transaction.status in DONE:
        print(f"transaction {transaction.id} {DONE[transaction.status]}")
        return DONE[transaction.status]
    return None


def follow(order_id: str, address: str = "localhost:50051") -> str:
    with sync.TransactionClient(address) as client:
        for item in client.watch_transaction(order_id=order_id):
            if outcome := report(item):
                return outcome
    raise AssertionError("unreachable: a watch ends only by raising")


async def follow_async(order_id: str, address: str = "localhost:50051") -> str:
    async with TransactionClient(address) as client:
        async for item in client.watch_transaction(order_id=order_id):
            if outcome := report(item):
                return outcome
    raise AssertionError("unreachable: a watch ends only by raising")


if __name__ == "__main__":
    asyncio.run(follow_async(*sys.argv[1:3]))
