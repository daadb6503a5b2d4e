"""The merge rule, without I/O: the final state depends only on the set of events seen."""

from __future__ import annotations

import copy
import functools
import itertools
import json
import math
from collections.abc import Iterable, Iterator
from functools import reduce
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import SCENARIOS
from tests.scenario_tools import corrected, expected_summary, view_summary
from transaction_service.domain.diff import diff_views
from transaction_service.domain.explain import applied_reason, stale_reason
from transaction_service.domain.limits import MAX_BODY_DEPTH, StateLimits
from transaction_service.domain.payload import (
    OrderEvent,
    PayloadError,
    canonical_json,
    decode_json_body,
    normalise_body,
    parse_event,
)
from transaction_service.domain.state import (
    ChangeKind,
    Knowledge,
    OrderOrigin,
    TransactionStatus,
    TransactionView,
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


def view_steps(
    order: Iterable[OrderEvent],
) -> Iterator[tuple[TransactionView | None, TransactionView]]:
    """Each event of `order` joined in turn: the view before it (None before the first) and
    after it."""
    known: Knowledge | None = None
    before: TransactionView | None = None
    for e in order:
        known = knowledge_from_event(e) if known is None else join(known, knowledge_from_event(e))
        after = view(known)
        yield before, after
        before = after


def doubled(order: Iterable[OrderEvent]) -> list[OrderEvent]:
    """Every event delivered twice in a row, as Svix retries do."""
    return [e for e in order for _ in (0, 1)]


def test_every_permutation_with_every_event_duplicated_reaches_the_expected_state(
    scenario: dict[str, Any],
) -> None:
    events = events_of(scenario)
    expected = expected_summary(scenario)
    views = set()
    for order in itertools.permutations(events):
        final = view(fold(doubled(order)))
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
        reported = []
        for before, after in view_steps(order):
            reported += change_kinds(before, after)
        assert reported.count(ChangeKind.REDRAW_AVAILABLE) == 1
        assert reported.count(ChangeKind.TRANSACTION_COMPLETED) == 1
        assert reported.count(ChangeKind.TRANSACTION_CREATED) == 1


def redraw_announced_before_the_redraw_order() -> list[dict[str, Any]]:
    """The redraw scenario, but the initial order's `redraw_available` webhook was built before the
    redraw order existed: its block lists the initial order only."""
    s = redraw_scenario()
    bodies = [body(s, i) for i in range(len(s["deliveries"]))]
    block = bodies[2]["data"]["order_transaction"]
    block["orders"] = block["orders"][:1]
    return bodies


def test_a_watcher_of_redraw_kinds_always_ends_up_with_the_redraw_order() -> None:
    """Over every delivery order with every delivery doubled: CURRENT_ORDER_CHANGED comes exactly
    when current_order_id of a known transaction changes, and the last change a watcher of
    REDRAW_AVAILABLE and CURRENT_ORDER_CHANGED gets names the redraw order to follow."""
    s = redraw_scenario()
    events = events_of(
        {"deliveries": [{"body": b} for b in redraw_announced_before_the_redraw_order()]}
    )
    watched = {ChangeKind.REDRAW_AVAILABLE, ChangeKind.CURRENT_ORDER_CHANGED}
    announced_early = 0
    for order in itertools.permutations(events):
        seen: list[TransactionView] = []
        for before, after in view_steps(doubled(order)):
            kinds = change_kinds(before, after)
            changed = before is not None and before.current_order_id != after.current_order_id
            assert (ChangeKind.CURRENT_ORDER_CHANGED in kinds) == changed
            if watched & set(kinds):
                seen.append(after)
        assert seen[-1].redraw_order_id == s["expect"]["redraw_order_id"]
        assert seen[-1].current_order_id == s["expect"]["redraw_order_id"]
        announced_early += seen[0].redraw_order_id == ""
    # The case this is for happened: REDRAW_AVAILABLE first, the redraw order only later.
    assert announced_early > 0


# -- lagging transaction blocks and order facts that end a transaction --------------------------


def scenario_named(name: str) -> dict[str, Any]:
    return next(s for s in SCENARIOS if s["scenario"] == name)


def final_view_in_every_order(bodies: list[dict[str, Any]]) -> TransactionView:
    """Folds every permutation of the bodies, each delivered twice; all must give one view."""
    events = events_of({"deliveries": [{"body": b} for b in bodies]})
    views = set()
    for order in itertools.permutations(events):
        views.add(view_to_json(view(fold(doubled(order)))))
    assert len(views) == 1
    return view(fold(events))


def late_initial_webhook_with_lagging_block() -> dict[str, Any]:
    """The initial order's webhook sent after the redraw completed (its `updated_at` is the newest
    time of all), carrying the block as it was when the redraw order was created."""
    late = body(redraw_scenario(), 2)
    late["data"]["updated_at"] = "2026-03-13T08:00:00Z"
    late["data"]["interpretation"] = "abnormal"
    return late


def test_a_late_webhook_carrying_a_lagging_block_does_not_reopen_a_completed_transaction() -> None:
    """The late webhook's block is dated by its own times, so it is older than the completed
    block and changes nothing."""
    s = redraw_scenario()
    late = late_initial_webhook_with_lagging_block()
    final = final_view_in_every_order([body(s, 0), body(s, 4), body(s, 5), late])
    assert final.status == TransactionStatus.COMPLETED
    assert final.provider_status == "completed"
    initial = next(o for o in final.orders if o.id == s["expect"]["initial_order_id"])
    assert initial.interpretation == "abnormal"  # what only the late webhook knew still counts


def corrected_webhook_with_lagging_block() -> dict[str, Any]:
    corrected = body(scenario_named("completed_without_redraw"), 1)  # block: `active`, older
    corrected["data"]["events"].append(
        {
            "id": 99999,
            "created_at": "2026-03-09T09:00:00Z",
            "status": "completed.walk_in_test.corrected",
        }
    )
    corrected["data"]["last_event"] = corrected["data"]["events"][-1]
    corrected["data"]["updated_at"] = "2026-03-09T09:00:00Z"
    return corrected


def test_a_corrected_webhook_with_a_lagging_active_block_keeps_the_transaction_completed() -> None:
    plain = scenario_named("completed_without_redraw")
    corrected = corrected_webhook_with_lagging_block()
    final = final_view_in_every_order([*(body(plain, i) for i in range(3)), corrected])
    assert final.status == TransactionStatus.COMPLETED
    assert final.orders[0].low_level_status == "corrected"


def saying_active(b: dict[str, Any]) -> dict[str, Any]:
    b["data"]["order_transaction"]["status"] = "active"
    return b


@pytest.mark.parametrize(
    ("name", "deliveries", "expected"),
    [
        ("redraw_completed", [0, 2, 4, 5], TransactionStatus.COMPLETED),  # the redraw completed
        ("completed_without_redraw", [0, 1, 2], TransactionStatus.COMPLETED),  # initial, no redraw
        ("cancelled", [0, 1], TransactionStatus.CANCELLED),  # initial cancelled, no redraw
    ],
)
def test_an_order_fact_that_ends_the_transaction_beats_a_block_still_saying_active(
    name: str, deliveries: list[int], expected: TransactionStatus
) -> None:
    """The provider builds the final webhook's block before it updates the transaction status:
    every block says `active`. The documented rules end the transaction anyway."""
    s = scenario_named(name)
    final = final_view_in_every_order([saying_active(body(s, i)) for i in deliveries])
    assert final.status == expected
    assert final.provider_status == "active"


def redraw_cancelled_bodies(*, initial_cancelled: bool) -> list[dict[str, Any]]:
    """The redraw scenario up to the redraw's requisition, then the redraw order cancelled (and,
    if asked, the initial order with it), under a block that still says `active`."""
    s = redraw_scenario()
    cancel = body(s, 5)
    event = {
        "id": 9021,
        "created_at": "2026-03-10T09:00:00Z",
        "status": "cancelled.walk_in_test.cancelled",
    }
    cancel["data"]["events"][-1] = cancel["data"]["last_event"] = event
    cancel["data"]["updated_at"] = event["created_at"]
    cancel["data"]["order_transaction"]["status"] = "active"
    entries = cancel["data"]["order_transaction"]["orders"]
    entries[1].update(
        low_level_status="cancelled",
        low_level_status_created_at=event["created_at"],
        updated_at=event["created_at"],
    )
    if initial_cancelled:
        entries[0].update(
            low_level_status="cancelled",
            low_level_status_created_at="2026-03-10T08:59:00Z",
            updated_at="2026-03-10T08:59:00Z",
        )
    return [body(s, 0), body(s, 2), body(s, 4), cancel]


def test_both_orders_cancelled_end_the_transaction_cancelled() -> None:
    final = final_view_in_every_order(redraw_cancelled_bodies(initial_cancelled=True))
    assert final.status == TransactionStatus.CANCELLED
    assert final.current_order_id == final.redraw_order_id


def test_a_cancelled_redraw_alone_takes_the_status_from_the_newest_block() -> None:
    # Undocumented by the provider: no order rule applies, the block says `active`.
    final = final_view_in_every_order(redraw_cancelled_bodies(initial_cancelled=False))
    assert final.status == TransactionStatus.ACTIVE


def reinstated_after_cancellation() -> dict[str, Any]:
    """Support reinstated the cancelled order: a later webhook's block says `active` and lists the
    order, still at `cancelled`, at a newer time."""
    reinstated = saying_active(body(scenario_named("cancelled"), 1))
    reinstated["data"]["updated_at"] = "2026-03-06T09:00:00Z"
    reinstated["data"]["order_transaction"]["orders"][0]["updated_at"] = "2026-03-06T09:00:00Z"
    return reinstated


def test_a_block_newer_than_the_cancellation_reopens_the_transaction() -> None:
    """A newer block wins over the order fact."""
    s = scenario_named("cancelled")
    final = final_view_in_every_order([body(s, 0), body(s, 1), reinstated_after_cancellation()])
    assert final.status == TransactionStatus.ACTIVE
    assert final.orders[0].low_level_status == "cancelled"


def webhook_with_undated_block() -> dict[str, Any]:
    undated = body(scenario_named("completed_without_redraw"), 1)
    undated["data"]["updated_at"] = "2026-03-20T00:00:00Z"  # the carrier's time does not date it
    undated["data"]["order_transaction"]["orders"] = []
    undated["data"]["order_transaction"]["status"] = "paused"
    return undated


def test_a_block_with_no_times_of_its_own_never_overrules_a_dated_block() -> None:
    s = scenario_named("completed_without_redraw")
    undated = webhook_with_undated_block()
    final = final_view_in_every_order([body(s, 0), body(s, 2), undated])
    assert final.provider_status == "completed"
    (alone_event,) = events_of({"deliveries": [{"body": undated}]})
    alone = view(knowledge_from_event(alone_event))
    assert alone.provider_status == "paused"


# -- observations of the same instant: the more final status wins -------------------------------


SAME_INSTANT = "2026-03-06T15:00:00Z"


def partial_results_at_the_instant_of_redraw_available() -> dict[str, Any]:
    """The initial order's `partial_results` webhook, its event at the very instant of the
    `redraw_available` one that follows it (whose webhook may be lost); its block lists the
    initial order alone, at `partial_results`."""
    partial = body(redraw_scenario(), 2)
    data = partial["data"]
    event = {
        "id": 9009,
        "created_at": SAME_INSTANT,
        "status": "sample_with_lab.walk_in_test.partial_results",
        "status_detail": None,
    }
    data["events"][-1] = event
    data["last_event"] = dict(event)
    data["status"] = "sample_with_lab"
    block = data["order_transaction"]
    block["orders"] = block["orders"][:1]
    block["orders"][0]["low_level_status"] = "partial_results"
    return partial


@pytest.mark.parametrize("with_redraw_available_webhook", [False, True])
def test_a_block_listing_a_more_final_status_of_the_same_instant_beats_the_order_s_own_event(
    with_redraw_available_webhook: bool,
) -> None:
    """Issue 16, item 8: `partial_results` and `redraw_available` share a timestamp and the
    `redraw_available` webhook is lost; every later block lists the initial order at
    `redraw_available`, at that instant. The more final status wins, in every delivery order."""
    s = redraw_scenario()
    bodies = [body(s, 0), partial_results_at_the_instant_of_redraw_available(), body(s, 3)]
    if with_redraw_available_webhook:
        bodies.append(body(s, 2))
    while_active = final_view_in_every_order(bodies)
    initial = next(o for o in while_active.orders if o.id == s["expect"]["initial_order_id"])
    assert initial.low_level_status == "redraw_available"
    assert while_active.status == TransactionStatus.ACTIVE
    assert while_active.current_order_id == s["expect"]["redraw_order_id"]
    if with_redraw_available_webhook:
        # Its own event says the high level; a block entry never does.
        assert initial.high_level_status == "collecting_sample"

    done = final_view_in_every_order([*bodies, body(s, 5)])
    assert view_summary(done) == expected_summary(s)


@pytest.mark.parametrize(
    ("own", "listed", "expected"),
    [
        ("partial_results", "redraw_available", "redraw_available"),
        ("partial_results", "completed", "completed"),
        ("requisition_created", "cancelled", "cancelled"),
        ("cancelled", "completed", "completed"),
        ("completed", "corrected", "corrected"),
        # The order's own event is the more final one: it stays.
        ("redraw_available", "partial_results", "redraw_available"),
        ("corrected", "completed", "corrected"),
        # Equally final: the order's own event wins, as before.
        ("completed", "redraw_available", "completed"),
        ("ordered", "some_new_status", "ordered"),
    ],
)
def test_at_the_same_instant_the_more_final_status_wins_whichever_said_it(
    own: str, listed: str, expected: str
) -> None:
    """An order's own event against a block entry of the same instant, joined both ways."""
    own_body = partial_results_at_the_instant_of_redraw_available()
    own_body["data"]["events"][-1]["status"] = f"sample_with_lab.walk_in_test.{own}"
    own_body["data"]["last_event"]["status"] = f"sample_with_lab.walk_in_test.{own}"
    own_body["data"]["order_transaction"]["orders"][0]["low_level_status"] = own
    listing = body(redraw_scenario(), 3)  # the redraw order's webhook
    listing["data"]["order_transaction"]["orders"][0]["low_level_status"] = listed
    final = final_view_in_every_order([own_body, listing])
    initial = next(o for o in final.orders if o.id == own_body["data"]["id"])
    assert initial.low_level_status == expected
    assert initial.status_reached_at is not None
    assert initial.status_reached_at.isoformat() == "2026-03-06T15:00:00+00:00"


# -- every correction is announced ----------------------------------------------------------------


def corrected_at(at: str, event_id: int, *, with_earlier: str | None = None) -> dict[str, Any]:
    """The order of `completed_without_redraw` corrected at `at` (after `with_earlier`, if given,
    an earlier correction its events still list), with a block that says so."""
    b = body(scenario_named("completed_without_redraw"), 2)
    data = b["data"]
    if with_earlier is not None:
        data["events"].append(
            {
                "id": event_id - 1,
                "created_at": with_earlier,
                "status": "completed.walk_in_test.corrected",
            }
        )
    return corrected(b, at, event_id)


FIRST_CORRECTION = "2026-03-09T09:00:00Z"
SECOND_CORRECTION = "2026-03-11T14:30:00Z"


def test_a_second_correction_is_announced_as_results_corrected() -> None:
    """Issue 16, item 8: the second `corrected` changed the results again; it was announced as
    DETAILS_CHANGED, so nothing fetched the results again."""
    plain = scenario_named("completed_without_redraw")
    done = fold(events_of({"deliveries": plain["deliveries"]}))
    (first,) = events_of({"deliveries": [{"body": corrected_at(FIRST_CORRECTION, 99998)}]})
    (second,) = events_of(
        {
            "deliveries": [
                {"body": corrected_at(SECOND_CORRECTION, 99999, with_earlier=FIRST_CORRECTION)}
            ]
        }
    )
    once = join(done, knowledge_from_event(first))
    twice = join(once, knowledge_from_event(second))
    assert change_kinds(view(done), view(once)) == [
        ChangeKind.ORDER_STATUS_CHANGED,
        ChangeKind.RESULTS_CORRECTED,
    ]
    assert change_kinds(view(once), view(twice)) == [ChangeKind.RESULTS_CORRECTED]
    assert view(twice).status == TransactionStatus.COMPLETED
    # Seen again, the first correction is old news.
    assert change_kinds(view(twice), view(join(twice, knowledge_from_event(first)))) == []


def test_in_any_order_the_newest_correction_is_announced_when_it_becomes_known() -> None:
    """Over every delivery order with every delivery doubled: each change that brings a newer
    correction into the view says RESULTS_CORRECTED, and no other change does."""
    plain = scenario_named("completed_without_redraw")
    bodies = [
        *(body(plain, i) for i in range(len(plain["deliveries"]))),
        corrected_at(FIRST_CORRECTION, 99998),
        corrected_at(SECOND_CORRECTION, 99999, with_earlier=FIRST_CORRECTION),
    ]
    final = final_view_in_every_order(bodies)
    assert final.orders[0].low_level_status == "corrected"
    assert final.orders[0].status_reached_at is not None
    assert final.orders[0].status_reached_at.isoformat() == "2026-03-11T14:30:00+00:00"
    events = events_of({"deliveries": [{"body": b} for b in bodies]})
    for order in itertools.permutations(events):
        for before, after in view_steps(doubled(order)):
            old = before.orders[0] if before and before.orders else None
            new = after.orders[0]
            corrected_anew = new.low_level_status == "corrected" and (
                old is None
                or (old.low_level_status, old.status_reached_at)
                != (new.low_level_status, new.status_reached_at)
            )
            assert (ChangeKind.RESULTS_CORRECTED in change_kinds(before, after)) == corrected_anew


def test_the_history_says_why_a_same_instant_status_lost_and_names_a_second_correction() -> None:
    """The reasons recorded with those deliveries: the order's own `partial_results` is stale
    because a more final status of the same instant is known (not "older"); the second
    correction is named as such, not as "nothing a caller sees changed"."""
    s = redraw_scenario()
    known = fold(events_of({"deliveries": [{"body": body(s, i)} for i in (2, 3)]}))
    (partial,) = events_of(
        {"deliveries": [{"body": partial_results_at_the_instant_of_redraw_available()}]}
    )
    incoming = knowledge_from_event(partial)
    assert view(join(known, incoming)) == view(known)
    reason = stale_reason(partial, incoming, known, grew=True)
    assert reason.startswith("of the same instant as the more final order ")
    assert "`redraw_available` at 2026-03-06T15:00:00Z" in reason

    plain = scenario_named("completed_without_redraw")
    once = join(
        fold(events_of({"deliveries": plain["deliveries"]})),
        knowledge_from_event(parse_event(corrected_at(FIRST_CORRECTION, 99998))),
    )
    twice = join(
        once,
        knowledge_from_event(
            parse_event(corrected_at(SECOND_CORRECTION, 99999, with_earlier=FIRST_CORRECTION))
        ),
    )
    before, after = view(once), view(twice)
    assert applied_reason(diff_views(before, after), after) == (
        f"order {after.orders[0].id[:8]}… `corrected` again at 2026-03-11T14:30:00Z"
    )


# -- payloads without origins ---------------------------------------------------------------------


def without_origins(b: dict[str, Any]) -> dict[str, Any]:
    b["data"].pop("origin", None)
    for entry in b["data"].get("order_transaction", {}).get("orders", []):
        entry.pop("origin", None)
    return b


def test_with_no_origin_anywhere_the_initial_order_is_the_oldest_order_with_no_parent() -> None:
    s = redraw_scenario()
    final = final_view_in_every_order([without_origins(body(s, i)) for i in (0, 2, 3, 5)])
    assert {o.origin for o in final.orders} == {OrderOrigin.UNSPECIFIED}
    assert final.initial_order_id == s["expect"]["initial_order_id"]
    # Derived from the initial order, of unknown origin: not called a redraw, but followed.
    assert final.redraw_order_id == ""
    assert final.current_order_id == s["expect"]["redraw_order_id"]
    assert final.status == TransactionStatus.COMPLETED  # the provider's block says so


def test_with_no_origin_a_single_order_is_the_initial_order() -> None:
    plain = scenario_named("completed_without_redraw")
    final = final_view_in_every_order([without_origins(body(plain, i)) for i in range(3)])
    assert final.initial_order_id == final.current_order_id == plain["expect"]["initial_order_id"]
    assert final.status == TransactionStatus.COMPLETED


def test_an_order_marked_initial_wins_over_the_oldest_order() -> None:
    s = redraw_scenario()
    b = without_origins(body(s, 3))
    newer = b["data"]["order_transaction"]["orders"][1]
    newer["origin"] = "initial"  # odd, but the provider's word
    (event,) = events_of({"deliveries": [{"body": b}]})
    assert view(knowledge_from_event(event)).initial_order_id == newer["id"]


def test_client_user_id_comes_from_the_newest_webhook_that_carries_an_envelope() -> None:
    s = redraw_scenario()
    bodies = [body(s, i) for i in (0, 3, 5)]
    # The newest webhook comes as {event_type, data} only, as some documented examples do.
    bodies[2] = {"event_type": bodies[2]["event_type"], "data": bodies[2]["data"]}
    bodies[1]["client_user_id"] = "patient-f6c1c8 (new)"
    final = final_view_in_every_order(bodies)
    assert final.client_user_id == "patient-f6c1c8 (new)"
    assert final.status == TransactionStatus.COMPLETED


# -- every edge case mixed: any multiset of deliveries, in any order ------------------------------


def edge_case_pools() -> list[list[dict[str, Any]]]:
    """Per transaction: the fixture's deliveries and every odd delivery built above for it."""
    redraw, plain, cancelled = (
        scenario_named(n) for n in ("redraw_completed", "completed_without_redraw", "cancelled")
    )

    def all_of(s: dict[str, Any]) -> list[dict[str, Any]]:
        return [body(s, i) for i in range(len(s["deliveries"]))]

    return [
        [
            *all_of(redraw),
            late_initial_webhook_with_lagging_block(),
            saying_active(body(redraw, 5)),
            redraw_announced_before_the_redraw_order()[2],
            *redraw_cancelled_bodies(initial_cancelled=True)[3:],
            *redraw_cancelled_bodies(initial_cancelled=False)[3:],
            without_origins(body(redraw, 3)),
            partial_results_at_the_instant_of_redraw_available(),
        ],
        [
            *all_of(plain),
            corrected_webhook_with_lagging_block(),
            saying_active(body(plain, 2)),
            webhook_with_undated_block(),
            without_origins(body(plain, 1)),
            corrected_at(FIRST_CORRECTION, 99998),
            corrected_at(SECOND_CORRECTION, 99999, with_earlier=FIRST_CORRECTION),
        ],
        [*all_of(cancelled), saying_active(body(cancelled, 1)), reinstated_after_cancellation()],
    ]


EDGE_CASE_POOLS = edge_case_pools()


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_multiset_of_odd_deliveries_in_any_order_gives_the_view_of_its_set(
    data: st.DataObject,
) -> None:
    """Lagging, undated and `active` blocks, cancellations, reinstatements, missing origins, mixed
    at random: the view depends only on which deliveries were seen."""
    pool = events_of(
        {"deliveries": [{"body": b} for b in data.draw(st.sampled_from(EDGE_CASE_POOLS))]}
    )
    chosen = data.draw(st.lists(st.sampled_from(range(len(pool))), min_size=1), label="chosen")
    sequence = data.draw(st.permutations(chosen), label="sequence")
    distinct = sorted(set(chosen))
    assert view(fold([pool[i] for i in sequence])) == view(fold([pool[i] for i in distinct]))


# -- legacy payloads (no order_transaction block) ----------------------------------------------


def legacy_body(
    status: str = "completed", high: str = "completed", index: int = 2
) -> dict[str, Any]:
    plain = next(s for s in SCENARIOS if s["scenario"] == "completed_without_redraw")
    b = body(plain, index)
    del b["data"]["order_transaction"]
    del b["data"]["origin"]
    b["data"]["last_event"]["status"] = f"{high}.walk_in_test.{status}"
    b["data"]["events"][-1]["status"] = f"{high}.walk_in_test.{status}"
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


@pytest.mark.parametrize(
    ("high", "low"),
    [
        ("cancelled", "do_not_process"),  # e.g. cancelled.testkit.do_not_process
        ("cancelled", "cancelled"),
        ("failed", "sample_error"),
        ("failed", "lost"),
    ],
)
def test_a_legacy_order_that_was_cancelled_or_failed_ends_its_transaction_cancelled(
    high: str, low: str
) -> None:
    earlier = [
        legacy_body("ordered", "received", 0),
        legacy_body("requisition_created", "received", 1),
    ]
    final = final_view_in_every_order([*earlier, legacy_body(low, high)])
    assert final.legacy
    assert final.status == TransactionStatus.CANCELLED
    assert (final.orders[0].high_level_status, final.orders[0].low_level_status) == (high, low)


def test_a_legacy_order_reinstated_after_failing_is_active_again() -> None:
    failed = legacy_body("sample_error", "failed", 1)
    reinstated = legacy_body("appointment_scheduled", "collecting_sample")
    assert final_view_in_every_order([failed, reinstated]).status == TransactionStatus.ACTIVE


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


@pytest.mark.parametrize(
    ("mutate", "field", "words"),
    [
        (lambda b: b["data"].update(sample_id="s" * 41), "data.sample_id", "max_string_length=40"),
        (lambda b: b.update(client_user_id="c" * 41), "client_user_id", "max_string_length=40"),
        (lambda b: b.update(event_type="labtest.order." + "x" * 30), "event_type", "44 characters"),
        (
            lambda b: b["data"]["lab_test"]["lab"].update(slug="q" * 41),
            "data.lab_test.lab.slug",
            "max_string_length",
        ),
        (
            lambda b: b["data"]["events"][0].update(status="a.b." + "c" * 40),
            "data.events[0].status",
            "max_string_length",
        ),
        (
            lambda b: b["data"]["order_transaction"]["orders"][1].update(parent_id="p" * 41),
            "data.order_transaction.orders[1].parent_id",
            "max_string_length",
        ),
        (
            lambda b: b["data"]["order_transaction"]["orders"].append({"id": "third"}),
            "data.order_transaction.orders",
            "lists 3 orders; the limit is max_orders_per_transaction=2",
        ),
    ],
)
def test_strings_and_order_lists_over_the_limits_are_refused_naming_field_and_limit(
    mutate: Any, field: str, words: str
) -> None:
    b = body(redraw_scenario(), 3)  # its block lists two orders
    limits = StateLimits(max_string_length=40, max_orders_per_transaction=2, max_view_bytes=1000)
    parse_event(b, limits=limits)  # within the limits as it is
    mutate(b)
    with pytest.raises(PayloadError) as caught:
        parse_event(b, limits=limits)
    (violation,) = caught.value.violations
    assert violation.field == field
    assert words in violation.description
    parse_event(b)  # the defaults are far larger


@pytest.mark.parametrize(
    "value",
    [
        "0001-01-01T00:00:00+01:00",  # off the calendar once converted to UTC
        "9999-12-31T23:59:59-01:00",
        "1899-12-31T23:59:59Z",
        "9999-01-01T00:00:00Z",
    ],
)
def test_timestamps_outside_the_supported_range_are_refused(value: str) -> None:
    b = body(redraw_scenario(), 0)
    b["data"]["updated_at"] = value
    with pytest.raises(PayloadError) as caught:
        parse_event(b)
    assert [v.field for v in caught.value.violations] == ["data.updated_at"]
    assert "1900-01-01" in caught.value.violations[0].description


def test_timestamps_at_the_ends_of_the_supported_range_are_kept() -> None:
    b = body(redraw_scenario(), 0)
    b["data"]["created_at"] = "1900-01-01T01:00:00+01:00"
    b["data"]["updated_at"] = "9998-12-31T23:59:59.999999Z"
    event = parse_event(b)
    assert isinstance(event, OrderEvent)
    assert event.order.created_at is not None
    assert event.order.created_at.isoformat() == "1900-01-01T00:00:00+00:00"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('{"event_type": "x", "a": ' + "[" * 5000 + "]" * 5000 + "}", "nested deeper than 32"),
        ('{"event_type": "x", "a": ' + '{"a": ' * 40 + "{}" + "}" * 40 + "}", "deeper than 32"),
        ('{"event_type": "x", "a": 1e400}', "out of range"),
        ('{"event_type": "x", "a": -Infinity}', "Infinity is not a JSON value"),
    ],
)
def test_json_bodies_too_deep_or_with_non_finite_numbers_are_refused(text: str, words: str) -> None:
    with pytest.raises(PayloadError) as caught:
        decode_json_body(text)
    assert words in str(caught.value)


