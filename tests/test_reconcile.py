"""Reconcile with Junction's API, back-fill and combined results, in process, against the fake
Junction API, on SQLite and PostgreSQL alike (the store is where markers, results and the
RESULTS_READY revision live)."""

from __future__ import annotations

import asyncio
import copy
import json
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from tests.conftest import SCENARIOS, database
from tests.fake_junction import FakeJunction
from tests.harness import Running, check_expect, error_info, ingest, loopback_settings
from tests.pg import table_rows
from tests.scenario_tools import corrected, with_fresh_ids
from transaction_service.config import Settings
from transaction_service.domain.state import Knowledge, TransactionStatus, TransactionView
from transaction_service.junction.answers import TransactionResults
from transaction_service.server import TransactionService
from transaction_service.store.base import (
    BatchState,
    PendingResults,
    StoredTransaction,
)
from transaction_service.store.memory import MemoryStore
from transaction_service.usecases.commit import CommitPath
from transaction_service.usecases.ingest import Delivery, decode_delivery
from transaction_service.usecases.plan import batch_keys, plan_batch
from transaction_service.usecases.results import ResultsFetcher, plan_fetched
from transactions.v1 import transactions_pb2 as pb
from transactions.v1 import transactions_pb2_grpc as pb_grpc

REDRAW = next(s for s in SCENARIOS if s["scenario"] == "redraw_completed")
API_KEY = "test-junction-key"
WAIT = 20.0
T = TypeVar("T")


def service_settings(db: str, fake: FakeJunction | None, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"junction_timeout_seconds": 2}
    if fake is not None:
        values |= {"junction_api_key": fake.api_key, "junction_base_url": fake.base_url}
    return loopback_settings(db, **(values | overrides))


class Services:
    """Services in process on one fresh database (of the test's store kind); `start` as many as
    a test needs, one after the other; all are stopped at the end."""

    def __init__(self, db: str) -> None:
        self.db = db
        self.running: list[tuple[TransactionService, grpc.aio.Channel]] = []

    async def __call__(self, fake: FakeJunction | None, **overrides: Any) -> Running:
        service = TransactionService(service_settings(self.db, fake, **overrides))
        port = await service.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.running.append((service, channel))
        return Running(service, pb_grpc.TransactionServiceStub(channel), self.db)

    async def stop(self, api: Running) -> None:
        for service, channel in list(self.running):
            if service is api.service:
                self.running.remove((service, channel))
                await channel.close()
                await service.stop()


@pytest.fixture
async def start(tmp_path: Path, store_kind: str) -> AsyncIterator[Services]:
    with database(store_kind, tmp_path) as db:
        services = Services(db)
        yield services
        for service, channel in services.running:
            await channel.close()
            await service.stop()


async def eventually(check: Callable[[], Awaitable[T | None]], what: str) -> T:
    """The first truthy result of `check()`, polled until a deadline."""
    try:
        async with asyncio.timeout(WAIT):
            while not (found := await check()):
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"{what} did not happen within {WAIT} s")
    return found


def event_sources(api: Running) -> dict[str, str]:
    """Event id -> the source it was recorded with."""
    sql = "SELECT event_id, source FROM events"
    if str(api.db).startswith("postgresql://"):
        return {r["event_id"]: r["source"] for r in table_rows(str(api.db), sql)}
    with sqlite3.connect(api.db) as conn:
        return dict(conn.execute(sql).fetchall())


async def feed_until(
    stub: pb_grpc.TransactionServiceStub, stop_when: Callable[[pb.TransactionChange], bool]
) -> list[pb.TransactionChange]:
    """Every change from the start of the log up to the first one `stop_when` accepts."""
    seen: list[pb.TransactionChange] = []
    call = stub.WatchTransactions(pb.WatchTransactionsRequest(start_revision=0))
    try:
        async with asyncio.timeout(WAIT):
            async for message in call:
                if message.WhichOneof("event") == "change":
                    seen.append(message.change)
                    if stop_when(message.change):
                        return seen
    except TimeoutError:
        pytest.fail(f"the awaited change never came; saw {[list(c.kinds) for c in seen]}")
    finally:
        call.cancel()
    raise AssertionError("the stream ended")


