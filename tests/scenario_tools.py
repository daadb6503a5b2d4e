"""Helpers for driving scenarios: fresh ids per run, expectation checks."""

from __future__ import annotations

import copy
import itertools
import json
import random
import uuid
from typing import Any

from transaction_service.domain.state import TransactionView

_ORIGIN_NAMES = {
    "initial": "ORDER_ORIGIN_INITIAL",
    "redraw": "ORDER_ORIGIN_REDRAW",
    "recreation": "ORDER_ORIGIN_RECREATION",
    "": "ORDER_ORIGIN_UNSPECIFIED",
}


def scenario_ids(scenario: dict[str, Any]) -> list[str]:
    expect = scenario["expect"]
    return [expect["transaction_id"], *expect["orders"]]


def with_fresh_ids(scenario: dict[str, Any], tag: str = "") -> dict[str, Any]:
    """A copy of the scenario whose transaction, order and svix ids are new.

    Lets many runs share one store without seeing each other.
    """
    text = json.dumps(scenario)
    for old in scenario_ids(scenario):
        text = text.replace(old, str(uuid.uuid4()))
    fresh = json.loads(text)
    suffix = tag or uuid.uuid4().hex[:12]
    for delivery in fresh["deliveries"]:
        delivery["svix_id"] = f"{delivery['svix_id']}-{suffix}"
    return fresh


# Delivery orders per scenario that the tests on real stores send: all of them up to this many,
# else a seeded sample (sampled_orders). test_plan.py tries every order of every scenario on the
# in-memory store, at the plan level: what the stores and the API add does not depend on it.
SAMPLED_ORDERS = 6


def sampled_orders(n: int, seed: str) -> list[tuple[int, tuple[int, ...]]]:
    """(index, order) among the orders of n deliveries (itertools.permutations): all of them up
    to SAMPLED_ORDERS, else the first and the last (in order, reversed) and random others,
    the same ones every run for the same seed."""
    every = list(enumerate(itertools.permutations(range(n))))
    if len(every) <= SAMPLED_ORDERS:
        return every
    middle = random.Random(seed).sample(every[1:-1], SAMPLED_ORDERS - 2)
    return [every[0], *sorted(middle), every[-1]]


def expected_summary(scenario: dict[str, Any]) -> dict[str, Any]:
    expect = copy.deepcopy(scenario["expect"])
    expect["orders"] = {k: tuple(v) for k, v in expect["orders"].items()}
    return expect


def view_summary(view: TransactionView) -> dict[str, Any]:
    """The view reduced to the fields a scenario's `expect` holds, in its spelling."""
    return {
        "transaction_id": view.id,
        "status": f"TRANSACTION_STATUS_{view.status.value.upper()}",
        "initial_order_id": view.initial_order_id,
        "redraw_order_id": view.redraw_order_id,
        "redraw_available": view.redraw_available,
        "current_order_id": view.current_order_id,
        "orders": {o.id: (_ORIGIN_NAMES[o.origin.value], o.low_level_status) for o in view.orders},
    }


def corrected(body: dict[str, Any], at: str, event_id: int) -> dict[str, Any]:
    """A copy of an order's webhook `body` with the order corrected at `at`: a `corrected` event
    `event_id`, and its entry of the transaction block at `corrected` since `at`."""
    b = copy.deepcopy(body)
    data = b["data"]
    data["events"].append(
        {"id": event_id, "created_at": at, "status": "completed.walk_in_test.corrected"}
    )
    data["last_event"] = data["events"][-1]
    data["updated_at"] = at
    for entry in data["order_transaction"]["orders"]:
        if entry["id"] == data["id"]:
            entry.update(
                low_level_status="corrected", low_level_status_created_at=at, updated_at=at
            )
    return b
