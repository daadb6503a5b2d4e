"""`transaction-service health`: ask a server's gRPC health service; for container probes.

Exit 0 when it answers SERVING; otherwise print one line saying why (with a hint for a wrong
port or a TLS mistake) and exit 1 (2 for a usage mistake such as an unreadable certificate
file).

A Docker HEALTHCHECK runs it every 30 s with a 5 s limit, on a machine that may be busy: it
imports gRPC, the health stubs and the client's small connection and error modules, nothing of
the server (see main.py: the serve flags are not even built).
"""

from __future__ import annotations

import argparse
import gc
import sys

from transaction_service.cli.connection import quiet_grpc, tls_of


def run_health(args: argparse.Namespace) -> int:
    quiet_grpc()
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from transaction_client.connection import open_sync_channel
    from transaction_client.errors import ClientSetupError, from_rpc_error

    # What the imports made lives until exit: frozen, the collections at interpreter exit skip
    # it (they were ~9% of this command's CPU), as the server's own objects are (main.py).
    gc.freeze()
    try:
        tls = tls_of(args)
        channel = open_sync_channel(args.address, tls)
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
            problem = from_rpc_error(error, args.address, tls=tls is not None)
            print(f"transaction-service health: {args.address}: {problem}")
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"transaction-service health: {args.address}: {status}")
        return 1
    print(status)
    return 0
