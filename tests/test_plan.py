"""Planning batches: however deliveries are grouped into commits, the outcome is the same as
applying them one at a time. Run on the in-memory store, so hypothesis can try many groupings."""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import math
from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import SCENARIOS
from tests.scenario_tools import corrected, expected_summary, view_summary, with_fresh_ids
from transaction_service.domain.diff import diff_to_json, diff_views
from transaction_service.domain.state import ChangeKind, TransactionView
from transaction_service.errors import ServiceError
from transaction_service.store.memory import MemoryStore
from transaction_service.usecases.ingest import decode_delivery
from transaction_service.usecases.plan import (
    Delivery,
    IngestResult,
    Outcome,
    StateLimits,
    batch_keys,
    plan_batch,
)

NOW = datetime(2026, 11, 1, tzinfo=UTC)
LIMIT = 1 << 20


def delivery(event_id: str, body: dict[str, Any]) -> Delivery:
    return decode_delivery(event_id, payload=body, max_body_bytes=LIMIT)


async def commit(
    store: MemoryStore, batch: list[Delivery], limits: StateLimits | None = None
) -> list[IngestResult | ServiceError]:
    applied, answers = await store.write(
        batch_keys(batch), lambda state: plan_batch(batch, state, NOW, limits)
    )
    return [a if isinstance(a, ServiceError) else a.resolve(applied) for a in answers]