@pytest.mark.parametrize(
    ("body_", "field", "words"),
    [
        ({"event_type": "x", "a": {"b": [1, 2.5, math.nan]}}, "a.b[2]", "NaN"),
        ({"event_type": "x", "odd key\n": math.inf}, "['odd key\\n']", "Infinity"),
        (
            {"event_type": "x", "a": functools.reduce(lambda v, _: [v], range(40), 1)},
            "",
            "nested deeper than 32",
        ),
    ],
)
def test_decoded_bodies_too_deep_or_with_non_finite_numbers_are_refused(
    body_: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(PayloadError) as caught:
        normalise_body(body_)
    (violation,) = caught.value.violations
    assert (violation.field, words in violation.description) == (field, True)


def test_a_body_nested_exactly_to_the_limit_is_accepted_and_numbers_are_normalised() -> None:
    deep: Any = 9001.0
    for _ in range(MAX_BODY_DEPTH - 1):
        deep = [deep]
    normalised = normalise_body({"event_type": "x", "a": deep, "b": 2.5})
    assert normalised["b"] == 2.5
    assert canonical_json(normalised) == canonical_json(
        decode_json_body(json.dumps({"event_type": "x", "a": deep, "b": 2.5}))
    )
    assert "9001.0" not in canonical_json(normalised)


def test_other_event_types_parse_without_order_data() -> None:
    event = parse_event({"event_type": "labtest.appointment.updated", "data": {"order_id": "x"}})
    assert not isinstance(event, OrderEvent)
    assert event.event_type == "labtest.appointment.updated"


def test_the_stored_json_is_what_the_pydantic_codec_wrote_and_old_rows_load(
    scenario: dict[str, Any],
) -> None:
    """The state codec moved from pydantic to msgspec for speed: rows written before load the
    same, and the JSON written now is byte for byte what was written before. (The state was
    dataclasses then, which pydantic dumped field by field in order: what it dumps of the same
    fields as dicts, in order, with their values as they are.)"""
    from pydantic import TypeAdapter

    from transaction_service.domain.state import (
        knowledge_from_json,
        knowledge_to_json,
        view_from_json,
        view_to_json,
    )

    events = [parse_event(d["body"]) for d in scenario["deliveries"]]
    knowledge = reduce(join, [knowledge_from_event(e) for e in events if isinstance(e, OrderEvent)])
    transaction = view(knowledge)
    for value, to_json, from_json in (
        (knowledge, knowledge_to_json, knowledge_from_json),
        (transaction, view_to_json, view_from_json),
    ):
        before = TypeAdapter(Any).dump_json(_as_dicts(value)).decode()
        assert to_json(value) == before
        assert from_json(before) == value


def _as_dicts(value: Any) -> Any:
    """A Struct as a dict of its fields in order, all the way down; other values as they are."""
    if isinstance(value, msgspec.Struct):
        return {name: _as_dicts(getattr(value, name)) for name in value.__struct_fields__}
    if isinstance(value, dict):
        return {key: _as_dicts(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_as_dicts(item) for item in value]
    return value


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(value=st.dictionaries(st.text(), JSON_VALUES, max_size=5))
def test_the_fast_canonical_form_is_the_json_module_s_byte_for_byte(value: dict[str, Any]) -> None:
    """Digests are stored: the faster encoder must write exactly what json.dumps wrote, for bodies
    decoded from JSON text and from a Struct alike (floats in exponent form included)."""
    import json

    from transaction_service.domain.payload import (
        canonical_bytes,
        canonical_json,
        decode_json_body,
        normalise_body,
    )

    try:
        decoded = decode_json_body(json.dumps(value))
    except PayloadError:
        return  # deeper than the limit
    assert canonical_bytes(decoded) == canonical_json(decoded).encode()
    normalised = normalise_body(value)
    assert canonical_bytes(normalised) == canonical_json(normalised).encode()


# -- the fast parser against the reference --------------------------------------------------------


def _variants() -> list[dict[str, Any]]:
    """Every fixture body, and bodies with the values where the two parsers could part: odd
    timestamp spellings, values the lenient models coerce, strings at and over the limits."""
    bodies = [copy.deepcopy(d["body"]) for s in SCENARIOS for d in s["deliveries"]]
    base = body(redraw_scenario(), 3)
    edits: list[Any] = [
        lambda b, value=value: b["data"].update(updated_at=value)
        for value in (
            "2024-01-01 00:00:00",
            "2024-01-01t00:00:00z",
            "2024-01-01T00:00:00.1234567Z",
            "2024-01-01T00:00:00.9999999+02:00",
            "2024-01-01T00:00:00,5Z",
            "2024-01-01",
            "2024-01-01T00:00:00+0100",
            1700000000,
            "1899-12-31T23:59:59Z",
            None,
        )
    ]
    edits += [
        lambda b: b["data"]["events"][0].update(id="12"),
        lambda b: b["data"]["events"][0].update(id=True),
        lambda b: b["data"].update(has_missing_results="true"),
        lambda b: b["data"].update(has_missing_results=1),
        lambda b: b["data"].update(id=" "),
        lambda b: b["data"].update(sample_id="s" * 40),
        lambda b: b["data"].update(sample_id="s" * 41),
        lambda b: b.update(user_id="é" * 40),
        lambda b: b.update(team_id=7),
        lambda b: b.update(event_type="labtest.appointment.updated", client_user_id="c" * 41),
        lambda b: b["data"]["order_transaction"]["orders"].append({"id": "third"}),
        lambda b: b["data"]["order_transaction"]["orders"][0].update(id=""),
        lambda b: b["data"].pop("order_transaction"),
        lambda b: b.pop("data"),
    ]
    for edit in edits:
        changed = copy.deepcopy(base)
        edit(changed)
        bodies.append(changed)
    return bodies


@pytest.mark.parametrize("body_", _variants())
def test_the_fast_parser_takes_only_what_the_reference_takes_and_alike(
    body_: dict[str, Any],
) -> None:
    from transaction_service.domain import payload

    small = StateLimits(max_string_length=40, max_orders_per_transaction=2, max_view_bytes=1000)
    for limits in (small, StateLimits()):
        digest = payload.body_digest(body_)
        fast = payload._fast_event(body_, digest, limits)
        try:
            reference = payload._reference_event(body_, digest, limits)
        except PayloadError as refused:
            violations = refused.violations
            reference = None
        if reference is None:
            assert fast is None
            with pytest.raises(PayloadError) as caught:
                parse_event(body_, limits=limits)
            assert caught.value.violations == violations
            continue
        assert parse_event(body_, limits=limits) == reference
        # The fast parser rounds a seventh decimal of a second; parse_event never lets it.
        if fast is not None and not payload._LONG_FRACTION.search(payload.canonical_bytes(body_)):
            assert fast == reference
