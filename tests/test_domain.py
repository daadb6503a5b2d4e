"""The merge rule, without I/O: the final state depends only on the set of events seen."""

from __future__ import annotations

import copy
import itertools
from functools import reduce
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import SCENARIOS
from tests.scenario_tools import expected_summary, view_summary
from transaction_service.domain.payload import OrderEvent, PayloadError, parse_event
from transaction_service.domain.state import (
    ChangeKind,
    Knowledge,
    TransactionStatus,
    change_kinds,
    join,
    knowledge_from_event,
    view,
    view_to_json,
)


def events_of(scenario: dict[str, Any]) -> list[OrderEvent]:
    events = [parse_event(d["body"]) for d in scenario["deliveries"]]
    assert all(isinstance(e, OrderEvent) for e in events)
    return events  # type: ignore[return-value]


def fold(events: list[OrderEvent]) -> Knowledge:
    return reduce(join, (knowledge_from_event(e) for e in events))


def test_every_permutation_with_every_event_duplicated_reaches_the_expected_state(
    scenario: dict[str, Any],
) -> None:
    events = events_of(scenario)
    expected = expected_summary(scenario)
    views = set()
    for order in itertools.permutations(events):
        doubled = [e for e in order for _ in (0, 1)]
        final = view(fold(doubled))
        assert view_summary(final) == expected
        views.add(view_to_json(final))
    # Not only the fields the fixture checks: the whole view is the same for every order.
    assert len(views) == 1


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_any_multiset_of_deliveries_in_any_order_gives_the_same_view(data: st.DataObject) -> None:
    scenario = data.draw(st.sampled_from(SCENARIOS), label="scenario")
    events = events_of(scenario)
    extra = data.draw(st.lists(st.sampled_from(events), max_size=len(events) * 2), label="extra")
    sequence = data.draw(st.permutations([*events, *extra]), label="sequence")
    assert view(fold(sequence)) == view(fold(events))


def test_join_is_commutative_associative_and_idempotent(scenario: dict[str, Any]) -> None:
    ks = [knowledge_from_event(e) for e in events_of(scenario)]
    for a, b in itertools.product(ks, repeat=2):
        assert join(a, b) == join(b, a)
        assert join(a, a) == a
    for a, b, c in itertools.product(ks[:4], repeat=3):
        assert join(join(a, b), c) == join(a, join(b, c))


# -- the traps of the domain -------------------------------------------------------------------


def redraw_scenario() -> dict[str, Any]:
    return next(s for s in SCENARIOS if s["scenario"] == "redraw_completed")


def body(scenario: dict[str, Any], index: int) -> dict[str, Any]:
    return copy.deepcopy(scenario["deliveries"][index]["body"])


def test_a_redraw_webhook_before_anything_of_the_initial_order_lists_both_orders() -> None:
    s = redraw_scenario()
    only = view(knowledge_from_event(parse_event(body(s, 3))))  # redraw order created
    assert only.redraw_order_id == s["expect"]["redraw_order_id"]
    assert only.initial_order_id == s["expect"]["initial_order_id"]
    assert only.current_order_id == s["expect"]["redraw_order_id"]
    assert only.redraw_available
    initial = next(o for o in only.orders if o.id == s["expect"]["initial_order_id"])
    # Known only from the redraw's transaction block: status yes, own details no.
    assert initial.low_level_status == "redraw_available"
    assert not initial.seen_own_event
    assert initial.collection_method == ""


def test_a_stale_transaction_block_never_overwrites_newer_knowledge() -> None:
    s = redraw_scenario()
    newest = knowledge_from_event(parse_event(body(s, 5)))  # redraw completed
    stale = knowledge_from_event(parse_event(body(s, 1)))  # initial requisition_created
    merged = view(join(newest, stale))
    assert merged.status == TransactionStatus.COMPLETED
    initial = next(o for o in merged.orders if o.origin == "initial")
    assert initial.low_level_status == "redraw_available"
    # The stale event still contributes what only it knows about the initial order itself.
    assert initial.seen_own_event
    assert initial.sample_id == "WF8644A811"


def test_unknown_low_level_and_transaction_statuses_are_kept() -> None:
    s = redraw_scenario()
    b = body(s, 1)
    b["data"]["last_event"]["id"] = 9003
    b["data"]["last_event"]["created_at"] = "2026-03-02T08:00:00Z"
    b["data"]["last_event"]["status"] = "sample_with_lab.walk_in_test.quantum_entangled"
    b["data"]["updated_at"] = "2026-03-02T08:00:00Z"
    b["data"]["order_transaction"]["status"] = "paused"
    v = view(knowledge_from_event(parse_event(b)))
    assert v.orders[0].low_level_status == "quantum_entangled"
    assert v.orders[0].high_level_status == "sample_with_lab"
    assert v.provider_status == "paused"
    assert v.status == TransactionStatus.ACTIVE


def test_transaction_endpoint_spelling_last_status_is_accepted() -> None:
    s = redraw_scenario()
    b = body(s, 3)
    for entry in b["data"]["order_transaction"]["orders"]:
        entry["last_status"] = entry.pop("low_level_status")
        entry["last_status_created_at"] = entry.pop("low_level_status_created_at")
    v = view(knowledge_from_event(parse_event(b)))
    assert {o.low_level_status for o in v.orders} == {"redraw_available", "ordered"}