def split(items: list[Any], cuts: list[int]) -> list[list[Any]]:
    bounds = [0, *sorted({c % (len(items) + 1) for c in cuts}), len(items)]
    return [items[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def legacy_variant(body: dict[str, Any]) -> dict[str, Any]:
    legacy = copy.deepcopy(body)
    del legacy["data"]["order_transaction"]
    legacy["data"].pop("origin", None)
    return legacy


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_grouping_into_batches_gives_the_same_state_and_outcomes(data: st.DataObject) -> None:
    runs = [with_fresh_ids(s) for s in SCENARIOS]
    sends = [(d["svix_id"], d["body"]) for run in runs for d in run["deliveries"]]
    indices = st.integers(0, len(sends) - 1)
    repeats = data.draw(st.lists(indices, max_size=8), label="repeats")
    # Legacy copies of some bodies (no transaction block) under new ids: folded in wherever they
    # land in the order, even inside one batch with the block that names their order.
    legacies = data.draw(st.lists(indices, max_size=3, unique=True), label="legacy")
    sends += [sends[i] for i in repeats] + [
        (f"legacy-{i}", legacy_variant(sends[i][1])) for i in legacies
    ]
    order = data.draw(st.permutations(sends), label="order")
    cuts = data.draw(st.lists(st.integers(0, len(order)), max_size=6), label="cuts")
    deliveries = [delivery(event_id, body) for event_id, body in order]

    async def run(cuts: list[int]) -> tuple[MemoryStore, list[IngestResult | ServiceError]]:
        store = MemoryStore()
        results: list[IngestResult | ServiceError] = []
        for batch in split(deliveries, cuts):
            results += await commit(store, batch)
        return store, results

    store, results = asyncio.run(run(cuts))
    seen: set[str] = set()
    for d, result in zip(deliveries, results, strict=True):
        assert isinstance(result, IngestResult), result
        assert (result.outcome == Outcome.DUPLICATE) == (d.event_id in seen)
        seen.add(d.event_id)
    for r in runs:
        snapshot = store.transactions[r["expect"]["transaction_id"]]
        assert view_summary(snapshot.view) == expected_summary(r)
    # The change log: contiguous revisions, each transaction's last change is its state.
    revisions = [c.revision for c in store.changes]
    assert revisions == list(range(1, len(revisions) + 1))
    for txn_id, stored in store.transactions.items():
        last = [c for c in store.changes if c.transaction_id == txn_id][-1]
        assert (last.revision, last.view) == (stored.revision, stored.view)
    # Each change's diff is the difference from its transaction's change before it.
    before: dict[str, TransactionView] = {}
    for change in store.changes:
        expected = diff_views(before.get(change.transaction_id), change.view)
        assert change.diff is not None
        assert diff_to_json(change.diff) == diff_to_json(expected)
        before[change.transaction_id] = change.view
    # The history (outcomes, reasons, claims, retries) does not depend on the grouping either:
    # each delivery is explained by what was known just before it, as if it came alone.
    alone, _ = asyncio.run(run(list(range(len(deliveries) + 1))))
    assert history_of(store) == history_of(alone)


# The kinds a watch is told once per transaction, at most (test_watch.py).
REPORTED_ONCE = (
    ChangeKind.REDRAW_AVAILABLE,
    ChangeKind.TRANSACTION_COMPLETED,
    ChangeKind.TRANSACTION_CANCELLED,
)


def test_every_delivery_order_with_every_delivery_duplicated_reaches_expect() -> None:
    """All n! delivery orders of every scenario, each delivery sent twice (as an immediate
    retry in even permutations, as a second pass in odd ones), alternating the two body forms
    (JSON text, parsed object), committed one at a time on a fresh in-memory store: a delivery is
    a duplicate exactly when its id was seen, each is answered with its scenario's transaction,
    the transaction ends in the expected state, by its id and by each order's id, and its
    changes say redraw available, completed or cancelled once each if it ends so, else never.
    The tests on real stores send a seeded sample of these orders (scenario_tools.
    sampled_orders) through gRPC (test_grpc_api.py) and watch them (test_watch.py)."""

    async def go() -> int:
        checked = 0
        for scenario in SCENARIOS:
            expect = scenario["expect"]
            txn_id = expect["transaction_id"]
            status = expect["status"].removeprefix("TRANSACTION_STATUS_").lower()
            reported = {ChangeKind(f"transaction_{status}")}
            if expect["redraw_available"]:
                reported.add(ChangeKind.REDRAW_AVAILABLE)
            # Each delivery decoded once in each body form: [parsed object, JSON text].
            forms = [
                (
                    delivery(d["svix_id"], d["body"]),
                    decode_delivery(
                        d["svix_id"], payload_json=json.dumps(d["body"]), max_body_bytes=LIMIT
                    ),
                )
                for d in scenario["deliveries"]
            ]
            n = len(forms)
            for i, order in enumerate(itertools.permutations(range(n))):
                store = MemoryStore()
                twice = [j for j in order for _ in (0, 1)] if i % 2 == 0 else [*order, *order]
                seen: set[str] = set()
                for k, j in enumerate(twice):
                    sent = forms[j][(i + k) % 2]
                    [result] = await commit(store, [sent])
                    assert isinstance(result, IngestResult), result
                    assert (result.outcome == Outcome.DUPLICATE) == (sent.event_id in seen)
                    seen.add(sent.event_id)
                    assert result.transaction is not None
                    assert result.transaction.view.id == txn_id
                snapshot, _ = await store.get(txn_id)
                assert snapshot is not None
                assert view_summary(snapshot.view) == expected_summary(scenario)
                for order_id in expect["orders"]:
                    by_order, _ = await store.get_by_order(order_id)
                    assert by_order == snapshot
                assert {c.transaction_id for c in store.changes} == {txn_id}
                for kind in REPORTED_ONCE:
                    told = sum(kind in c.kinds for c in store.changes)
                    assert told == (kind in reported), (kind, told)
                checked += 1
        return checked

    # Every scenario, every order: 6! + 3! + 2! with today's fixtures.
    expected = sum(math.factorial(len(s["deliveries"])) for s in SCENARIOS)
    assert asyncio.run(go()) == expected


def history_of(store: MemoryStore) -> list[tuple[Any, ...]]:
    return [
        (
            e.event_id,
            e.outcome,
            e.reason,
            e.claimed_status,
            e.change,
            store.duplicates.get(e.event_id, (0,))[0],
        )
        for e in store.event_writes.values()
    ]


def test_a_legacy_fold_does_not_repeat_once_kinds_for_the_standins_order() -> None:
    """The stand-in completed; folding it into its completed real transaction tells the
    stand-in's order nothing it was told already, and tells the real transaction's watchers."""
    scenario = next(s for s in SCENARIOS if s["scenario"] == "completed_without_redraw")
    run = with_fresh_ids(scenario)
    last = run["deliveries"][-1]
    order_id = last["body"]["data"]["id"]

    async def go() -> MemoryStore:
        store = MemoryStore()
        await commit(store, [delivery("legacy", legacy_variant(last["body"]))])
        await commit(store, [delivery(last["svix_id"], last["body"])])
        return store

    store = asyncio.run(go())
    standin, fold = store.changes
    assert standin.transaction_id == order_id
    assert ChangeKind.TRANSACTION_COMPLETED in standin.kinds
    assert fold.transaction_id == run["expect"]["transaction_id"]
    assert ChangeKind.LEGACY_MERGED in fold.kinds
    assert dict(fold.merged) == {order_id: {ChangeKind.TRANSACTION_COMPLETED}}
    assert order_id not in store.transactions


def test_a_delivery_over_the_limits_is_refused_alone_and_stores_nothing() -> None:
    scenario = next(s for s in SCENARIOS if s["scenario"] == "redraw_completed")
    run = with_fresh_ids(scenario)
    deliveries = [delivery(d["svix_id"], d["body"]) for d in run["deliveries"]]
    other = with_fresh_ids(SCENARIOS[0])
    small = delivery(other["deliveries"][0]["svix_id"], other["deliveries"][0]["body"])

    async def go() -> tuple[MemoryStore, list[Any]]:
        store = MemoryStore()
        # One order per transaction allowed: the redraw scenario's two-order blocks are refused.
        results = await commit(
            store, [small, *deliveries], StateLimits(max_orders_per_transaction=1)
        )
        return store, results

    store, results = asyncio.run(go())
    assert isinstance(results[0], IngestResult)
    refused = [r for r in results[1:] if isinstance(r, ServiceError)]
    assert refused
    assert all("max_orders_per_transaction" in str(r) for r in refused)
    stored = store.transactions[run["expect"]["transaction_id"]]
    assert len(stored.view.orders) == 1
    accepted = {
        d.event_id
        for d, r in zip(deliveries, results[1:], strict=True)
        if isinstance(r, IngestResult)
    }
    assert set(store.events) == {small.event_id} | accepted


def test_in_any_delivery_order_the_newest_correction_marks_the_results_to_be_fetched() -> None:
    """Issue 16, item 8: the completion and two corrections of one order, in every order. The
    change that makes the newest correction known says RESULTS_CORRECTED and marks the combined
    results to be fetched again, whichever correction came before it."""
    scenario = next(s for s in SCENARIOS if s["scenario"] == "completed_without_redraw")
    completing = scenario["deliveries"][-1]["body"]
    first = corrected(completing, "2026-03-09T09:00:00Z", 99998)
    second = corrected(first, "2026-03-11T14:30:00Z", 99999)
    sends = [
        *((d["svix_id"], d["body"]) for d in scenario["deliveries"]),
        ("fix", first),
        ("fix-again", second),
    ]
    transaction_id = scenario["expect"]["transaction_id"]

    async def run(order: tuple[tuple[str, dict[str, Any]], ...]) -> None:
        store = MemoryStore()
        for event_id, body in order:
            batch = [delivery(event_id, body)]
            applied, answers = await store.write(
                batch_keys(batch),
                lambda state, batch=batch: plan_batch(batch, state, NOW, want_results=True),
            )
            (answer,) = answers
            assert not isinstance(answer, ServiceError)
            if event_id == "fix-again":
                # The newest correction: a change that announces it and asks for the results.
                change = answer.resolve(applied).change
                assert change is not None
                assert ChangeKind.RESULTS_CORRECTED in change.kinds
                assert ChangeKind.DETAILS_CHANGED not in change.kinds
                pending = store.results_pending[transaction_id]
                assert pending.requested_revision == change.revision
        order_view = store.transactions[transaction_id].view.orders[0]
        assert order_view.low_level_status == "corrected"
        assert order_view.status_reached_at == datetime(2026, 3, 11, 14, 30, tzinfo=UTC)

    for order in itertools.permutations(sends):
        asyncio.run(run(order))
