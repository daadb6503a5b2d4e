"""`transaction-service health`: ask a server's gRPC health service; for container probes.

Exit 0 when it answers SERVING; otherwise print one line saying why and exit 1 (2 for a usage
mistake such as an unreadable certificate file).

A container's HEALTHCHECK and a kubelet's exec probe run this every few seconds, on machines that
may be busy: `cli/entry.py` runs it without importing the rest of the command line, so it imports
grpc, the health stubs and `cli/connection.py` and nothing else of the service (a test keeps it
so). Importing the whole CLI took 4.7-12.6 s with both cores busy, past the probe's timeout.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from transaction_service.cli.connection import (
    ClientSetupError,
    add_connection_flags,
    one_line,
    open_channel,
)

DESCRIPTION = (
    "Ask a running server's gRPC health service (for container probes). Exits 0 on SERVING; "
    "otherwise prints one line saying why and exits 1."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_flags(parser, token=False)
    parser.add_argument(
        "--service",
        default="",
        help="service to ask about (default: the whole server; e.g. "
        "transactions.v1.TransactionService)",
    )
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for the answer (default 5)"
    )


def main(argv: Sequence[str]) -> int:
    """`transaction-service health ARGV`, parsed here rather than by the whole CLI's parser."""
    parser = argparse.ArgumentParser(prog="transaction-service health", description=DESCRIPTION)
    add_arguments(parser)
    return run_health(parser.parse_args(argv))


def run_health(args: argparse.Namespace) -> int:
    try:
        channel = open_channel(args)
    except ClientSetupError as exc:
        print(f"transaction-service health: {exc}", file=sys.stderr)
        return 2
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as error:
            print(f"transaction-service health: {args.address}: {one_line(error)}")
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"transaction-service health: {args.address}: {status}")
        return 1
    print(status)
    return 0