def kinds_of(changes: list[pb.TransactionChange], transaction_id: str) -> list[int]:
    return [k for c in changes if c.transaction.id == transaction_id for k in c.kinds]


# --------------------------------------------------------------------------------------------------
# ReconcileTransaction
# --------------------------------------------------------------------------------------------------


async def test_reconcile_makes_good_a_missing_last_webhook_and_that_webhook_is_then_stale(
    start: Services,
    fake_junction: FakeJunction,
    scenario: dict[str, Any],
) -> None:
    """The last webhook of a scenario never came: a reconcile reaches the expected state, its
    answers recorded as events with source api; the webhook arriving afterwards is STALE and a
    second reconcile changes nothing (every answer DUPLICATE)."""
    api = await start(fake_junction)
    *delivered, missing = scenario["deliveries"]
    for delivery in delivered:
        await ingest(api, delivery["svix_id"], delivery["body"])
    fake_junction.load_scenario(scenario)
    expect = scenario["expect"]

    first = await api.stub.ReconcileTransaction(
        pb.ReconcileTransactionRequest(transaction_id=expect["transaction_id"])
    )

    assert first.changed
    check_expect(first.transaction, expect)
    assert first.revision >= first.transaction.revision
    endpoints = {a.endpoint for a in first.answers}
    assert endpoints == {"GET /v3/order/{order_id}", "GET /v3/order_transaction/{transaction_id}"}
    sources = event_sources(api)
    assert all(sources[a.event_id] == "api" for a in first.answers)
    assert {d["svix_id"] for d in delivered} <= {e for e, s in sources.items() if s == "grpc"}

    late = await ingest(api, missing["svix_id"], missing["body"])
    assert late.outcome == pb.INGEST_OUTCOME_STALE

    again = await api.stub.ReconcileTransaction(
        pb.ReconcileTransactionRequest(order_id=expect["initial_order_id"])
    )
    assert not again.changed
    assert {a.outcome for a in again.answers} == {pb.INGEST_OUTCOME_DUPLICATE}
    now = await api.stub.GetTransaction(
        pb.GetTransactionRequest(transaction_id=expect["transaction_id"])
    )
    assert again.transaction == now.transaction


async def test_reconcile_by_order_id_learns_a_transaction_never_heard_of(
    start: Services, fake_junction: FakeJunction
) -> None:
    api = await start(fake_junction)
    fake_junction.load_scenario(REDRAW)
    expect = REDRAW["expect"]

    reconciled = await api.stub.ReconcileTransaction(
        pb.ReconcileTransactionRequest(order_id=expect["redraw_order_id"])
    )

    check_expect(reconciled.transaction, expect)
    # The listed orders and the transaction, each asked once.
    assert len(fake_junction.requests_to("order_transaction")) == 1
    assert {r.path for r in fake_junction.requests_to("order")} == {
        f"/v3/order/{order_id}" for order_id in expect["orders"]
    }


@pytest.mark.parametrize("spelling", ["last_status", "low_level_status"])
async def test_the_transaction_answer_in_either_status_spelling_completes_the_transaction(
    start: Services, spelling: str
) -> None:
    """Junction's transaction endpoint alone (its orders cannot be shown) still brings the final
    status, whichever name its orders' status field has."""
    with FakeJunction(API_KEY, status_spelling=spelling) as fake:  # type: ignore[arg-type]
        api = await start(fake)
        last = REDRAW["deliveries"][-1]["body"]
        fake.add_transaction(last["data"]["order_transaction"], team_id=last.get("team_id"))
        reconciled = await api.stub.ReconcileTransaction(
            pb.ReconcileTransactionRequest(transaction_id=REDRAW["expect"]["transaction_id"])
        )
    check_expect(reconciled.transaction, REDRAW["expect"])


