"""Shared test helpers: the delivery scenarios (copied from the provider-shaped fixtures) and an
in-process server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.harness import Running
from transaction_service.config import Settings
from transaction_service.server import TransactionService
from transactions.v1 import transactions_pb2_grpc as pb_grpc

FIXTURES = Path(__file__).parent / "fixtures" / "junction"
# A small body limit for the in-process server, so oversized bodies are cheap to make.
BODY_LIMIT = 64 * 1024


def load_scenarios() -> list[dict[str, Any]]:
    """Each scenario: {scenario, note, deliveries: [{svix_id, body}], expect}."""
    return [json.loads(p.read_text()) for p in sorted(FIXTURES.glob("*.json"))]


SCENARIOS = load_scenarios()


@pytest.fixture(params=SCENARIOS, ids=[s["scenario"] for s in SCENARIOS])
def scenario(request: pytest.FixtureRequest) -> dict[str, Any]:
    return request.param


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Running]:
    settings = Settings(
        grpc_host="127.0.0.1",
        grpc_port=0,
        http_host="127.0.0.1",
        http_port=0,
        db=tmp_path / "api.db",
        max_body_bytes=BODY_LIMIT,
        sqlite_synchronous="NORMAL",
        shutdown_grace_seconds=1,
    )
    service = TransactionService(settings)
    port = await service.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield Running(service, pb_grpc.TransactionServiceStub(channel), settings.db)
    await service.stop()
