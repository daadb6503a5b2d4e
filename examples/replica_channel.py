"""A client channel over several replicas: calls spread round robin, a dead replica skipped.

gRPC keeps one HTTP/2 connection per channel and sends every call down it, so a plain TCP load
balancer pins each client to one replica. Spread calls either with an HTTP/2-aware proxy (Envoy,
a Kubernetes service mesh, a cloud L7 balancer) or, as here, on the client: give the channel every
replica's address and the `round_robin` policy. A call to a replica that just died fails over to
the others (watch streams end with UNAVAILABLE; resume them with the last revision received).

    .venv/bin/python examples/replica_channel.py 127.0.0.1:50051 127.0.0.1:50052
"""

from __future__ import annotations

import sys

import grpc

from transactions.v1 import transactions_pb2 as pb
from transactions.v1 import transactions_pb2_grpc as pb_grpc


def replica_channel(addresses: list[str]) -> grpc.aio.Channel:
    """One channel over every replica (`host:port` each, IPv4), calls spread round robin."""
    return grpc.aio.insecure_channel(
        "ipv4:" + ",".join(addresses),
        options=[("grpc.lb_policy_name", "round_robin")],
    )


async def main(addresses: list[str]) -> None:
    async with replica_channel(addresses) as channel:
        stub = pb_grpc.TransactionServiceStub(channel)
        for _ in range(len(addresses)):
            page = await stub.ListTransactions(pb.ListTransactionsRequest(page_size=1))
            print(f"head revision {page.revision}")


if __name__ == "__main__":
    import asyncio

    asyncio.run(main(sys.argv[1:] or ["127.0.0.1:50051", "127.0.0.1:50052"]))
