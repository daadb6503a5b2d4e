"""Deploying the service: mistakes in the store URL fail at start, the health check stays light,
and the lock file, the Dockerfile and the manifests agree with each other."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.process import startup_error


@pytest.mark.parametrize(
    "url",
    [
        "mysql://app:secret@db.internal/transactions",
        "postgresql+asyncpg://app:secret@db.internal/transactions",
        "sqlserver://db.internal",
        "file:///var/lib/transactions.db",
    ],
)
def test_an_unsupported_store_url_is_refused_at_start(tmp_path: Path, url: str) -> None:
    """Taken for a file path, each would quietly become a private SQLite file per replica."""
    line = startup_error(tmp_path, "--grpc-port", "0", "--db", url)
    scheme = url.split("://", 1)[0]
    assert f"unsupported URL scheme {scheme!r}" in line
    assert "secret" not in line  # the rest of a URL may hold a password
    assert not list(tmp_path.iterdir()), "nothing may be created"
