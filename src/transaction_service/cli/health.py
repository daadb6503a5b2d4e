"""`transaction-service health`: ask a server's gRPC health service; for container probes.

Exit 0 when it answers SERVING; otherwise print one line saying why and exit 1 (2 for a usage
mistake such as an unreadable certificate file).
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from transaction_service.cli.connection import ClientSetupError, one_line, open_channel


def run_health(args: argparse.Namespace) -> int:
    try:
        channel = open_channel(args)
    except ClientSetupError as exc:
        print(f"transaction-service health: {exc}", file=sys.stderr)
        return 2
    with channel:
        try:
            # types-grpcio-health-checking declares no methods on HealthStub.
            response = health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]
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
