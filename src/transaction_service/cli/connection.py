"""How the command-line clients (`health`, `watch`, `ingest`, `reconcile`, `backfill`) reach a
server: address, TLS and token options, turned into the client distribution's
`TransactionClient` (transaction_client), whose errors say in one line what went wrong and what
to check."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transaction_client import TLS, TransactionClient
    from transaction_client.sync import TransactionClient as SyncTransactionClient

DEFAULT_PORT = "50051"


def default_address() -> str:
    # In the container the server's own port setting is in the environment; use it.
    return f"localhost:{os.environ.get('TRANSACTION_SERVICE_GRPC_PORT') or DEFAULT_PORT}"


def quiet_grpc() -> None:
    """gRPC's C core logs each failed TLS handshake at INFO on stderr, several times per call;
    the commands say what failed in one line of their own instead. (Read when gRPC starts: call
    before the first channel.)"""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def add_connection_flags(parser: argparse.ArgumentParser, *, token: bool) -> None:
    parser.add_argument(
        "--address",
        default=default_address(),
        help="server address, host:port (default localhost:$TRANSACTION_SERVICE_GRPC_PORT or "
        "localhost:50051)",
    )
    tls = parser.add_argument_group("TLS (default: plaintext)")
    tls.add_argument(
        "--ca", metavar="PEM", help="use TLS and trust the server certificates this CA signed"
    )
    tls.add_argument(
        "--tls", action="store_true", help="use TLS and trust the system's CA certificates"
    )
    tls.add_argument("--cert", metavar="PEM", help="client certificate, for mutual TLS")
    tls.add_argument("--key", metavar="PEM", help="private key of --cert")
    tls.add_argument(
        "--server-name", help="the name the server's certificate must carry (default: the host)"
    )
    if token:
        parser.add_argument(
            "--token",
            help="bearer token, when the server requires one (sent as authorization; default "
            "$TRANSACTION_SERVICE_TOKEN)",
        )


def tls_of(args: argparse.Namespace) -> TLS | None:
    """TLS if any TLS option was given. Raises ClientSetupError for --cert without --key."""
    from transaction_client import TLS, ClientSetupError

    if not (args.ca or args.tls or args.cert or args.key):
        return None
    if bool(args.cert) != bool(args.key):
        raise ClientSetupError("--cert and --key go together")
    return TLS(ca=args.ca, cert=args.cert, key=args.key, server_name=args.server_name)


def client_for(args: argparse.Namespace) -> TransactionClient:
    """The asyncio client the options describe. Raises ClientSetupError (an unreadable
    certificate file, --cert without --key)."""
    from transaction_client import TransactionClient

    quiet_grpc()
    return TransactionClient(args.address, token=getattr(args, "token", None), tls=tls_of(args))


def sync_client_for(args: argparse.Namespace) -> SyncTransactionClient:
    """`client_for`, blocking (transaction_client.sync)."""
    from transaction_client.sync import TransactionClient

    quiet_grpc()
    return TransactionClient(args.address, token=getattr(args, "token", None), tls=tls_of(args))
