"""Deploying the service: mistakes in the store URL fail at start, the health check stays light,
and the lock file, the Dockerfile and the manifests agree with each other."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.process import startup_error

ROOT = Path(__file__).resolve().parent.parent
# Where the locks are installed: CI and the image (python:3.11 on Linux).
LOCK_ENVIRONMENT = {
    "python_version": "3.11",
    "python_full_version": "3.11.0",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "os_name": "posix",
    "extra": "",
}


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


def locked(name: str) -> dict[str, str]:
    """Package name -> version pinned in the lock file `name`."""
    pins = re.findall(r"^([A-Za-z0-9._-]+)==([^\s;\\]+)", (ROOT / name).read_text(), re.MULTILINE)
    return {canonicalize_name(package): version for package, version in pins}


def test_the_locks_satisfy_pyproject() -> None:
    """Every dependency in pyproject.toml is pinned in the locks at a version it allows, and the
    runtime lock pins the same versions as the dev lock: the image and a test run get the same
    packages. After changing a dependency: `make lock`."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    local = {canonicalize_name(project["name"])}
    runtime, dev = locked("requirements.lock"), locked("requirements-dev.lock")
    wanted = [(r, runtime) for r in project["dependencies"]]
    wanted += [(r, dev) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    for text, lock in wanted:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        if name in local or (
            requirement.marker and not requirement.marker.evaluate(LOCK_ENVIRONMENT)
        ):
            continue
        assert name in lock, f"{name} is not in the lock: run `make lock`"
        assert requirement.specifier.contains(lock[name], prereleases=True), (
            f"{name}=={lock[name]} in the lock, pyproject.toml wants {requirement.specifier}: "
            "run `make lock`"
        )
    assert {name: dev.get(name) for name in runtime} == runtime
