"""API answers become webhook-shaped bodies, and the one merge path turns them into the state the
webhooks would have given.

The API's view of each fixture is its final state: each order as its last delivery shows it, and
the last delivery's transaction block as the transaction answer."""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import AsyncIterator, Iterable
from functools import reduce
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tests.conftest import SCENARIOS
from tests.scenario_tools import expected_summary, view_summary
from transaction_service.domain.payload import OrderEvent, parse_event
from transaction_service.domain.state import (
    ChangeKind,
    Knowledge,
    TransactionView,
    change_kinds,
    join,
    knowledge_from_event,
    view,
)
from transaction_service.junction.answers import OrderAnswer, TransactionAnswer
from transaction_service.junction.mapping import (
    API_EVENT_TYPE,
    ApiEvent,
    api_event_id,
    order_event,
    transaction_carrier,
    transaction_event,
)
from transaction_service.store.sqlite import SqliteStore
from transaction_service.usecases.commit import CommitPath
from transaction_service.usecases.ingest import Ingestor, Outcome, decode_delivery

REDRAW = next(s for s in SCENARIOS if s["scenario"] == "redraw_completed")
SPELLINGS = ["last_status", "low_level_status"]


def final_orders(scenario: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each order's `data` as its last delivery shows it (deliveries are in emission order)."""
    return {d["body"]["data"]["id"]: d["body"]["data"] for d in scenario["deliveries"]}


def transaction_answer(
    block: dict[str, Any], *, team_id: str | None = None, spelling: str = "last_status"
) -> TransactionAnswer:
    """A transaction block as `GET /v3/order_transaction/{id}` would answer it."""
    raw = copy.deepcopy(block)
    if team_id:
        raw["team_id"] = team_id
    if spelling == "last_status":
        for entry in raw["orders"]:
            entry["last_status"] = entry.pop("low_level_status")
            entry["last_status_created_at"] = entry.pop("low_level_status_created_at")
    return TransactionAnswer.from_raw(raw)


def final_transaction(scenario: dict[str, Any], spelling: str = "last_status") -> ApiEvent:
    last = scenario["deliveries"][-1]["body"]
    answer = transaction_answer(
        last["data"]["order_transaction"], team_id=last.get("team_id"), spelling=spelling
    )
    event = transaction_event(answer)
    assert event is not None
    return event


def api_events(scenario: dict[str, Any], spelling: str = "last_status") -> list[ApiEvent]:
    orders = [order_event(OrderAnswer.from_raw(data)) for data in final_orders(scenario).values()]
    return [*orders, final_transaction(scenario, spelling)]


def knowledge(bodies: Iterable[dict[str, Any]]) -> Knowledge:
    events = [parse_event(body) for body in bodies]
    assert all(isinstance(e, OrderEvent) for e in events)
    return reduce(join, (knowledge_from_event(e) for e in events))  # type: ignore[arg-type]


def webhooks(scenario: dict[str, Any]) -> list[dict[str, Any]]:
    return [d["body"] for d in scenario["deliveries"]]


def state(bodies: Iterable[dict[str, Any]]) -> TransactionView:
    return view(knowledge(bodies))


# --------------------------------------------------------------------------------------------------
# The API's view reaches the fixture's expected state
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_the_apis_view_of_each_fixture_reaches_its_expected_state_in_any_order(
    scenario: dict[str, Any], spelling: str
) -> None:
    events = api_events(scenario, spelling)
    views = set()
    for order in itertools.permutations(events):
        final = state(e.body for e in order)
        assert view_summary(final) == expected_summary(scenario)
        views.add(repr(final))
    assert len(views) == 1


def test_the_apis_view_is_the_same_state_every_webhook_gives(scenario: dict[str, Any]) -> None:
    # Not only the fields the fixture checks: sample ids, labs, times, seen_own_event, all of it;
    # all but client_user_id, which only a webhook's envelope carries (an API order has none).
    from_api = state(e.body for e in api_events(scenario))
    from_webhooks = state(webhooks(scenario))
    assert from_api.client_user_id == ""
    assert from_api == msgspec.structs.replace(from_webhooks, client_user_id="")


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_the_transaction_answer_alone_reaches_the_expected_state(
    scenario: dict[str, Any], spelling: str
) -> None:
    assert view_summary(state([final_transaction(scenario, spelling).body])) == (
        expected_summary(scenario)
    )


def test_a_reconcile_after_every_webhook_changes_nothing_a_caller_sees(
    scenario: dict[str, Any],
) -> None:
    before = state(webhooks(scenario))
    api = knowledge(e.body for e in api_events(scenario))
    after = view(join(knowledge(webhooks(scenario)), api))
    assert change_kinds(before, after) == []


def test_a_final_webhook_that_never_came_is_made_good_by_the_api(
    scenario: dict[str, Any],
) -> None:
    delivered = webhooks(scenario)[:-1]
    before = state(delivered)

    after = view(join(knowledge(delivered), knowledge(e.body for e in api_events(scenario))))

    assert view_summary(after) == expected_summary(scenario)
    final_kind = {
        "TRANSACTION_STATUS_COMPLETED": ChangeKind.TRANSACTION_COMPLETED,
        "TRANSACTION_STATUS_CANCELLED": ChangeKind.TRANSACTION_CANCELLED,
    }[scenario["expect"]["status"]]
    assert final_kind in change_kinds(before, after)


def test_an_old_transaction_answer_never_overrides_newer_knowledge() -> None:
    first = REDRAW["deliveries"][0]["body"]["data"]["order_transaction"]
    old = transaction_event(transaction_answer(first))
    assert old is not None
    everything = knowledge(webhooks(REDRAW))

    assert view(join(everything, knowledge([old.body]))) == view(everything)


def test_the_carrier_hides_no_detail_its_orders_own_webhook_brought() -> None:
    # The initial order's requisition webhook brought its sample id; the transaction answer,
    # carried in the initial order's `data`, is newer but says nothing of sample ids or labs.
    requisition = REDRAW["deliveries"][1]["body"]
    alone = state([requisition])
    with_answer = state([requisition, final_transaction(REDRAW).body])

    initial = REDRAW["expect"]["initial_order_id"]
    [before] = [o for o in alone.orders if o.id == initial]
    [after] = [o for o in with_answer.orders if o.id == initial]
    assert after.low_level_status == "redraw_available"
    assert (after.sample_id, after.lab, after.collection_method, after.lab_test_name) == (
        before.sample_id,
        before.lab,
        before.collection_method,
        before.lab_test_name,
    )
    assert after.sample_id == requisition["data"]["sample_id"]


# --------------------------------------------------------------------------------------------------
# The bodies and their ids
# --------------------------------------------------------------------------------------------------


def test_an_order_answer_becomes_an_order_updated_body_around_the_answer_itself() -> None:
    data = final_orders(REDRAW)[REDRAW["expect"]["redraw_order_id"]]

    event = order_event(OrderAnswer.from_raw(data))

    assert event.body["event_type"] == API_EVENT_TYPE
    assert event.body["data"] == data
    assert event.body["transaction_service"] == {
        "source": "api",
        "endpoint": "GET /v3/order/{order_id}",
    }
    assert event.order_id == data["id"]
    assert event.transaction_id == REDRAW["expect"]["transaction_id"]


def test_a_transaction_answer_travels_in_its_initial_order_as_carrier() -> None:
    event = final_transaction(REDRAW)

    data = event.body["data"]
    assert set(data) == {"id", "order_transaction", "team_id"}
    assert data["id"] == event.order_id == REDRAW["expect"]["initial_order_id"]
    assert data["order_transaction"]["id"] == event.transaction_id
    assert event.body["transaction_service"]["endpoint"] == (
        "GET /v3/order_transaction/{transaction_id}"
    )


@pytest.mark.parametrize(
    ("orders", "carrier"),
    [
        (
            [
                {"id": "redraw", "origin": "redraw", "parent_id": "initial"},
                {"id": "initial", "origin": "initial"},
            ],
            "initial",
        ),
        ([{"id": "child", "parent_id": "root"}, {"id": "root"}], "root"),
        ([{"id": "a", "parent_id": "x"}, {"id": "b", "parent_id": "x"}], "a"),
        ([], None),
    ],
)
def test_the_carrier_is_the_initial_order_else_the_one_without_parent_else_the_first(
    orders: list[dict[str, Any]], carrier: str | None
) -> None:
    answer = TransactionAnswer.from_raw({"id": "t", "status": "active", "orders": orders})
    assert transaction_carrier(answer) == carrier
    assert (transaction_event(answer) is None) == (carrier is None)


def test_asking_twice_about_an_unchanged_order_gives_the_same_event_id() -> None:
    data = final_orders(REDRAW)[REDRAW["expect"]["initial_order_id"]]
    reordered = json.loads(json.dumps(dict(reversed(list(data.items())))))
    with_float = copy.deepcopy(data)
    with_float["lab_test"]["price"] = 30  # the provider's 30.0, as a JSON number may come back

    ids = {order_event(OrderAnswer.from_raw(d)).event_id for d in (data, reordered, with_float)}

    [event_id] = ids
    assert event_id.startswith("api:sha256:")
    assert len(event_id) == len("api:sha256:") + 64
    changed = copy.deepcopy(data)
    changed["updated_at"] = "2026-03-07T00:00:00Z"
    assert order_event(OrderAnswer.from_raw(changed)).event_id != event_id


def test_order_and_transaction_answers_never_share_an_id(scenario: dict[str, Any]) -> None:
    events = api_events(scenario)
    assert len({e.event_id for e in events}) == len(events)
    assert all(e.event_id == api_event_id(e.body) for e in events)


# --------------------------------------------------------------------------------------------------
# Through the real ingest use case
# --------------------------------------------------------------------------------------------------

LIMIT = 1 << 20


@pytest.fixture
async def ingestor(tmp_path: Path) -> AsyncIterator[Ingestor]:
    store = SqliteStore(tmp_path / "api.db", synchronous="NORMAL")
    await store.open()
    ingestor = Ingestor(CommitPath(store))
    ingestor.start()
    yield ingestor
    await ingestor.stop()
    await store.close()


async def ingest_api(ingestor: Ingestor, event: ApiEvent) -> Outcome:
    # As the reconcile takes it in: its `api:` ids are the service's own (callers may not use them).
    delivery = decode_delivery(
        event.event_id, payload_json=event.payload_json(), max_body_bytes=LIMIT, source="api"
    )
    # The id is the digest ingest itself computes for the body.
    assert event.event_id == f"api:sha256:{delivery.event.digest}"
    return (await ingestor.ingest(delivery)).outcome


async def ingest_webhook(ingestor: Ingestor, delivery: dict[str, Any]) -> Outcome:
    decoded = decode_delivery(
        delivery["svix_id"], payload_json=json.dumps(delivery["body"]), max_body_bytes=LIMIT
    )
    return (await ingestor.ingest(decoded)).outcome


async def test_asking_the_api_again_is_a_duplicate_and_after_every_webhook_it_is_stale(
    ingestor: Ingestor, scenario: dict[str, Any]
) -> None:
    for delivery in scenario["deliveries"]:
        assert await ingest_webhook(ingestor, delivery) == Outcome.APPLIED
    events = api_events(scenario)

    assert [await ingest_api(ingestor, e) for e in events] == [Outcome.STALE] * len(events)
    assert [await ingest_api(ingestor, e) for e in events] == [Outcome.DUPLICATE] * len(events)


async def test_after_a_reconcile_the_webhook_that_was_missing_is_stale(
    ingestor: Ingestor, scenario: dict[str, Any]
) -> None:
    *delivered, missing = scenario["deliveries"]
    for delivery in delivered:
        await ingest_webhook(ingestor, delivery)

    outcomes = [await ingest_api(ingestor, e) for e in api_events(scenario)]

    assert Outcome.APPLIED in outcomes
    assert await ingest_webhook(ingestor, missing) == Outcome.STALE
