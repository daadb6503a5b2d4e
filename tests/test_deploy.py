"""Deploying the service: mistakes in the store URL fail at start, the health check stays light,
and the lock file, the Dockerfile and the manifests agree with each other."""

from __future__ import annotations

import subprocess
import sys
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


HEALTH_PROBE = """
import sys
from transaction_service.cli.entry import main
code = main(["health", "--address", "127.0.0.1:1", "--timeout", "0.5"])
print(" ".join(sorted(sys.modules)))
sys.exit(code)
"""


def test_the_health_command_imports_grpc_and_its_stubs_only() -> None:
    """Probes run `transaction-service health` every few seconds on busy machines: it must not
    import the rest of the service (the whole CLI took 4.7-12.6 s to import with both cores
    busy, past the HEALTHCHECK's timeout)."""
    result = subprocess.run(
        [sys.executable, "-c", HEALTH_PROBE], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1, result.stderr  # nothing listens on port 1: one line, exit 1
    modules = set(result.stdout.split())
    ours = {m for m in modules if m.split(".")[0] == "transaction_service"}
    assert ours == {
        "transaction_service",
        "transaction_service.cli",
        "transaction_service.cli.entry",
        "transaction_service.cli.health",
        "transaction_service.cli.connection",
    }
    heavy = {"pydantic", "aiohttp", "asyncpg", "aiosqlite", "prometheus_client", "opentelemetry"}
    assert not heavy & {m.split(".")[0] for m in modules}
