"""Deploying the service: mistakes in the store URL fail at start, the health check stays light,
and the lock file, the Dockerfile and the manifests agree with each other."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.process import server_env, startup_error
from transaction_service.config import Settings, env_name

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


@pytest.mark.parametrize("db", [".", "..", "sqlite:///", "/"])
def test_a_store_path_that_names_no_file_is_refused_at_start(tmp_path: Path, db: str) -> None:
    """`--db .` or `sqlite:///` once ended the start in a ValueError traceback."""
    line = startup_error(tmp_path, "--grpc-port", "0", "--http-port", "0", "--db", db)
    assert "names a folder, not a file" in line
    assert not list(tmp_path.iterdir()), "nothing may be created"


@pytest.mark.parametrize("where", ["flag", "environment"])
def test_a_bad_setting_is_a_json_line_when_logs_are_json(tmp_path: Path, where: str) -> None:
    """With `--log-format json` (or its variable), every line on stderr is JSON: a bad setting
    was reported as a text line, the one line a collector parsing JSON would drop."""
    args = ["--grpc-port", "0", "--http-port", "0", "--tls-cert", "cert.pem"]
    env = None
    if where == "flag":
        args += ["--log-format", "json"]
    else:
        env = server_env(TRANSACTION_SERVICE_LOG_FORMAT="json")
    record = json.loads(startup_error(tmp_path, *args, env=env))
    assert record["level"] == "ERROR"
    assert "--tls-cert and --tls-key go together" in record["message"]
    assert not list(tmp_path.iterdir()), "nothing may be created"


HEALTH_PROBE = """
import sys
from transaction_service.cli.main import main
code = main(["health", "--address", "127.0.0.1:1", "--timeout", "0.5"])
print(" ".join(sorted(sys.modules)))
sys.exit(code)
"""


def test_the_health_command_imports_nothing_of_the_server() -> None:
    """Probes run `transaction-service health` every few seconds on busy machines: it must not
    import the rest of the service (the whole CLI took 4.7-12.6 s to import with both cores
    busy, past the HEALTHCHECK's timeout)."""
    result = subprocess.run(
        [sys.executable, "-c", HEALTH_PROBE], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1, result.stderr  # nothing listens on port 1: one line, exit 1
    modules = set(result.stdout.split())
    ours = {m for m in modules if m.split(".")[0] == "transaction_service"}
    # The command line's own modules only: nothing of the server, the settings or the store.
    assert all(
        m in ("transaction_service", "transaction_service.cli")
        or m.startswith("transaction_service.cli.")
        for m in ours
    ), ours
    heavy = {"pydantic", "aiohttp", "asyncpg", "aiosqlite", "prometheus_client", "opentelemetry"}
    assert not heavy & {m.split(".")[0] for m in modules}


def test_the_server_imports_httpx_only_for_a_junction_client() -> None:
    """httpx is imported when a JunctionClient is made (a Junction API key is configured): the
    server's modules alone must not import it, nor build the reference models' validators
    (each a share of every server's start; see docs/performance.md)."""
    probe = (
        "import sys\n"
        "import transaction_service.server\n"
        "from transaction_service.domain.payload import OrderEnvelope\n"
        "print('httpx' in sys.modules, OrderEnvelope.__pydantic_complete__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.split() == ["False", "False"]


def locked(name: str) -> dict[str, str]:
    """Package name -> version pinned in the lock file `name`."""
    pins = re.findall(r"^([A-Za-z0-9._-]+)==([^\s;\\]+)", (ROOT / name).read_text(), re.MULTILINE)
    return {canonicalize_name(package): version for package, version in pins}


def test_the_locks_satisfy_pyproject() -> None:
    """Every dependency in pyproject.toml is pinned in the locks at a version it allows, and the
    runtime lock pins the same versions as the dev lock: the image and a test run get the same
    packages. After changing a dependency: `make lock`."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    # The repository's own distributions are installed from their folders, not from the locks.
    sources = pyproject.get("tool", {}).get("uv", {}).get("sources", {})
    local = {canonicalize_name(project["name"])} | {canonicalize_name(n) for n in sources}
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


# -- the Dockerfile --------------------------------------------------------------------------------

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def test_the_dockerfile_pins_its_base_installs_the_lock_and_runs_as_a_numeric_user() -> None:
    base = re.search(
        r"^ARG PYTHON_IMAGE=python:3\.11-slim@sha256:([0-9a-f]{64})$", DOCKERFILE, re.M
    )
    assert base, "the base image is pinned by digest"
    assert f'org.opencontainers.image.base.digest="sha256:{base.group(1)}"' in DOCKERFILE
    assert re.findall(r"^FROM (\S+)", DOCKERFILE, re.M) == ["${PYTHON_IMAGE}"] * 2
    assert "RUN pip install --require-hashes --no-deps -r requirements.lock" in DOCKERFILE
    assert "RUN pip install --no-deps ." in DOCKERFILE
    # A kubelet can check runAsNonRoot only for a numeric user.
    assert re.findall(r"^USER (\S+)$", DOCKERFILE, re.M) == ["10001:10001"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert f"ARG VERSION={project['version']}" in DOCKERFILE
    for label in ("title", "description", "version", "revision", "base.name", "base.digest"):
        assert f"org.opencontainers.image.{label}=" in DOCKERFILE


# -- Kubernetes and compose ------------------------------------------------------------------------

KUSTOMIZE = ROOT / "deploy" / "kubernetes"
KUBECTL = shutil.which("kubectl")
SETTINGS = {env_name(field) for field in Settings.model_fields}


def kustomize(folder: str) -> dict[str, dict[str, Any]]:
    """`kubectl kustomize deploy/kubernetes/FOLDER`, by kind."""
    if KUBECTL is None:
        pytest.skip("kubectl (with kustomize) is not installed: the manifests were not rendered")
    rendered = subprocess.run(
        [KUBECTL, "kustomize", str(KUSTOMIZE / folder)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return {doc["kind"]: doc for doc in yaml.safe_load_all(rendered)}


def container_env(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return {item["name"]: item for item in container.get("env", [])}


def seconds(env: dict[str, dict[str, Any]], name: str, default: float) -> float:
    return float(env[name]["value"]) if name in env else default


def test_the_kubernetes_base_runs_locked_down_with_probes_and_a_consistent_shutdown() -> None:
    objects = kustomize("base")
    assert {"Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor"} <= set(objects)
    deployment = objects["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert (security["runAsUser"], security["runAsGroup"]) == (10001, 10001)  # the image's USER
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["readinessProbe"]["grpc"]["port"] == 50051
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert {"cpu", "memory"} <= set(container["resources"]["limits"])
    # The grace period covers the preStop pause, the service's own delay and its drain.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    env = container_env(deployment)
    needed = (
        float(pre_stop[1])
        + seconds(env, "TRANSACTION_SERVICE_SHUTDOWN_DELAY_SECONDS", 0.0)
        + seconds(env, "TRANSACTION_SERVICE_SHUTDOWN_GRACE_SECONDS", 10.0)
    )
    assert pod["terminationGracePeriodSeconds"] >= needed + 3
    assert set(env) <= SETTINGS | {"OTEL_EXPORTER_OTLP_ENDPOINT"}
    # SQLite: one owner of the file.
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    ports = {p["name"]: p["port"] for p in objects["Service"]["spec"]["ports"]}
    assert ports == {"grpc": 50051, "http": 8080}
    labels = deployment["spec"]["selector"]["matchLabels"]
    assert objects["Service"]["spec"]["selector"] == labels
    assert objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == labels
    [endpoint] = objects["ServiceMonitor"]["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")


def test_the_postgres_overlay_runs_replicas_with_every_secret_from_a_secret() -> None:
    objects = kustomize("overlays/postgres")
    assert "PersistentVolumeClaim" not in objects
    deployment = objects["Deployment"]
    assert deployment["spec"]["replicas"] >= 2
    env = container_env(deployment)
    for name in (
        "TRANSACTION_SERVICE_DB",
        "TRANSACTION_SERVICE_INGEST_TOKENS",
        "TRANSACTION_SERVICE_READ_TOKENS",
        "TRANSACTION_SERVICE_WEBHOOK_SECRETS",
    ):
        assert set(env[name]) == {"name", "valueFrom"}, env[name]
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "transaction-service"
    assert set(env) <= SETTINGS | {"OTEL_EXPORTER_OTLP_ENDPOINT"}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert "persistentVolumeClaim" not in volumes["data"]
    [endpoint] = objects["ServiceMonitor"]["spec"]["endpoints"]
    assert endpoint["authorization"]["credentials"]["name"] == "transaction-service"


def test_compose_runs_two_replicas_on_postgres_with_a_collector() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    replicas = {name: s for name, s in services.items() if "build" in s}
    assert len(replicas) == 2
    collector = yaml.safe_load((ROOT / "deploy" / "otel-collector.yaml").read_text())
    http_port = collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"].rsplit(":", 1)[1]
    host_ports = []
    for replica in replicas.values():
        env = replica["environment"]
        settings = {k: v for k, v in env.items() if k.startswith("TRANSACTION_SERVICE_")}
        assert set(settings) <= SETTINGS
        Settings(**{k.removeprefix("TRANSACTION_SERVICE_").lower(): v for k, v in settings.items()})
        assert env["TRANSACTION_SERVICE_DB"].startswith("postgresql://")
        assert "@postgres:5432/" in env["TRANSACTION_SERVICE_DB"]
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://otel-collector:{http_port}"
        assert replica["user"] == "10001:10001"
        assert replica["read_only"] is True
        grace = float(env["TRANSACTION_SERVICE_SHUTDOWN_GRACE_SECONDS"])
        assert float(replica["stop_grace_period"].removesuffix("s")) > grace
        host_ports += [port.rsplit(":", 2)[1] for port in replica["ports"]]
    assert len(host_ports) == len(set(host_ports)) == 4
    assert {"postgres", "otel-collector"} <= set(services)
