"""How the command-line clients (`health`, `watch`, `ingest`) reach a server: address, TLS,
token."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import grpc

DEFAULT_PORT = "50051"


class ClientSetupError(Exception):
    """A client option that cannot work (a file that cannot be read); one line for the user."""


def default_address() -> str:
    # In the container the server's own port setting is in the environment; use it.
    return f"localhost:{os.environ.get('TRANSACTION_SERVICE_GRPC_PORT') or DEFAULT_PORT}"


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
            "--token", help="bearer token, when the server requires one (sent as authorization)"
        )


def open_channel(args: argparse.Namespace) -> grpc.Channel:
    """A channel to `args.address`, over TLS if any TLS option was given."""
    credentials, options = _security(args)
    if credentials is None:
        return grpc.insecure_channel(args.address)
    return grpc.secure_channel(args.address, credentials, options=options)


def open_aio_channel(args: argparse.Namespace) -> grpc.aio.Channel:
    """`open_channel` for asyncio clients (`ingest`); call inside a running event loop."""
    credentials, options = _security(args)
    if credentials is None:
        return grpc.aio.insecure_channel(args.address)
    return grpc.aio.secure_channel(args.address, credentials, options=options)


def _security(
    args: argparse.Namespace,
) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, str]]]:
    if not (args.ca or args.tls or args.cert or args.key):
        return None, []
    if bool(args.cert) != bool(args.key):
        raise ClientSetupError("--cert and --key go together")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read("--ca", args.ca),
        private_key=_read("--key", args.key),
        certificate_chain=_read("--cert", args.cert),
    )
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    return credentials, options


def call_metadata(args: argparse.Namespace) -> list[tuple[str, str]]:
    token = getattr(args, "token", None)
    return [("authorization", f"Bearer {token}")] if token else []


def _read(flag: str, path: str | None) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ClientSetupError(f"{flag} {path}: cannot read it: {exc.strerror or exc}") from None


def one_line(error: grpc.RpcError) -> str:
    """`CODE: details` of a failed call, on one line."""
    code = error.code() if isinstance(error, grpc.Call) else None
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    name = code.name if code is not None else "ERROR"
    return f"{name}: {' '.join((details or '').split())}"