async def test_reconcile_errors_are_honest_status_codes(
    start: Services, fake_junction: FakeJunction
) -> None:
    """Not configured: FAILED_PRECONDITION naming the setting. Unknown to Junction: NOT_FOUND.
    Refused for good (a wrong key, 422): FAILED_PRECONDITION with the provider's message, asked
    once. Still failing after the retries: UNAVAILABLE. A bad lookup: INVALID_ARGUMENT."""
    bare = await start(None)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await bare.stub.ReconcileTransaction(pb.ReconcileTransactionRequest(order_id="o-1"))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "TRANSACTION_SERVICE_JUNCTION_API_KEY" in (caught.value.details() or "")
    assert error_info(caught.value).reason == "JUNCTION_NOT_CONFIGURED"
    await start.stop(bare)

    api = await start(fake_junction)
    fake_junction.load_scenario(REDRAW)
    transaction_id = REDRAW["expect"]["transaction_id"]
    cases: list[tuple[Callable[[], None], grpc.StatusCode, str]] = [
        (lambda: None, grpc.StatusCode.INVALID_ARGUMENT, "transaction_id"),
        (lambda: None, grpc.StatusCode.NOT_FOUND, "Order transaction not found"),
        (
            lambda: fake_junction.fail("order_transaction", 422, message="Invalid transaction id"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "answered 422 Unprocessable Entity: 'Invalid transaction id'",
        ),
        (
            lambda: fake_junction.fail("order_transaction", 503, times=5),
            grpc.StatusCode.UNAVAILABLE,
            "5 attempts failed",
        ),
    ]
    lookups = [" ", "no-such-transaction", transaction_id, transaction_id]
    for (arrange, code, text), lookup in zip(cases, lookups, strict=True):
        arrange()
        before = len(fake_junction.requests_to("order_transaction"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await api.stub.ReconcileTransaction(
                pb.ReconcileTransactionRequest(transaction_id=lookup)
            )
        assert caught.value.code() == code, caught.value.details()
        assert text in (caught.value.details() or "")
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            assert len(fake_junction.requests_to("order_transaction")) == before + 1


async def test_a_legacy_stand_in_is_reconciled_through_its_order(
    start: Services, fake_junction: FakeJunction
) -> None:
    """A legacy order (no transaction block) stands in a transaction of its own whose id is the
    order's: reconciling that id asks Junction about the order, not about a transaction."""
    api = await start(fake_junction)
    body = copy.deepcopy(REDRAW["deliveries"][0]["body"])
    del body["data"]["order_transaction"]
    order_id = body["data"]["id"]
    await ingest(api, "msg-legacy-1", body)
    later = copy.deepcopy(body["data"])
    later["status"] = "cancelled"
    later["updated_at"] = "2026-03-20T00:00:00Z"
    later["events"].append(
        {
            "id": 99999,
            "created_at": "2026-03-20T00:00:00Z",
            "status": "cancelled.walk_in_test.cancelled",
        }
    )
    later["last_event"] = later["events"][-1]
    fake_junction.add_order(later)

    reconciled = await api.stub.ReconcileTransaction(
        pb.ReconcileTransactionRequest(transaction_id=order_id)
    )

    assert reconciled.transaction.legacy
    assert reconciled.transaction.status == pb.TRANSACTION_STATUS_CANCELLED
    assert [a.endpoint for a in reconciled.answers] == ["GET /v3/order/{order_id}"]
    assert fake_junction.requests_to("order_transaction") == []


# --------------------------------------------------------------------------------------------------
# Combined results
# --------------------------------------------------------------------------------------------------


def _corrected(body: dict[str, Any]) -> dict[str, Any]:
    """The redraw order's completion, corrected two days later."""
    return corrected(body, "2026-03-14T09:00:00Z", 9030)


def _corrected_again(body: dict[str, Any]) -> dict[str, Any]:
    """The redraw order's completion, corrected two days later and once more a day after that:
    a second correction event of the same low-level status, at a later time."""
    return corrected(_corrected(body), "2026-03-15T11:00:00Z", 9031)


async def _commit(store: MemoryStore, deliveries: list[Delivery], want: bool) -> int:
    """Commit in one batch; the revision of the last change."""

    applied, _ = await store.write(
        batch_keys(deliveries),
        lambda state: plan_batch(deliveries, state, datetime.now(UTC), want_results=want),
    )
    return applied.changes[-1].revision if applied.changes else 0


async def test_completion_and_correction_mark_results_in_their_own_commit_and_legacy_never() -> (
    None
):
    def delivery(event_id: str, body: dict[str, Any]) -> Delivery:
        return decode_delivery(event_id, payload=body, max_body_bytes=1 << 20)

    transaction_id = REDRAW["expect"]["transaction_id"]
    *before, completing = REDRAW["deliveries"]
    store = MemoryStore()
    await _commit(store, [delivery(d["svix_id"], d["body"]) for d in before], want=True)
    assert store.results_pending == {}

    completed_at = await _commit(store, [delivery("done", completing["body"])], want=True)
    assert store.results_pending[transaction_id].requested_revision == completed_at
    corrected_at = await _commit(
        store, [delivery("fix", _corrected(completing["body"]))], want=True
    )
    assert corrected_at > completed_at
    assert store.results_pending[transaction_id].requested_revision == corrected_at
    # A second correction (issue 16, item 8) marks them again: every correction changes them.
    again_at = await _commit(
        store, [delivery("fix-again", _corrected_again(completing["body"]))], want=True
    )
    assert again_at > corrected_at
    assert store.results_pending[transaction_id].requested_revision == again_at

    # Without Junction's API configured, or for a legacy order, nothing is marked.
    bare = MemoryStore()
    await _commit(bare, [delivery(d["svix_id"], d["body"]) for d in REDRAW["deliveries"]], False)
    legacy = copy.deepcopy(completing["body"])
    del legacy["data"]["order_transaction"]
    await _commit(bare, [delivery("legacy", legacy)], want=True)
    assert bare.results_pending == {}


async def test_completion_fetches_results_once_and_reports_results_ready(
    start: Services, fake_junction: FakeJunction
) -> None:
    """The completing webhook marks the results; they are fetched, stored byte for byte and
    reported with one RESULTS_READY change (a revision of its own); the PDF streams from the
    provider. Completing again (a re-send) fetches nothing more."""
    fake_junction.load_scenario(REDRAW)
    api = await start(fake_junction)
    transaction_id = REDRAW["expect"]["transaction_id"]
    for delivery in REDRAW["deliveries"]:
        await ingest(api, delivery["svix_id"], delivery["body"])

    changes = await feed_until(api.stub, lambda c: pb.CHANGE_KIND_RESULTS_READY in c.kinds)
    ready = changes[-1]
    assert list(ready.kinds) == [pb.CHANGE_KIND_RESULTS_READY]
    assert ready.transaction.id == transaction_id
    assert ready.transaction.revision == ready.revision
    assert ready.event_id.startswith("api:results:sha256:")
    assert ready.order_id == ""
    assert kinds_of(changes, transaction_id).count(pb.CHANGE_KIND_TRANSACTION_COMPLETED) == 1

    results = await api.stub.GetTransactionResults(
        pb.GetTransactionResultsRequest(order_id=REDRAW["expect"]["redraw_order_id"])
    )
    raw = fake_junction.requests_to("transaction_result")
    assert len(raw) == 1
    assert results.transaction_id == transaction_id
    assert results.status == "final"
    assert results.revision == ready.revision
    assert json.loads(results.results_json)["results"][0]["slug"] == "glucose"

    pdf = b"".join(
        [
            m.chunk
            async for m in api.stub.GetTransactionResultsPdf(
                pb.GetTransactionResultsPdfRequest(transaction_id=transaction_id)
            )
        ]
    )
    assert pdf == b"%PDF-1.4\n% fake results of " + transaction_id.encode()

    # Nothing asks for the results again; a reconcile of the completed transaction is STALE.
    await api.stub.ReconcileTransaction(
        pb.ReconcileTransactionRequest(transaction_id=transaction_id)
    )
    await api.service.app.results.fetch_due()  # type: ignore[union-attr]
    assert len(fake_junction.requests_to("transaction_result")) == 1


async def test_every_correction_is_announced_and_fetches_the_results_again(
    start: Services, fake_junction: FakeJunction
) -> None:
    """Issue 16, item 8: completion, a correction, and a second correction each fetch the combined
    results; GetTransactionResults hands out the newest version. The second correction used to
    be announced as DETAILS_CHANGED, and the results it changed were never fetched."""
    fake_junction.load_scenario(REDRAW)
    api = await start(fake_junction)
    transaction_id = REDRAW["expect"]["transaction_id"]
    completing = REDRAW["deliveries"][-1]
    for delivery in REDRAW["deliveries"]:
        await ingest(api, delivery["svix_id"], delivery["body"])
    await feed_until(api.stub, lambda c: pb.CHANGE_KIND_RESULTS_READY in c.kinds)

    def version(n: int) -> dict[str, Any]:
        return {
            "metadata": {"status": "final", "interpretation": "normal"},
            "results": [{"name": "Glucose", "slug": "glucose", "result": str(90 + n)}],
            "missing_results": [],
        }

    for n, (event_id, body) in enumerate(
        [
            ("fix", _corrected(completing["body"])),
            ("fix-again", _corrected_again(completing["body"])),
        ],
        start=1,
    ):
        fake_junction.set_results(transaction_id, version(n))
        answer = await ingest(api, event_id, body)
        assert answer.outcome == pb.INGEST_OUTCOME_APPLIED
        after = answer.revision
        changes = await feed_until(
            api.stub,
            lambda c, after=after: pb.CHANGE_KIND_RESULTS_READY in c.kinds and c.revision > after,
        )
        (announced,) = [c for c in changes if c.revision == answer.revision]
        assert pb.CHANGE_KIND_RESULTS_CORRECTED in announced.kinds
        assert pb.CHANGE_KIND_DETAILS_CHANGED not in announced.kinds
        got = await api.stub.GetTransactionResults(
            pb.GetTransactionResultsRequest(transaction_id=transaction_id)
        )
        assert json.loads(got.results_json) == version(n)
        assert got.revision == changes[-1].revision
    assert len(fake_junction.requests_to("transaction_result")) == 3


async def test_reconciles_and_results_fetches_are_in_the_transactions_history(
    start: Services, fake_junction: FakeJunction
) -> None:
    """The webhooks, a reconcile's answers (source JUNCTION_API) and the results fetch the
    completion asked for (source RESULTS_FETCH, with its RESULTS_READY revision) are entries of
    one history, in the order they were taken in, each with its outcome and reason."""
    fake_junction.load_scenario(REDRAW)
    api = await start(fake_junction)
    transaction_id = REDRAW["expect"]["transaction_id"]
    *delivered, missing = REDRAW["deliveries"]
    for delivery in delivered:
        await ingest(api, delivery["svix_id"], delivery["body"])
    reconciled = await api.stub.ReconcileTransaction(
        pb.ReconcileTransactionRequest(transaction_id=transaction_id)
    )
    ready = (await feed_until(api.stub, lambda c: pb.CHANGE_KIND_RESULTS_READY in c.kinds))[-1]
    late = await ingest(api, missing["svix_id"], missing["body"])

    page = await api.stub.ListTransactionEvents(
        pb.ListTransactionEventsRequest(transaction_id=transaction_id)
    )
    sources = [e.source for e in page.events]
    answers = len(reconciled.answers)
    assert sources == [pb.EVENT_SOURCE_GRPC] * len(delivered) + [
        pb.EVENT_SOURCE_JUNCTION_API
    ] * answers + [pb.EVENT_SOURCE_RESULTS_FETCH, pb.EVENT_SOURCE_GRPC]
    taken_in = page.events[len(delivered) : len(delivered) + answers]
    assert [(e.event_id, e.outcome, e.revision) for e in taken_in] == [
        (a.event_id, a.outcome, a.revision) for a in reconciled.answers
    ]
    assert all(e.reason for e in taken_in)
    fetch = page.events[-2]
    assert fetch.outcome == pb.INGEST_OUTCOME_APPLIED
    assert fetch.revision == ready.revision
    assert list(fetch.kinds) == [pb.CHANGE_KIND_RESULTS_READY]
    assert not fetch.diff.changed_fields.paths
    assert fetch.reason == "combined results fetched (`final`), reported with RESULTS_READY"
    assert ready.event_id.removeprefix("api:results:sha256:") == fetch.digest
    assert not fetch.body_erased
    assert (page.events[-1].event_id, page.events[-1].outcome) == (missing["svix_id"], late.outcome)


async def test_results_not_yet_fetched_are_fetched_after_a_restart(
    start: Services, fake_junction: FakeJunction
) -> None:
    """Junction has no results yet when the transaction completes: the fetch fails and is
    rescheduled; after a restart (Junction has them now) the marker is picked up again."""
    fake_junction.load_scenario(REDRAW)
    transaction_id = REDRAW["expect"]["transaction_id"]
    results = fake_junction.remove_results(transaction_id)  # not ready at first
    assert results is not None
    api = await start(fake_junction)
    for delivery in REDRAW["deliveries"]:
        await ingest(api, delivery["svix_id"], delivery["body"])

    async def failed_once() -> bool:
        _, pending = await api.service.store.get_results(transaction_id)
        return pending is not None and pending.attempts >= 1

    await eventually(failed_once, "a failed fetch")
    _, pending = await api.service.store.get_results(transaction_id)
    assert pending is not None
    assert pending.last_failure == "refused: HTTP 404"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.stub.GetTransactionResults(
            pb.GetTransactionResultsRequest(transaction_id=transaction_id)
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "being fetched" in (caught.value.details() or "")
    await start.stop(api)

    fake_junction.set_results(transaction_id, results)
    again = await start(fake_junction)
    changes = await feed_until(again.stub, lambda c: pb.CHANGE_KIND_RESULTS_READY in c.kinds)
    assert changes[-1].transaction.id == transaction_id
    got = await again.stub.GetTransactionResults(
        pb.GetTransactionResultsRequest(transaction_id=transaction_id)
    )
    assert got.results_json.encode() == results
    assert (await again.service.store.get_results(transaction_id))[1] is None


async def test_results_are_erased_after_the_body_retention(
    start: Services, fake_junction: FakeJunction
) -> None:
    fake_junction.load_scenario(REDRAW)
    api = await start(fake_junction)
    transaction_id = REDRAW["expect"]["transaction_id"]
    for delivery in REDRAW["deliveries"]:
        await ingest(api, delivery["svix_id"], delivery["body"])
    await feed_until(api.stub, lambda c: pb.CHANGE_KIND_RESULTS_READY in c.kinds)

    assert await api.service.store.erase_results(datetime.now(UTC) - timedelta(hours=1)) == 0
    assert await api.service.store.erase_results(datetime.now(UTC) + timedelta(hours=1)) == 1

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.stub.GetTransactionResults(
            pb.GetTransactionResultsRequest(transaction_id=transaction_id)
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(caught.value).reason == "RESULTS_ERASED"
    stored, _ = await api.service.store.get_results(transaction_id)
    assert stored is not None
    assert stored.body is None
    assert stored.digest


async def test_no_results_for_an_active_transaction_or_without_the_api(
    start: Services,
) -> None:
    api = await start(None)
    for delivery in REDRAW["deliveries"][:2]:
        await ingest(api, delivery["svix_id"], delivery["body"])
    for lookup, code, text in (
        ({"transaction_id": REDRAW["expect"]["transaction_id"]}, "FAILED_PRECONDITION", "ACTIVE"),
        ({"order_id": "unknown"}, "NOT_FOUND", "no transaction known"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await api.stub.GetTransactionResults(pb.GetTransactionResultsRequest(**lookup))
        assert caught.value.code().name == code
        assert text in (caught.value.details() or "")
    # Without the API nothing marks results to fetch.
    for delivery in REDRAW["deliveries"][2:]:
        await ingest(api, delivery["svix_id"], delivery["body"])
    assert await api.service.store.results_due(datetime.now(UTC), 10) == []


async def test_results_of_a_transaction_completed_before_the_api_key_are_fetched_on_reconcile(
    start: Services, fake_junction: FakeJunction
) -> None:
    """The API key is configured after transactions completed: GetTransactionResults says how to
    get their results, a reconcile fetches them once, and results erased after the retention are
    not fetched again by a later reconcile."""
    fake_junction.load_scenario(REDRAW)
    transaction_id = REDRAW["expect"]["transaction_id"]
    before = await start(None)
    for delivery in REDRAW["deliveries"]:
        await ingest(before, delivery["svix_id"], delivery["body"])
    await start.stop(before)

    api = await start(fake_junction)
    lookup = pb.GetTransactionResultsRequest(transaction_id=transaction_id)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.stub.GetTransactionResults(lookup)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "ReconcileTransaction fetches them" in (caught.value.details() or "")

    reconcile = pb.ReconcileTransactionRequest(order_id=REDRAW["expect"]["redraw_order_id"])
    await api.stub.ReconcileTransaction(reconcile)
    changes = await feed_until(api.stub, lambda c: pb.CHANGE_KIND_RESULTS_READY in c.kinds)
    assert changes[-1].transaction.id == transaction_id
    assert (await api.stub.GetTransactionResults(lookup)).status == "final"
    assert len(fake_junction.requests_to("transaction_result")) == 1

    # Fetched once: reconciling again asks for nothing, nor after the results were erased.
    await api.stub.ReconcileTransaction(reconcile)
    assert await api.service.store.erase_results(datetime.now(UTC) + timedelta(hours=1)) == 1
    await api.stub.ReconcileTransaction(reconcile)
    assert await api.service.store.results_due(datetime.now(UTC) + timedelta(days=1), 10) == []
    assert len(fake_junction.requests_to("transaction_result")) == 1


# --------------------------------------------------------------------------------------------------
# The results fetcher's rules, on the in-memory store with a hand-driven clock
# --------------------------------------------------------------------------------------------------


def _results(status: str, marker: str = "x") -> TransactionResults:
    raw = json.dumps({"metadata": {"status": status}, "results": [marker]}).encode()
    return TransactionResults.from_raw(raw, json.loads(raw))


async def test_partial_results_are_reported_and_fetched_again_until_final() -> None:
    store = MemoryStore()
    now = datetime(2026, 5, 1, tzinfo=UTC)
    clock = [now]

    answers = [_results("partial", "a"), _results("partial", "a"), _results("final", "b")]

    class Client:
        async def get_transaction_results(self, transaction_id: str) -> TransactionResults:
            return answers.pop(0)

    published: list[Any] = []
    fetcher = ResultsFetcher(
        store,
        CommitPath(store, publish=published.extend),
        Client(),  # type: ignore[arg-type]
        retention=timedelta(days=30),
        clock=lambda: clock[0],
        rand=lambda: 0.0,
    )
    _seed(store, "t-1", now)

    outcomes = []
    for _ in range(3):
        outcomes += [o.outcome for o in await fetcher.fetch_due()]
        assert await fetcher.fetch_due() == []  # not due again before the backoff
        clock[0] += timedelta(hours=2)
    assert outcomes == ["ready", "partial", "ready"]
    assert [c.kinds for c in published] == [("results_ready",), ("results_ready",)]
    stored, pending = await store.get_results("t-1")
    assert stored is not None
    assert stored.status == "final"
    assert pending is None


async def test_a_request_made_while_fetching_is_not_cleared_by_the_older_fetch() -> None:
    now = datetime(2026, 5, 1, tzinfo=UTC)
    store = MemoryStore()
    _seed(store, "t-1", now)
    started = store.results_pending["t-1"]
    # A correction committed while the fetch was under way asked again (a newer revision).
    newer = PendingResults("t-1", started.requested_revision + 5, now, 0, now)
    state = BatchState(
        transactions={"t-1": store.transactions["t-1"]}, results_pending={"t-1": newer}
    )

    plan, ready = plan_fetched(state, started, _results("final"), now, now)

    assert ready
    assert not plan.results_done
    assert not plan.results_pending


def _seed(store: MemoryStore, transaction_id: str, now: datetime) -> None:
    """A completed transaction with a results marker due `now`."""
    view = TransactionView(id=transaction_id, status=TransactionStatus.COMPLETED)
    store.head = 7
    store.transactions[transaction_id] = StoredTransaction(Knowledge(id=transaction_id), view, 7)
    store.results_pending[transaction_id] = PendingResults(transaction_id, 7, now, 0, now)


# --------------------------------------------------------------------------------------------------
# Back-fill and the sweep's lock
# --------------------------------------------------------------------------------------------------


def _timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


async def test_backfill_pages_through_the_window_and_reaches_every_fixture_from_the_api_alone(
    start: Services, fake_junction: FakeJunction
) -> None:
    for scenario in SCENARIOS:
        fake_junction.load_scenario(scenario)
    api = await start(fake_junction)
    api.service.app.reconciler.backfill_page_size = 2
    orders = sum(len(s["expect"]["orders"]) for s in SCENARIOS)

    messages = [
        m
        async for m in api.stub.BackfillTransactions(
            pb.BackfillTransactionsRequest(since=_timestamp(datetime(2026, 1, 1, tzinfo=UTC)))
        )
    ]

    last = messages[-1]
    assert last.done
    assert (last.orders_total, last.orders_read) == (orders, orders)
    assert last.transactions_changed == len(SCENARIOS)
    assert last.transactions_unchanged == last.transactions_failed == 0
    assert len(fake_junction.requests_to("orders")) == -(-orders // 2)
    reported = {m.transaction_id for m in messages if m.transaction_id}
    assert reported == {s["expect"]["transaction_id"] for s in SCENARIOS}
    for scenario in SCENARIOS:
        got = await api.stub.GetTransaction(
            pb.GetTransactionRequest(transaction_id=scenario["expect"]["transaction_id"])
        )
        check_expect(got.transaction, scenario["expect"])


async def test_backfill_resend_asks_junction_and_a_window_over_60_days_is_refused(
    start: Services, fake_junction: FakeJunction
) -> None:
    fake_junction.load_scenario(REDRAW)
    api = await start(fake_junction)
    since = datetime(2026, 3, 1, tzinfo=UTC)
    [only] = [
        m
        async for m in api.stub.BackfillTransactions(
            pb.BackfillTransactionsRequest(
                since=_timestamp(since), until=_timestamp(since + timedelta(days=30)), resend=True
            )
        )
    ]
    assert only.done
    assert only.orders_resent == len(REDRAW["expect"]["orders"])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in api.stub.BackfillTransactions(
            pb.BackfillTransactionsRequest(
                since=_timestamp(since - timedelta(days=90)), resend=True
            )
        ):
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "60 days" in (caught.value.details() or "")
    assert len(fake_junction.requests_to("resend_events")) == 1


async def test_only_one_replica_holds_a_job_lock(tmp_path: Path, store_kind: str) -> None:
    """On PostgreSQL the sweep's lock is held by one store (replica) at a time; on SQLite one
    process owns the database, so it always gets it."""
    from transaction_service.store import open_store

    with database(store_kind, tmp_path) as db:
        stores = [
            open_store(service_settings(db, None))
            for _ in range(2 if store_kind == "postgres" else 1)
        ]
        for store in stores:
            await store.open()
        try:
            async with stores[0].exclusive("reconcile-sweep") as first:
                assert first
                if len(stores) == 2:
                    async with stores[1].exclusive("reconcile-sweep") as second:
                        assert not second
            if len(stores) == 2:
                async with stores[1].exclusive("reconcile-sweep") as after_release:
                    assert after_release
        finally:
            for store in stores:
                await store.close()


async def test_the_sweep_reconciles_silent_active_transactions_once_per_period(
    start: Services, fake_junction: FakeJunction
) -> None:
    """Silent ACTIVE transactions are reconciled; a reconciled one is not asked again within the
    period; one Junction does not know is counted failed and remembered as checked."""
    runs = [with_fresh_ids(REDRAW) for _ in range(3)]
    api = await start(fake_junction)
    for run in runs:
        for delivery in run["deliveries"][:-1]:
            await ingest(api, delivery["svix_id"], delivery["body"])
    for run in runs[:2]:
        fake_junction.load_scenario(run)
    reconciler = api.service.app.reconciler
    silent_before = datetime.now(UTC) - timedelta(minutes=5)

    report = await reconciler.sweep(silent_before)

    assert (report.checked, report.changed, report.failed) == (2, 2, 1)
    for run in runs[:2]:
        got = await api.stub.GetTransaction(
            pb.GetTransactionRequest(transaction_id=run["expect"]["transaction_id"])
        )
        check_expect(got.transaction, run["expect"])
    # The sweep's own requests: the results fetcher may ask for the combined results of the
    # transactions the sweep completed at any moment meanwhile.
    asked = len(fake_junction.requests_to("order_transaction"))
    again = await reconciler.sweep(silent_before)
    assert (again.checked, again.failed) == (0, 0)
    assert len(fake_junction.requests_to("order_transaction")) == asked