def test_timestamps_with_z_and_offset_compare_as_the_same_instant() -> None:
    s = redraw_scenario()
    a, b = body(s, 5), body(s, 5)
    b["data"]["updated_at"] = "2026-03-12T09:00:00.000000+00:00"
    b["data"]["last_event"]["created_at"] = "2026-03-12T09:00:00+00:00"
    va = view(knowledge_from_event(parse_event(a)))
    vb = view(knowledge_from_event(parse_event(b)))
    assert va.updated_at == vb.updated_at
    assert va.orders[1].status_reached_at == vb.orders[1].status_reached_at


def test_missing_last_event_falls_back_to_the_events_list() -> None:
    s = redraw_scenario()
    b = body(s, 2)
    del b["data"]["last_event"]
    v = view(knowledge_from_event(parse_event(b)))
    initial = next(o for o in v.orders if o.origin == "initial")
    assert initial.low_level_status == "redraw_available"
    assert initial.high_level_status == "collecting_sample"


def test_corrected_after_completed_is_reported_and_keeps_the_transaction_completed() -> None:
    plain = next(s for s in SCENARIOS if s["scenario"] == "completed_without_redraw")
    done = knowledge_from_event(parse_event(body(plain, 2)))
    b = body(plain, 2)
    b["data"]["events"].append(
        {
            "id": 99999,
            "created_at": "2026-03-09T09:00:00Z",
            "status": "completed.walk_in_test.corrected",
        }
    )
    b["data"]["last_event"] = b["data"]["events"][-1]
    b["data"]["updated_at"] = "2026-03-09T09:00:00Z"
    entry = b["data"]["order_transaction"]["orders"][0]
    entry.update(low_level_status="corrected", low_level_status_created_at="2026-03-09T09:00:00Z")
    entry["updated_at"] = "2026-03-09T09:00:00Z"
    before, after = view(done), view(join(done, knowledge_from_event(parse_event(b))))
    assert after.orders[0].low_level_status == "corrected"
    assert after.status == TransactionStatus.COMPLETED
    assert change_kinds(before, after) == [
        ChangeKind.ORDER_STATUS_CHANGED,
        ChangeKind.RESULTS_CORRECTED,
    ]


def test_redraw_available_is_reported_exactly_once_whatever_the_order() -> None:
    s = redraw_scenario()
    events = events_of(s)
    for order in itertools.permutations(events):
        reported, current = [], None
        for e in order:
            k = (
                knowledge_from_event(e)
                if current is None
                else join(current, knowledge_from_event(e))
            )
            reported += change_kinds(view(current) if current else None, view(k))
            current = k
        assert reported.count(ChangeKind.REDRAW_AVAILABLE) == 1
        assert reported.count(ChangeKind.TRANSACTION_COMPLETED) == 1
        assert reported.count(ChangeKind.TRANSACTION_CREATED) == 1


# -- legacy payloads (no order_transaction block) ----------------------------------------------


def legacy_body(status: str = "completed") -> dict[str, Any]:
    plain = next(s for s in SCENARIOS if s["scenario"] == "completed_without_redraw")
    b = body(plain, 2)
    del b["data"]["order_transaction"]
    del b["data"]["origin"]
    b["data"]["last_event"]["status"] = f"completed.walk_in_test.{status}"
    b["data"]["events"][-1]["status"] = f"completed.walk_in_test.{status}"
    return b


def test_a_legacy_order_stands_in_a_transaction_of_its_own() -> None:
    b = legacy_body()
    v = view(knowledge_from_event(parse_event(b)))
    assert v.legacy
    assert v.id == b["data"]["id"]
    assert v.initial_order_id == v.current_order_id == b["data"]["id"]
    assert v.status == TransactionStatus.COMPLETED
    assert v.provider_status == ""
    assert view(knowledge_from_event(parse_event(legacy_body("cancelled")))).status == (
        TransactionStatus.CANCELLED
    )
    assert view(knowledge_from_event(parse_event(legacy_body("draw_completed")))).status == (
        TransactionStatus.ACTIVE
    )


# -- parsing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda b: b.pop("event_type"), "event_type"),
        (lambda b: b["data"].pop("id"), "data.id"),
        (lambda b: b["data"].update(id=17), "data.id"),
        (lambda b: b["data"].update(id=""), "data.id"),
        (lambda b: b["data"]["events"][0].update(id="first"), "data.events[0].id"),
        (lambda b: b["data"].update(events="none"), "data.events"),
        (lambda b: b["data"].update(updated_at="yesterday"), "data.updated_at"),
        (
            lambda b: b["data"]["order_transaction"].update(orders={}),
            "data.order_transaction.orders",
        ),
        (lambda b: b["data"].update(has_missing_results="perhaps"), "data.has_missing_results"),
        (lambda b: b.update(data=[]), "data"),
    ],
)
def test_wrong_fields_are_named(mutate: Any, field: str) -> None:
    b = body(redraw_scenario(), 0)
    mutate(b)
    with pytest.raises(PayloadError) as caught:
        parse_event(b)
    assert field in [v.field for v in caught.value.violations]


def test_other_event_types_parse_without_order_data() -> None:
    event = parse_event({"event_type": "labtest.appointment.updated", "data": {"order_id": "x"}})
    assert not isinstance(event, OrderEvent)
    assert event.event_type == "labtest.appointment.updated"
