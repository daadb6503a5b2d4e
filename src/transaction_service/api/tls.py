"""TLS and mutual TLS for the gRPC listener, from the `tls_*` settings.

Files are read and checked at start (readable, PEM, certificate and key belonging together), so a
mistake is a one-line startup error rather than a failure at every client's handshake.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from transaction_service.app import StartupError
from transaction_service.config import Settings, flag_name


def transport_mode(settings: Settings) -> str:
    """`plaintext`, `TLS` or `mutual TLS`, as the log states it."""
    if not settings.tls_cert:
        return "plaintext"
    return "mutual TLS" if settings.tls_client_ca else "TLS"


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """Credentials for `add_secure_port`; None for plaintext. Raises StartupError."""
    if not settings.tls_cert:
        return None
    cert = _read("tls_cert", settings.tls_cert)
    key = _read("tls_key", settings.tls_key)
    _check_pair(settings.tls_cert, settings.tls_key)
    client_ca = None
    if settings.tls_client_ca:
        client_ca = _read("tls_client_ca", settings.tls_client_ca)
        _check_ca(settings.tls_client_ca)
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _read(field: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise StartupError(
            f"{flag_name(field)} {path}: cannot read it: {exc.strerror or exc}"
        ) from None


def _check_pair(cert: str, key: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # An empty password makes an encrypted key fail here instead of prompting on the tty.
        context.load_cert_chain(cert, key, password=b"")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            problem = "the key does not belong to the certificate"
        else:
            problem = "not a PEM certificate and an unencrypted PEM private key"
        raise StartupError(f"--tls-cert {cert} / --tls-key {key}: {problem}") from None


def _check_ca(path: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cafile=path)
    except ssl.SSLError:
        raise StartupError(f"--tls-client-ca {path}: not a PEM CA certificate bundle") from None
