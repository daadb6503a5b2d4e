"""Shared test helpers: the delivery scenarios (copied from the provider-shaped fixtures) and an
in-process server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from tests import podman
from tests.fake_junction import FakeJunction
from tests.harness import Running, loopback_settings
from tests.pg import SETTING as PG_SETTING
from tests.pg import fresh_database, unavailable_reason
from transaction_service.server import TransactionService
from transactions.v1 import transactions_pb2_grpc as pb_grpc

FIXTURES = Path(__file__).parent / "fixtures" / "junction"
# A small body limit for the in-process server, so oversized bodies are cheap to make.
BODY_LIMIT = 64 * 1024


def load_scenarios() -> list[dict[str, Any]]:
    """Each scenario: {scenario, note, deliveries: [{svix_id, body}], expect}."""
    return [json.loads(p.read_text()) for p in sorted(FIXTURES.glob("*.json"))]


SCENARIOS = load_scenarios()


def pytest_configure(config: pytest.Config) -> None:
    """Compile the service's and the client's modules to .pyc before any test starts a process.
    Where PYTHONDONTWRITEBYTECODE is set (some shells and CI images), Python never writes them,
    and every process a test starts compiled the whole service from source: a server's start
    took 2,279 M instructions instead of 1,692 M (callgrind). Files already compiled are only
    checked (a stat each)."""
    if hasattr(config, "workerinput"):
        return  # an xdist worker: the controller has compiled them before starting it
    import compileall

    root = Path(__file__).resolve().parent.parent
    for tree in (root / "src", root / "client" / "src"):
        compileall.compile_dir(tree, quiet=2)


@pytest.fixture(params=SCENARIOS, ids=[s["scenario"] for s in SCENARIOS])
def scenario(request: pytest.FixtureRequest) -> dict[str, Any]:
    return request.param


STORES = ["sqlite", "postgres"]


@contextmanager
def database(kind: str, tmp_path: Path) -> Iterator[str]:
    """A fresh database of the kind: a SQLite file, or a new PostgreSQL schema."""
    if kind == "postgres":
        with fresh_database() as url:
            yield url
    else:
        yield str(tmp_path / "api.db")


@pytest.fixture(params=STORES)
def store_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@asynccontextmanager
async def running(kind: str, tmp_path: Path) -> AsyncIterator[Running]:
    """The service in process on a fresh database of the kind, with a stub connected to it."""
    with database(kind, tmp_path) as db:
        settings = loopback_settings(db, max_body_bytes=BODY_LIMIT)
        service = TransactionService(settings)
        port = await service.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Running(service, pb_grpc.TransactionServiceStub(channel), settings.db)
        await service.stop()


@pytest.fixture
async def api(tmp_path: Path, store_kind: str) -> AsyncIterator[Running]:
    """The service in process, on each store in turn, with a stub connected to it."""
    async with running(store_kind, tmp_path) as started:
        yield started


@pytest_asyncio.fixture(scope="class", loop_scope="class", params=STORES)
async def class_api(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Running]:
    """One service per store for all the tests of a class (mark the class
    `pytest.mark.asyncio(loop_scope="class")`): for many cases that each leave the store as
    they found it, such as refused requests."""
    async with running(request.param, tmp_path_factory.mktemp("class_api")) as started:
        yield started


# The test files that take longest, longest first (wall time, measured with --durations=0).
# `make test` hands whole files to its workers in collection order (--dist loadfile
# --no-loadscope-reorder), so these start first and the short files fill in around them,
# instead of a long file starting last and running alone at the end. The image test leads:
# on a machine where podman has no stand-in base yet, making it takes about three minutes.
LONGEST_FIRST = [
    "test_image.py",
    "test_server_process.py",
    "test_client.py",
    "test_faults.py",
    "test_abuse_ingest.py",
    "test_http_process.py",
    "test_bench.py",
    "test_grpc_api.py",
    "test_reconcile.py",
    "test_fault_logs.py",
    "test_abuse_edge.py",
    "test_abuse_reads.py",
    "test_watch.py",
    "test_reconcile_process.py",
    "test_retention_privacy.py",
    "test_readme.py",
    "test_ingest.py",
    "test_replicas.py",
    "test_history.py",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """The image test's skip reason and step times ride on its reports: under pytest-xdist the
    test runs in a worker, and the summary is written by the controller."""
    outcome = yield
    if item.path.name == "test_image.py" and (podman.SKIPPED or podman.TIMES):
        image = {"skipped": list(podman.SKIPPED), "times": dict(podman.TIMES)}
        outcome.get_result().user_properties.append(("image", image))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for name, value in report.user_properties:
        if name == "image":
            podman.SKIPPED.extend(r for r in value["skipped"] if r not in podman.SKIPPED)
            podman.TIMES.update(value["times"])


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say loudly when the PostgreSQL suite or the image test did not run; give the image
    test's step times when it did."""
    if (reason := unavailable_reason()) is not None:
        terminalreporter.write_sep("!", "PostgreSQL suite SKIPPED", red=True, bold=True)
        terminalreporter.write_line(
            f"{reason}. Point {PG_SETTING} at a PostgreSQL server to run it.", red=True
        )
    if podman.SKIPPED:
        terminalreporter.write_sep("!", "image test SKIPPED", red=True, bold=True)
        terminalreporter.write_line(
            f"{podman.SKIPPED[0]}: the image was neither built nor run.", red=True
        )
    if podman.TIMES:
        terminalreporter.write_sep("-", "image test (seconds)")
        for step, seconds in podman.TIMES.items():
            terminalreporter.write_line(f"{step}: {seconds}")


@pytest.fixture
def fake_junction() -> Iterator[FakeJunction]:
    """A fake Junction API on a free port (`.base_url`), stopped after the test; sync or async."""
    with FakeJunction() as fake:
        yield fake
