"""The webhook endpoint in process, where the tests need to reach inside: a store that cannot
commit, and a stop while webhooks are in flight."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import SCENARIOS
from tests.harness import loopback_settings
from tests.scenario_tools import with_fresh_ids
from tests.webhook_tools import SECRET, WEBHOOK_PATH, body_of, signed_headers
from transaction_service.app import App
from transaction_service.config import Settings
from transaction_service.server import TransactionService
from transaction_service.store.sqlite import SqliteStore

DELIVERY = SCENARIOS[0]["deliveries"][0]


def settings_for(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"shutdown_grace_seconds": 5, "webhook_secrets": [SECRET]}
    db = overrides.pop("db", tmp_path / "x.db")
    return loopback_settings(db, **(values | overrides))


def stored_event_ids(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {row[0] for row in conn.execute("SELECT event_id FROM events")}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


class FlakyStore(SqliteStore):
    """SQLite, except that commits fail while `failing` is set (a full disk, a lost database)."""

    failing = False

    def _check_identity(self) -> None:
        # Runs inside every write, before the commit: a disk fault there is what SQLite raises.
        if self.failing:
            raise sqlite3.OperationalError("disk I/O error")
        super()._check_identity()


async def test_webhook_gets_503_when_the_store_cannot_commit(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A commit failure is 503 (Svix retries), stores nothing and shows no Python text; the
    retry after the store recovers is applied."""
    settings = settings_for(tmp_path)
    store = FlakyStore(settings.db, synchronous="NORMAL")
    service = TransactionService(settings, App(settings, store=store))
    await service.start()
    try:
        body = body_of(DELIVERY)
        url = f"http://127.0.0.1:{service.http_port}{WEBHOOK_PATH}"
        store.failing = True
        headers = signed_headers(SECRET, DELIVERY["svix_id"], body)
        async with session.post(url, data=body, headers=headers) as response:
            assert response.status == 503
            error = (await response.json())["error"]
            assert error["reason"] == "STORE_UNAVAILABLE"
            assert "disk I/O" not in error["message"]
        assert stored_event_ids(settings.db) == set()

        store.failing = False
        headers = signed_headers(SECRET, DELIVERY["svix_id"], body)
        async with session.post(url, data=body, headers=headers) as response:
            assert response.status == 200
            assert (await response.json())["outcome"] == "applied"
        metrics = service.app.metrics.registry.get_sample_value
        refused = metrics(
            "transaction_service_webhooks_refused_total", {"reason": "store_unavailable"}
        )
        assert refused == 1
    finally:
        await service.stop()


@pytest.mark.parametrize("prefix", ["svix-", "webhook-"])
async def test_webhooks_under_reserved_event_ids_are_refused_naming_the_header(
    tmp_path: Path, session: aiohttp.ClientSession, prefix: str
) -> None:
    """Issue 16, item 6: a signed webhook whose id takes a prefix of the service's own records
    (`api:`, `rebuild:`), or is a derived `sha256:` id of another body, is 400 naming the id's
    header; nothing is stored. The same body under its own id is taken in."""
    settings = settings_for(tmp_path)
    service = TransactionService(settings)
    await service.start()
    try:
        url = f"http://127.0.0.1:{service.http_port}{WEBHOOK_PATH}"
        body = body_of(DELIVERY)
        for event_id in ("api:sha256:" + "0" * 64, "rebuild:x:y", "Api:results:x", "sha256:0"):
            headers = signed_headers(SECRET, event_id, body, prefix=prefix)
            async with session.post(url, data=body, headers=headers) as response:
                assert response.status == 400, event_id
                error = (await response.json())["error"]
            assert [v["field"] for v in error["field_violations"]] == [f"{prefix}id"]
            assert "Traceback" not in error["message"]
            # A webhook's sender cannot leave its id empty: no such advice.
            assert "event_id" not in error["message"]
        assert stored_event_ids(settings.db) == set()
        headers = signed_headers(SECRET, DELIVERY["svix_id"], body, prefix=prefix)
        async with session.post(url, data=body, headers=headers) as response:
            assert response.status == 200
        assert stored_event_ids(settings.db) == {DELIVERY["svix_id"]}
    finally:
        await service.stop()


class GatedStore(SqliteStore):
    """SQLite whose commits wait until `gate` is set; `blocked` is set once one is waiting."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = asyncio.Event()
        self.blocked = asyncio.Event()

    async def write(self, keys: Any, plan: Any) -> Any:
        self.blocked.set()
        await self.gate.wait()
        return await super().write(keys, plan)


async def test_stopping_answers_in_flight_webhooks_and_refuses_new_ones(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Webhooks pouring in when the service stops, with a commit in progress: the stop waits
    for it; each webhook is answered 200 (and is then in the store) or refused with 503, or
    cannot connect any more; none is a 500."""
    settings = settings_for(tmp_path)
    store = GatedStore(settings.db, synchronous="NORMAL")
    service = TransactionService(settings, App(settings, store=store))
    await service.start()
    url = f"http://127.0.0.1:{service.http_port}{WEBHOOK_PATH}"
    deliveries = [d for _ in range(20) for d in with_fresh_ids(SCENARIOS[0])["deliveries"]]

    async def send(delivery: dict[str, Any]) -> tuple[str, int | None]:
        body = body_of(delivery)
        headers = signed_headers(SECRET, delivery["svix_id"], body)
        try:
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                return delivery["svix_id"], response.status
        except aiohttp.ClientError:
            return delivery["svix_id"], None

    sends = [asyncio.ensure_future(send(d)) for d in deliveries]
    async with asyncio.timeout(30):
        await store.blocked.wait()
    stopping = asyncio.ensure_future(service.stop())
    async with asyncio.timeout(30):
        while not service.app.stopping:
            await asyncio.sleep(0.01)
    store.gate.set()
    await stopping
    results = await asyncio.gather(*sends)
    assert {status for _, status in results} <= {200, 503, None}
    acknowledged = {event_id for event_id, status in results if status == 200}
    assert acknowledged, "no webhook was in flight when the stop began"
    assert acknowledged <= stored_event_ids(settings.db)
