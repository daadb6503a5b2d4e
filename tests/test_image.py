"""The image, built from the Dockerfile and run with podman the way a platform team would.

Built on a stand-in for `python:3.11-slim` (Debian's Python; no registry is reachable here), it
must: carry its HEALTHCHECK, OCI labels and numeric user; become healthy by running that
HEALTHCHECK; ingest and answer over gRPC and HTTP; write only /data, as uid 10001; log JSON
lines only, when asked to; stop gracefully on SIGTERM (exit 0); and serve the same state from a
new container on the same volume. Then the Kubernetes base (deploy/kubernetes/base, rendered by
`kubectl kustomize`) runs under `podman play kube` and keeps its state across a restart.

What podman cannot show (docs/deploy.md): it ignores Services, readiness and `grpc:` probes,
preStop hooks and terminationGracePeriodSeconds; without systemd no health check runs by itself
(here they are run with `podman healthcheck run`).

Skipped, loudly (see conftest.py), where podman cannot run: `.ci/run` installs it. The step
times are printed in the run's summary.
"""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.podman import (
    IMAGE,
    SKIPPED,
    TIMES,
    build,
    ensure_standin,
    podman,
    timed,
    unavailable_reason,
)
from tests.process import RICHEST
from tests.webhook_tools import request
from transactions.v1 import transactions_pb2 as pb
from transactions.v1 import transactions_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
KUBE_BASE = ROOT / "deploy" / "kubernetes" / "base"
WAIT = 120.0
# Building takes minutes on a cold cache; on a loaded machine, more.
pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def image() -> str:
    if (reason := unavailable_reason()) is not None:
        SKIPPED.append(reason)
        pytest.skip(reason)
    revision = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()
    ensure_standin()
    build(ROOT, revision)
    return IMAGE


@pytest.fixture
def names() -> Iterator[dict[str, str]]:
    """Names of this test's containers, pods and volumes (unique: runs may overlap), removed
    afterwards whatever happened."""
    suffix = secrets.token_hex(3)
    made = {kind: f"txtest-{kind}-{suffix}" for kind in ("a", "b", "data", "kube")}
    yield made
    podman("rm", "-f", "-t", "0", made["a"], made["b"], check=False)
    podman("volume", "rm", "-f", made["data"], check=False)


def port_of(container: str, port: int) -> int:
    mapped = podman("port", container, f"{port}/tcp").stdout.strip().splitlines()[0]
    return int(mapped.rsplit(":", 1)[1])


def wait_healthy(container: str) -> None:
    """Run the image's HEALTHCHECK until it passes (without systemd nothing runs it)."""
    deadline = time.monotonic() + WAIT
    while podman("healthcheck", "run", container, check=False).returncode != 0:
        if time.monotonic() > deadline:
            logs = podman("logs", container, check=False)
            pytest.fail(f"{container} not healthy after {WAIT} s:\n{logs.stdout}{logs.stderr}")
        time.sleep(0.5)


def wait_serving(address: str) -> None:
    deadline = time.monotonic() + WAIT
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                answer = health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{address} not SERVING after {WAIT} s")
            time.sleep(0.5)


def ingest(address: str) -> pb.IngestEventResponse:
    delivery = RICHEST["deliveries"][0]
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.TransactionServiceStub(channel).IngestEvent(
            pb.IngestEventRequest(
                event_id=delivery["svix_id"], payload_json=json.dumps(delivery["body"])
            ),
            timeout=30,
        )


def get(address: str, transaction_id: str) -> pb.GetTransactionResponse:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.TransactionServiceStub(channel).GetTransaction(
            pb.GetTransactionRequest(transaction_id=transaction_id), timeout=30
        )


