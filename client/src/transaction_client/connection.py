"""How the client reaches a server: target, TLS, token, keepalive, retries of unary calls."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from transaction_client.errors import ClientSetupError

TOKEN_ENV = "TRANSACTION_SERVICE_TOKEN"
SERVICE = "transactions.v1.TransactionService"
# The server lets a client ping every 10 s at the most (grpc.http2.min_ping_interval_without_data
# on its side); more often and it closes the connection with "too many pings".
MIN_KEEPALIVE_SECONDS = 10.0

PemSource = bytes | str | os.PathLike[str]


@dataclass(frozen=True)
class TLS:
    """TLS to the server. Each of `ca`, `cert` and `key` is PEM bytes or a file path.

    `TLS()` trusts the system's CA certificates; `ca` trusts those a CA of your own signed;
    `cert` and `key` present a client certificate (mutual TLS); `server_name` is the name the
    server's certificate must carry when it is not the target's host."""

    ca: PemSource | None = None
    cert: PemSource | None = None
    key: PemSource | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise ClientSetupError("a client certificate and its key go together (cert and key)")
        return grpc.ssl_channel_credentials(
            root_certificates=_pem("ca", self.ca),
            private_key=_pem("key", self.key),
            certificate_chain=_pem("cert", self.cert),
        )


def _pem(name: str, source: PemSource | None) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise ClientSetupError(f"{name} {source}: cannot read it: {exc.strerror or exc}") from None


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata for `token`, or for $TRANSACTION_SERVICE_TOKEN when it is None."""
    if token is None:
        token = os.environ.get(TOKEN_ENV) or None
    return (("authorization", f"Bearer {token}"),) if token else ()


# Not retried by gRPC: the reconciles' UNAVAILABLE usually means Junction's API is, and the
# server has already retried it with backoff (and said when to come back, in
# `retry_after_seconds`); the watches reconnect by themselves (watch.py, with its own jittered
# pauses and `connect_timeout`), so gRPC's retries under them only delayed the first failure
# by ~3.5 s (a CLI `watch` at a wrong address, connect_timeout 0, was reported that late).
NOT_RETRIED = (
    "ReconcileTransaction",
    "BackfillTransactions",
    "WatchTransaction",
    "WatchTransactions",
    "Watch",
)


def retry_service_config(attempts: int) -> str:
    """gRPC's own retry policy for the service's methods: UNAVAILABLE (nothing was done, as the
    proto says; ingest is idempotent by event id, so it is retried too) is retried with
    jittered exponential backoff, within the call's deadline. gRPC retries only until a
    response has started, which is all a unary call needs; the watches resume by themselves.
    A method added to the service later is retried the same way."""
    policy = {
        "maxAttempts": max(2, min(attempts, 5)),
        "initialBackoff": "0.2s",
        "maxBackoff": "2s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    once = [{"service": SERVICE, "method": method} for method in NOT_RETRIED]
    return json.dumps(
        {
            "methodConfig": [
                {"name": [{"service": SERVICE}], "retryPolicy": policy},
                {"name": once},
            ]
        }
    )


def channel_options(
    *,
    attempts: int,
    keepalive_seconds: float,
    keepalive_timeout_seconds: float,
    load_balancing: str | None,
    server_name: str | None,
    extra: Sequence[tuple[str, Any]],
) -> list[tuple[str, Any]]:
    if keepalive_seconds < MIN_KEEPALIVE_SECONDS:
        raise ClientSetupError(
            f"keepalive_seconds must be at least {MIN_KEEPALIVE_SECONDS:g}: the server closes "
            "connections that ping more often"
        )
    options: list[tuple[str, Any]] = [
        # Ping the server while calls are open, so a dead connection under a long watch is noticed
        # (and dropped) within keepalive + timeout.
        ("grpc.keepalive_time_ms", int(keepalive_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive_timeout_seconds * 1000)),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", retry_service_config(attempts)),
        # A retried ingest resends its body: keep up to the server's 1 MiB limit (and some).
        ("grpc.per_rpc_retry_buffer_size", 4 * 1024 * 1024),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ]
    if load_balancing:
        options.append(("grpc.lb_policy_name", load_balancing))
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return [*options, *extra]


def open_channel(
    target: str, tls: TLS | None, options: Sequence[tuple[str, Any]]
) -> grpc.aio.Channel:
    """A grpc.aio channel (call inside the event loop that will use it)."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, tls.credentials(), options=options)


def open_sync_channel(target: str, tls: TLS | None) -> grpc.Channel:
    """A blocking channel, for a one-off call such as a health probe (no retries: a probe wants
    the answer of the moment)."""
    if tls is None:
        return grpc.insecure_channel(target)
    options = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
    return grpc.secure_channel(target, tls.credentials(), options=options)