def test_the_image_runs_healthy_as_uid_10001_stops_gracefully_and_keeps_its_state(
    image: str, names: dict[str, str]
) -> None:
    inspected = json.loads(podman("image", "inspect", image).stdout)[0]
    config = inspected["Config"]
    assert config["User"] == "10001:10001"
    assert inspected["Healthcheck"]["Test"][1:3] == ["transaction-service", "health"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.title"] == "transaction-service"
    assert labels["org.opencontainers.image.base.digest"].startswith("sha256:")
    TIMES["image size (MB)"] = round(inspected["Size"] / 1e6)

    started = time.monotonic()
    podman("volume", "create", names["data"])
    podman(
        "run", "-d", "--name", names["a"], "-p", "127.0.0.1::50051", "-p", "127.0.0.1::8080",
        "-v", f"{names['data']}:/data", "-e", "TRANSACTION_SERVICE_LOG_FORMAT=json", image,
    )  # fmt: skip
    wait_healthy(names["a"])
    timed("run to healthy (HEALTHCHECK)", started)
    started = time.monotonic()
    podman("healthcheck", "run", names["a"])
    timed("one HEALTHCHECK run", started)

    address = f"127.0.0.1:{port_of(names['a'], 50051)}"
    http_port = port_of(names["a"], 8080)
    answer = ingest(address)
    assert answer.outcome == pb.INGEST_OUTCOME_APPLIED
    transaction_id, revision = answer.transaction.id, answer.revision
    assert get(address, transaction_id).transaction.revision == revision
    assert request(http_port, "GET", "/readyz").status == 200
    metrics = request(http_port, "GET", "/metrics").body.decode()
    assert 'grpc_server_handled_total{grpc_code="OK",grpc_method="IngestEvent"' in metrics
    assert "transaction_service_build_info{" in metrics

    # Only /data is the app's: it runs as 10001 and cannot change its own code.
    assert podman("exec", names["a"], "id", "-u").stdout.strip() == "10001"
    owners = podman("exec", names["a"], "stat", "-c", "%n %u", "/data", "/data/transactions.db")
    assert owners.stdout.split() == ["/data", "10001", "/data/transactions.db", "10001"]
    assert podman("exec", names["a"], "touch", "/opt/venv/x", check=False).returncode != 0

    started = time.monotonic()
    podman("stop", "-t", "15", names["a"])
    timed("podman stop (SIGTERM to exit)", started)
    state = json.loads(podman("inspect", names["a"]).stdout)[0]["State"]
    assert state["ExitCode"] == 0, "SIGTERM is handled: not killed"
    logs = podman("logs", names["a"])
    lines = [json.loads(line) for line in (logs.stdout + logs.stderr).splitlines()]
    assert lines[-1]["message"] == "stopped"

    started = time.monotonic()
    podman(
        "run", "-d", "--name", names["b"], "-p", "127.0.0.1::50051",
        "-v", f"{names['data']}:/data", image,
    )  # fmt: skip
    address = f"127.0.0.1:{port_of(names['b'], 50051)}"
    wait_serving(address)
    timed("new container on the same volume to SERVING", started)
    assert get(address, transaction_id).transaction.revision == revision


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def for_podman(objects: list[dict[str, Any]], suffix: str, image: str) -> list[dict[str, Any]]:
    """The rendered base, made playable here: this run's image (never pulled), host ports on
    loopback (podman ignores Services), names of this run. Nothing else changes."""
    ports = {"grpc": free_port(), "http": free_port()}
    playable = []
    for obj in objects:
        obj["metadata"]["name"] += f"-{suffix}"
        if obj["kind"] == "Deployment":
            pod = obj["spec"]["template"]["spec"]
            for volume in pod["volumes"]:
                if "persistentVolumeClaim" in volume:
                    volume["persistentVolumeClaim"]["claimName"] += f"-{suffix}"
            [container] = pod["containers"]
            container["image"] = image
            container["imagePullPolicy"] = "Never"
            for port in container["ports"]:
                port["hostPort"] = ports[port["name"]]
                port["hostIP"] = "127.0.0.1"
        if obj["kind"] in ("Deployment", "PersistentVolumeClaim", "Service"):
            playable.append(obj)
    return playable


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
def test_the_kubernetes_base_plays_under_podman_and_keeps_its_state(
    image: str, tmp_path: Path, names: dict[str, str]
) -> None:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(KUBE_BASE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    suffix = names["kube"].rsplit("-", 1)[1]
    objects = for_podman(list(yaml.safe_load_all(rendered)), suffix, image)
    claims = [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    workload = [o for o in objects if o["kind"] != "PersistentVolumeClaim"]
    # podman 4.3 cannot play a claim whose volume exists: the claim is played once, on its own.
    (tmp_path / "pvc.yaml").write_text(yaml.safe_dump_all(claims))
    manifest = tmp_path / "workload.yaml"
    manifest.write_text(yaml.safe_dump_all(workload))
    [deployment] = [o for o in workload if o["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    grpc_port = next(p["hostPort"] for p in container["ports"] if p["name"] == "grpc")
    address = f"127.0.0.1:{grpc_port}"
    volume = claims[0]["metadata"]["name"]
    try:
        podman("play", "kube", str(tmp_path / "pvc.yaml"))
        started = time.monotonic()
        podman("play", "kube", str(manifest))
        wait_serving(address)
        timed("play kube to SERVING", started)
        pod = f"{deployment['metadata']['name']}-pod-0"  # podman 4.3's naming
        inside = json.loads(podman("inspect", f"{pod}-{container['name']}").stdout)[0]
        assert inside["Config"]["User"] == "10001:10001"
        assert inside["HostConfig"]["ReadonlyRootfs"] is True
        assert inside["HostConfig"]["CapDrop"]
        answer = ingest(address)
        assert answer.outcome == pb.INGEST_OUTCOME_APPLIED

        started = time.monotonic()
        podman("pod", "stop", "-t", "15", pod)
        timed("pod stop", started)
        stopped = json.loads(podman("inspect", f"{pod}-{container['name']}").stdout)[0]
        assert stopped["State"]["ExitCode"] == 0
        podman("play", "kube", "--down", str(manifest))
        podman("play", "kube", str(manifest))
        wait_serving(address)
        kept = get(address, answer.transaction.id)
        assert kept.transaction.revision == answer.revision
    finally:
        podman("play", "kube", "--down", str(manifest), check=False)
        podman("volume", "rm", "-f", volume, check=False)
