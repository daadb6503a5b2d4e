"""The gRPC contract, in process: outcomes, lookups, listing, and every bad input."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import sqlite3
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, timestamp_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import BODY_LIMIT, SCENARIOS
from tests.harness import (
    Running,
    check_expect,
    error_info,
    ingest,
    loopback_settings,
    struct,
    violated_fields,
)
from tests.scenario_tools import sampled_orders, with_fresh_ids
from transaction_service.api.convert import struct_to_dict, transaction_to_pb
from transaction_service.api.drain import QUIET_SECONDS
from transaction_service.domain.limits import DEFAULT_LIMITS, MAX_BODY_DEPTH
from transaction_service.domain.state import (
    OrderOrigin,
    OrderView,
    TransactionStatus,
    TransactionView,
    view_to_json,
)
from transaction_service.server import TransactionService
from transactions.v1 import transactions_pb2 as pb
from transactions.v1 import transactions_pb2_grpc as pb_grpc


async def send(api: Running, event_id: str, body: dict[str, Any], *, as_json: bool) -> Any:
    """IngestEvent with the body as raw JSON text or as a Struct."""
    request = pb.IngestEventRequest(event_id=event_id)
    if as_json:
        request.payload_json = json.dumps(body)
    else:
        request.payload.CopyFrom(struct(body))
    return await api.stub.IngestEvent(request)


async def check_served(api: Running, expect: dict[str, Any]) -> None:
    """GetTransaction by id matches `expect`, and every order id finds the same transaction."""
    got = await api.stub.GetTransaction(
        pb.GetTransactionRequest(transaction_id=expect["transaction_id"])
    )
    check_expect(got.transaction, expect)
    for order_id in expect["orders"]:
        by_order = await api.stub.GetTransaction(pb.GetTransactionRequest(order_id=order_id))
        assert by_order.transaction == got.transaction


# -- the scenarios through IngestEvent -----------------------------------------------------------


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
async def test_any_delivery_order_with_duplicates_and_resends_reaches_expect(
    api: Running, data: st.DataObject
) -> None:
    """Hypothesis shuffles deliveries, repeats some, re-sends some under new ids, and mixes
    both body forms; the transaction always ends in the fixture's expected state."""
    run = with_fresh_ids(data.draw(st.sampled_from(SCENARIOS), label="scenario"))
    deliveries = run["deliveries"]
    n = len(deliveries)
    repeats = data.draw(st.lists(st.integers(0, n - 1), max_size=2 * n), label="repeats")
    resends = data.draw(st.lists(st.integers(0, n - 1), max_size=n), label="resends")
    sends = [(d["svix_id"], d["body"]) for d in deliveries]
    sends += [(deliveries[i]["svix_id"], deliveries[i]["body"]) for i in repeats]
    sends += [
        (f"resend-{k}-{run['deliveries'][i]['svix_id']}", deliveries[i]["body"])
        for k, i in enumerate(resends)
    ]
    order = data.draw(st.permutations(sends), label="order")
    raw = data.draw(st.lists(st.booleans(), min_size=len(order), max_size=len(order)))
    seen: set[str] = set()
    for (event_id, body), as_json in zip(order, raw, strict=True):
        response = await send(api, event_id, body, as_json=as_json)
        assert (response.outcome == pb.INGEST_OUTCOME_DUPLICATE) == (event_id in seen)
        seen.add(event_id)
        assert response.transaction.id == run["expect"]["transaction_id"]
    await check_served(api, run["expect"])


async def test_sampled_delivery_orders_with_every_delivery_duplicated_reach_expect(
    api: Running, scenario: dict[str, Any]
) -> None:
    """Sampled delivery orders (sampled_orders), each delivery sent twice (as an immediate retry
    in even permutations, as a second pass in odd ones), alternating the two body forms."""
    n = len(scenario["deliveries"])
    for i, order in sampled_orders(n, scenario["scenario"]):
        run = with_fresh_ids(scenario, tag=f"p{i}")
        once = [run["deliveries"][j] for j in order]
        twice = [d for d in once for _ in (0, 1)] if i % 2 == 0 else once + once
        seen: set[str] = set()
        for k, d in enumerate(twice):
            response = await send(api, d["svix_id"], d["body"], as_json=bool((i + k) % 2))
            assert (response.outcome == pb.INGEST_OUTCOME_DUPLICATE) == (d["svix_id"] in seen)
            seen.add(d["svix_id"])
        await check_served(api, run["expect"])


async def test_outcomes_and_revisions(api: Running) -> None:
    d = SCENARIOS[0]["deliveries"]
    first = await ingest(api, d[0]["svix_id"], d[0]["body"])
    assert first.outcome == pb.INGEST_OUTCOME_APPLIED
    assert first.revision == first.transaction.revision == 1
    assert first.event_id == d[0]["svix_id"]
    dup = await ingest(api, d[0]["svix_id"], d[0]["body"])
    assert (dup.outcome, dup.revision) == (pb.INGEST_OUTCOME_DUPLICATE, 0)
    assert dup.transaction == first.transaction
    stale = await ingest(api, "msg_other_id", d[0]["body"])
    assert (stale.outcome, stale.revision) == (pb.INGEST_OUTCOME_STALE, 0)
    ignored = await ingest(api, "msg_appt", {"event_type": "labtest.appointment.updated"})
    assert ignored.outcome == pb.INGEST_OUTCOME_IGNORED
    assert not ignored.HasField("transaction")
    second = await ingest(api, d[1]["svix_id"], d[1]["body"])
    assert second.revision == 2
    got = await api.stub.GetTransaction(
        pb.GetTransactionRequest(order_id=d[0]["body"]["data"]["id"])
    )
    assert got.revision == 2
    assert got.transaction.revision == 2


async def test_order_fields_a_screen_needs(api: Running) -> None:
    s = next(s for s in SCENARIOS if s["scenario"] == "redraw_completed")
    for d in s["deliveries"]:
        await ingest(api, d["svix_id"], d["body"])
    txn = (
        await api.stub.GetTransaction(
            pb.GetTransactionRequest(transaction_id=s["expect"]["transaction_id"])
        )
    ).transaction
    initial, redraw = txn.orders
    assert initial.high_level_status == "collecting_sample"
    assert initial.collection_method == "walk_in_test"
    assert initial.sample_id == "WF8644A811"
    assert initial.lab == "quest"
    assert initial.lab_test_name == "Comprehensive Metabolic Panel"
    assert initial.HasField("has_missing_results")
    assert initial.has_missing_results
    assert initial.status_reached_at.ToJsonString() == "2026-03-06T15:00:00Z"
    assert redraw.parent_order_id == initial.id
    assert redraw.interpretation == "abnormal"
    assert txn.user_id == "f6c1c89a-eb38-5f9a-a3a4-bb661a1f8c89"
    assert txn.team_id == "6353bcab-3526-4838-8c92-063fa760fb6b"
    assert txn.client_user_id == "patient-f6c1c8"
    assert txn.created_at.ToJsonString() == "2026-03-01T10:00:00Z"
    assert txn.updated_at.ToJsonString() == "2026-03-12T09:00:00Z"
    assert txn.provider_status == "completed"


# -- bad input: status, message, field details, and nothing stored -------------------------------


def order_body(**data_changes: Any) -> dict[str, Any]:
    body = json.loads(json.dumps(SCENARIOS[0]["deliveries"][0]["body"]))
    body["data"].update(data_changes)
    return body


def without(body: dict[str, Any], *path: str) -> dict[str, Any]:
    node = body
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return body


def nested(depth: int, leaf: Any = "x") -> dict[str, Any]:
    """An ignored event type whose body nests objects `depth` levels deep (the body is level 1)."""
    value = leaf
    for _ in range(depth - 1):
        value = {"a": value}
    return {"event_type": "labtest.result.critical", "a": value}


def with_transaction_orders(count: int) -> dict[str, Any]:
    body = order_body()
    block = body["data"]["order_transaction"]
    # The carrying order first, as the provider lists it, then others.
    first = block["orders"][0]
    block["orders"] = [first] + [dict(first, id=f"order-{i}") for i in range(1, count)]
    return body


LONG = "x" * (DEFAULT_LIMITS.max_string_length + 1)

BAD_INPUTS = [
    # (name, request, field named, words in the message)
    (
        "not json",
        pb.IngestEventRequest(event_id="e", payload_json="{oops"),
        "payload_json",
        "not valid JSON",
    ),
    (
        "json array",
        pb.IngestEventRequest(event_id="e", payload_json="[1, 2]"),
        "payload_json",
        "JSON object",
    ),
    (
        "json string",
        pb.IngestEventRequest(event_id="e", payload_json='"hi"'),
        "payload_json",
        "JSON object",
    ),
    ("no body", pb.IngestEventRequest(event_id="e"), "body", "payload"),
    (
        "unpaired surrogate escape",
        pb.IngestEventRequest(event_id="e", payload_json='{"event_type": "x", "a": "\\ud800"}'),
        "payload_json",
        "surrogate",
    ),
    (
        "NaN is not JSON",
        pb.IngestEventRequest(event_id="e", payload_json='{"event_type": "x", "a": NaN}'),
        "payload_json",
        "NaN",
    ),
    (
        "no event_type",
        pb.IngestEventRequest(event_id="e", payload=struct(without(order_body(), "event_type"))),
        "payload.event_type",
        "Field required",
    ),
    (
        "order event without data.id",
        pb.IngestEventRequest(
            event_id="e", payload_json=json.dumps(without(order_body(), "data", "id"))
        ),
        "payload_json.data.id",
        "Field required",
    ),
    (
        "order event without data",
        pb.IngestEventRequest(
            event_id="e", payload=struct({"event_type": "labtest.order.updated"})
        ),
        "payload.data",
        "Field required",
    ),
    (
        "data.id of the wrong type",
        pb.IngestEventRequest(event_id="e", payload=struct(order_body(id=42))),
        "payload.data.id",
        "valid string",
    ),
    (
        "events of the wrong type",
        pb.IngestEventRequest(event_id="e", payload=struct(order_body(events={"id": 1}))),
        "payload.data.events",
        "valid list",
    ),
    (
        "event id of the wrong type",
        pb.IngestEventRequest(
            event_id="e",
            payload=struct(
                order_body(
                    last_event={"id": "x", "created_at": "2026-03-01T10:00:00Z", "status": "a.b.c"}
                )
            ),
        ),
        "payload.data.last_event.id",
        "valid integer",
    ),
    (
        "bad timestamp",
        pb.IngestEventRequest(event_id="e", payload=struct(order_body(created_at="March 1st"))),
        "payload.data.created_at",
        "datetime",
    ),
    (
        "transaction block of the wrong type",
        pb.IngestEventRequest(event_id="e", payload=struct(order_body(order_transaction="t1"))),
        "payload.data.order_transaction",
        "",
    ),
    (
        "oversized body",
        pb.IngestEventRequest(
            event_id="e", payload_json=json.dumps(order_body(notes="x" * BODY_LIMIT))
        ),
        "payload_json",
        f"the limit is {BODY_LIMIT}",
    ),
    (
        "oversized struct body",
        pb.IngestEventRequest(event_id="e", payload=struct(order_body(notes="x" * BODY_LIMIT))),
        "payload",
        f"the limit is {BODY_LIMIT}",
    ),
    (
        "event id too long",
        pb.IngestEventRequest(event_id="m" * 300, payload=struct(order_body())),
        "event_id",
        "longer than 256",
    ),
    (
        "event id with control characters",
        pb.IngestEventRequest(event_id="msg\n1", payload=struct(order_body())),
        "event_id",
        "control characters",
    ),
    # Issue 16, item 6: the prefixes of the service's own records; the history would lie.
    (
        "event id with the prefix of Junction API answers",
        pb.IngestEventRequest(event_id="api:sha256:" + "0" * 64, payload=struct(order_body())),
        "event_id",
        "must not start with `api:`",
    ),
    (
        "event id with the prefix of results fetches",
        pb.IngestEventRequest(
            event_id="api:results:sha256:0", payload_json=json.dumps(order_body())
        ),
        "event_id",
        "the service names its own records so",
    ),
    (
        "event id with the prefix of rebuilds",
        pb.IngestEventRequest(event_id="rebuild:2026-12-07T00:00:00", payload=struct(order_body())),
        "event_id",
        "`rebuild:`",
    ),
    (
        "event id with a reserved prefix in capitals",
        pb.IngestEventRequest(event_id="API:x", payload=struct(order_body())),
        "event_id",
        "must not start with",
    ),
    (
        "derived event id of another body",
        pb.IngestEventRequest(event_id="sha256:" + "0" * 64, payload=struct(order_body())),
        "event_id",
        "derives from this body",
    ),
    (
        "json nested 1000 deep",
        pb.IngestEventRequest(
            event_id="e",
            payload_json='{"event_type": "x", "a": ' + "[" * 1000 + "]" * 1000 + "}",
        ),
        "payload_json",
        f"nested deeper than {MAX_BODY_DEPTH} levels",
    ),
    (
        "json nested one level too deep",
        pb.IngestEventRequest(event_id="e", payload_json=json.dumps(nested(MAX_BODY_DEPTH + 1))),
        "payload_json",
        f"nested deeper than {MAX_BODY_DEPTH} levels",
    ),
    (
        "struct nested one level too deep",
        pb.IngestEventRequest(event_id="e", payload=struct(nested(MAX_BODY_DEPTH + 1))),
        "payload",
        f"nested deeper than {MAX_BODY_DEPTH} levels",
    ),
    (
        "NaN in a struct",
        pb.IngestEventRequest(event_id="e", payload=struct(order_body(price=math.nan))),
        "payload.data.price",
        "NaN",
    ),
    (
        "Infinity in a struct list",
        pb.IngestEventRequest(event_id="e", payload=struct(order_body(markers=[1, -math.inf]))),
        "payload.data.markers[1]",
        "Infinity",
    ),
    (
        "timestamp before the supported range",
        pb.IngestEventRequest(
            event_id="e",
            payload_json=json.dumps(order_body(created_at="0001-01-01T00:00:00+01:00")),
        ),
        "payload_json.data.created_at",
        "1900-01-01",
    ),
    (
        "timestamp after the supported range",
        pb.IngestEventRequest(
            event_id="e", payload=struct(order_body(updated_at="9999-12-31T23:59:59-01:00"))
        ),
        "payload.data.updated_at",
        "9999-01-01",
    ),
    (
        "whitespace-only data.id",
        pb.IngestEventRequest(event_id="e", payload=struct(order_body(id=" \t "))),
        "payload.data.id",
        "non-space character",
    ),
    (
        "whitespace-only transaction id",
        pb.IngestEventRequest(
            event_id="e",
            payload=struct(order_body(order_transaction={"id": "  ", "status": "active"})),
        ),
        "payload.data.order_transaction.id",
        "non-space character",
    ),
    (
        "whitespace-only id of a transaction's order",
        pb.IngestEventRequest(
            event_id="e",
            payload_json=json.dumps(
                order_body(order_transaction={"id": "t", "orders": [{"id": "o"}, {"id": " "}]})
            ),
        ),
        "payload_json.data.order_transaction.orders[1].id",
        "non-space character",
    ),
    # Issue 16, item 7: ids that would change the path of a Junction API request.
    (
        "order id `..`",
        pb.IngestEventRequest(event_id="e", payload=struct(order_body(id=".."))),
        "payload.data.id",
        "must not be `.` or `..`",
    ),
    (
        "transaction id `.`",
        pb.IngestEventRequest(
            event_id="e",
            payload_json=json.dumps(
                order_body(order_transaction={"id": ".", "status": "active", "orders": []})
            ),
        ),
        "payload_json.data.order_transaction.id",
        "change the path of a Junction API request",
    ),
    (
        "id `..` of a transaction's order",
        pb.IngestEventRequest(
            event_id="e",
            payload=struct(
                order_body(order_transaction={"id": "t", "orders": [{"id": "o"}, {"id": ".."}]})
            ),
        ),
        "payload.data.order_transaction.orders[1].id",
        "must not be `.` or `..`",
    ),
    (
        "string longer than the state keeps",
        pb.IngestEventRequest(event_id="e", payload=struct(order_body(sample_id=LONG))),
        "payload.data.sample_id",
        f"max_string_length={DEFAULT_LIMITS.max_string_length}",
    ),
    (
        "client_user_id longer than the state keeps",
        pb.IngestEventRequest(
            event_id="e", payload_json=json.dumps(dict(order_body(), client_user_id=LONG))
        ),
        "payload_json.client_user_id",
        "max_string_length",
    ),
    (
        "a number no double holds",
        pb.IngestEventRequest(event_id="e", payload_json='{"event_type": "x", "a": 1e400}'),
        "payload_json",
        "out of range",
    ),
    (
        "too many orders in one transaction block",
        pb.IngestEventRequest(
            event_id="e",
            payload=struct(with_transaction_orders(DEFAULT_LIMITS.max_orders_per_transaction + 1)),
        ),
        "payload.data.order_transaction.orders",
        f"max_orders_per_transaction={DEFAULT_LIMITS.max_orders_per_transaction}",
    ),
]


@pytest.mark.asyncio(loop_scope="class")
class TestBadInput:
    """One server per store for all the cases: each is refused and leaves the store as it was."""

    @pytest.mark.parametrize(
        ("request_", "field", "words"),
        [case[1:] for case in BAD_INPUTS],
        ids=[case[0] for case in BAD_INPUTS],
    )
    async def test_bad_input_is_invalid_argument_naming_the_field_and_stores_nothing(
        self, class_api: Running, request_: pb.IngestEventRequest, field: str, words: str
    ) -> None:
        api = class_api
        # Something stored already (by the first case; a duplicate after it), so "nothing
        # changed" is checked against a non-empty store.
        d = SCENARIOS[0]["deliveries"][0]
        await ingest(api, d["svix_id"], d["body"])
        before = api.counts()
        head = await api.service.store.head_revision()
        assert head > 0
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await api.stub.IngestEvent(request_)
        error = caught.value
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in error.details()
        assert words in error.details()
        assert field in violated_fields(error)
        assert api.counts() == before
        assert await api.service.store.head_revision() == head


async def test_reserved_event_ids_are_refused_in_streams_and_a_derived_id_may_be_quoted_back(
    api: Running,
) -> None:
    """Issue 16, item 6, on the IngestEvents paths: a reserved prefix is refused in place (single
    requests and requests of several deliveries), the rest of the stream goes on, nothing of the
    refused deliveries is stored. An id the service derived (`sha256:` + digest) may be sent back
    with its own body: a retry, DUPLICATE."""
    run = with_fresh_ids(SCENARIOS[0])
    first, second = run["deliveries"][:2]
    derived = await api.stub.IngestEvent(pb.IngestEventRequest(payload=struct(first["body"])))
    assert derived.event_id.startswith("sha256:")
    before = api.counts()
    head = await api.service.store.head_revision()

    def forged(event_id: str, body: dict[str, Any]) -> pb.IngestEventRequest:
        return pb.IngestEventRequest(event_id=event_id, payload_json=json.dumps(body))

    requests = [
        forged("rebuild:x", second["body"]),
        pb.IngestEventRequest(
            deliveries=[forged("api:sha256:forged", second["body"]), forged("ok-1", second["body"])]
        ),
        forged(derived.event_id, second["body"]),  # the derived id of another body
        pb.IngestEventRequest(event_id=derived.event_id, payload=struct(first["body"])),
    ]

    async def stream() -> Any:
        for r in requests:
            yield r

    single, several, other_body, retry = [r async for r in api.stub.IngestEvents(stream())]
    refused = [single, several.results[0], other_body]
    for answer in refused:
        assert answer.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert [v.field for v in answer.error.field_violations] == ["event_id"]
    assert several.results[1].outcome == pb.INGEST_OUTCOME_APPLIED
    assert retry.outcome == pb.INGEST_OUTCOME_DUPLICATE
    assert retry.event_id == derived.event_id
    # Only "ok-1" was stored (and the retry counted on the derived id's row).
    assert api.counts()["events"] == before["events"] + 1
    assert await api.service.store.head_revision() == head + 1


async def test_bodies_at_the_limits_are_accepted_in_both_forms(api: Running) -> None:
    deep = nested(MAX_BODY_DEPTH)
    for as_json in (True, False):
        response = await send(api, f"deep-{as_json}", deep, as_json=as_json)
        assert response.outcome == pb.INGEST_OUTCOME_IGNORED
    full = with_transaction_orders(DEFAULT_LIMITS.max_orders_per_transaction)
    full["data"]["sample_id"] = LONG[:-1]
    full["client_user_id"] = LONG[:-1]
    response = await send(api, "full", full, as_json=False)
    assert response.outcome == pb.INGEST_OUTCOME_APPLIED
    assert len(response.transaction.orders) == DEFAULT_LIMITS.max_orders_per_transaction
    assert response.transaction.client_user_id == LONG[:-1]


def largest_view(text: str) -> TransactionView:
    """A transaction at the limits: the most orders, every string it shows at the longest."""
    limits = DEFAULT_LIMITS

    def longest(i: int) -> str:
        return f"{i:04d}" + text * (limits.max_string_length - 4)

    when = datetime(2026, 3, 1, tzinfo=UTC)
    orders = [
        OrderView(
            id=longest(i),
            origin=OrderOrigin.RECREATION,
            **{name: longest(i) for name in ("low_level_status", "high_level_status", "sample_id")},
            **{name: longest(i) for name in ("collection_method", "lab", "lab_test_name")},
            **{name: longest(i) for name in ("interpretation", "parent_order_id")},
            status_reached_at=when,
            created_at=when,
            updated_at=when,
            has_missing_results=True,
            seen_own_event=True,
        )
        for i in range(limits.max_orders_per_transaction)
    ]
    ids = ("id", "provider_status", "initial_order_id", "redraw_order_id", "current_order_id")
    return TransactionView(
        status=TransactionStatus.ACTIVE,
        orders=orders,
        **{name: longest(9999) for name in ids},
        **{name: longest(9999) for name in ("user_id", "team_id", "client_user_id")},
        created_at=when,
        updated_at=when,
    )


@pytest.mark.parametrize("text", ["x", "\U0001d11e"], ids=["ascii", "4-byte characters"])
def test_the_largest_transaction_the_limits_allow_fits_a_grpc_message_with_room(text: str) -> None:
    view = largest_view(text)
    change = pb.TransactionChange(
        revision=2**62,
        kinds=list(pb.ChangeKind.values())[1:],
        transaction=transaction_to_pb(view, 2**62),
        order_id=view.orders[0].id,
        event_id="e" * 256,
    )
    wire = pb.WatchTransactionsResponse(change=change).ByteSize()
    # Even with every character taking 4 bytes, a change is under half of gRPC's 4 MiB default.
    assert wire < (4 << 20) // 2
    # The view-size limit is measured on the JSON, which is never smaller than the wire form,
    # so a view within it is at most a quarter of the message limit.
    assert wire < len(view_to_json(view).encode())
    assert DEFAULT_LIMITS.max_view_bytes <= (4 << 20) // 4
    if text == "x":  # ordinary text at the string and order limits is within the view limit too
        assert len(view_to_json(view).encode()) < DEFAULT_LIMITS.max_view_bytes


def test_the_struct_conversion_gives_what_json_format_gives(scenario: dict[str, Any]) -> None:
    for d in scenario["deliveries"]:
        message = struct(d["body"])
        assert struct_to_dict(message) == json_format.MessageToDict(message)


def struct_request_bytes(depth: int) -> bytes:
    """An IngestEventRequest whose payload Struct nests `depth` levels, built on the wire: the
    protobuf library refuses to build one deeper than it can parse."""

    def varint(n: int) -> bytes:
        out = bytearray()
        while n > 0x7F:
            out.append(n & 0x7F | 0x80)
            n >>= 7
        return bytes([*out, n])

    def field(number: int, payload: bytes) -> bytes:  # a length-delimited field
        return varint(number << 3 | 2) + varint(len(payload)) + payload

    value = field(3, b"x")  # Value.string_value
    for _ in range(depth - 1):
        value = field(5, field(1, field(1, b"a") + field(2, value)))  # Value.struct_value {a: ...}
    body = struct({"event_type": "labtest.result.critical"}).SerializeToString()
    return field(1, b"deep") + field(2, body + field(1, field(1, b"a") + field(2, value)))


@pytest.mark.parametrize("depth", [MAX_BODY_DEPTH + 2, MAX_BODY_DEPTH + 3, 200, 5000])
async def test_a_struct_nested_deeper_than_protobuf_decodes_is_invalid_argument(
    api: Running, depth: int
) -> None:
    before = api.counts()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{api.service.port}") as channel:
        call = channel.unary_unary(
            "/transactions.v1.TransactionService/IngestEvent",
            request_serializer=lambda raw: raw,
            response_deserializer=pb.IngestEventResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(struct_request_bytes(depth))
    assert_invalid_argument(caught.value, "payload", f"{MAX_BODY_DEPTH} levels")
    assert "Error" not in caught.value.details()  # no Python exception text
    assert api.counts() == before


async def test_a_message_that_is_not_protobuf_is_invalid_argument(api: Running) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{api.service.port}") as channel:
        call = channel.unary_unary(
            "/transactions.v1.TransactionService/GetTransaction",
            request_serializer=lambda raw: raw,
            response_deserializer=pb.GetTransactionResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(b"\xff\xff\xff")
    assert_invalid_argument(caught.value, "", "GetTransactionRequest")


async def test_echoed_input_is_quoted_and_truncated(api: Running) -> None:
    hostile = "line one\nline two " + "x" * 5000
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.stub.IngestEvent(
            pb.IngestEventRequest(
                event_id="e", payload=struct(order_body(has_missing_results=hostile))
            )
        )
    details = caught.value.details()
    assert_invalid_argument(
        caught.value, "payload.data.has_missing_results", "'line one\\nline two x"
    )
    assert "\n" not in details
    assert len(details) < 300


def assert_invalid_argument(error: grpc.aio.AioRpcError, field: str, words: str) -> None:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in error.details()
    assert field in violated_fields(error)


async def test_reusing_an_event_id_with_another_body_is_already_exists(api: Running) -> None:
    d = SCENARIOS[0]["deliveries"]
    await ingest(api, "msg_x", d[0]["body"])
    before = api.counts()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ingest(api, "msg_x", d[1]["body"])
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "msg_x" in caught.value.details()
    assert api.counts() == before


async def test_message_over_the_grpc_limit_is_resource_exhausted(tmp_path: Path) -> None:
    settings = loopback_settings(tmp_path / "x.db", max_message_bytes=100_000)
    service = TransactionService(settings)
    port = await service.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TransactionServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.IngestEvent(
                    pb.IngestEventRequest(event_id="e", payload_json="x" * 200_000)
                )
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await service.stop()


# -- lookups ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (pb.GetTransactionRequest(), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.GetTransactionRequest(order_id=""), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.GetTransactionRequest(order_id=" \t"), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.GetTransactionRequest(transaction_id="   "), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.GetTransactionRequest(transaction_id="nope"), grpc.StatusCode.NOT_FOUND),
        (pb.GetTransactionRequest(order_id="nope"), grpc.StatusCode.NOT_FOUND),
    ],
)
async def test_get_errors(
    api: Running, request_: pb.GetTransactionRequest, code: grpc.StatusCode
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.stub.GetTransaction(request_)
    assert caught.value.code() == code
    if code == grpc.StatusCode.NOT_FOUND:
        assert "nope" in caught.value.details()
    else:
        lookup = request_.WhichOneof("lookup") or "lookup"
        assert_invalid_argument(caught.value, lookup, "")


@pytest.mark.parametrize("dots", [".", ".."])
@pytest.mark.parametrize("lookup", ["transaction_id", "order_id"])
async def test_lookups_of_dot_segment_ids_are_invalid_argument_naming_the_field(
    api: Running, lookup: str, dots: str
) -> None:
    """Issue 16, item 7: `.` and `..` are refused by every lookup, alike on both stores (no such
    id is ever stored; as a path segment of a Junction API request it names another path)."""
    ids = {lookup: dots}
    unary = [
        (api.stub.GetTransaction, pb.GetTransactionRequest(**ids)),
        (api.stub.ReconcileTransaction, pb.ReconcileTransactionRequest(**ids)),
        (api.stub.GetTransactionResults, pb.GetTransactionResultsRequest(**ids)),
        (api.stub.ListTransactionEvents, pb.ListTransactionEventsRequest(**ids)),
    ]
    for call, request_ in unary:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(request_)  # type: ignore[operator]
        assert_invalid_argument(caught.value, lookup, "must not be `.` or `..`")
    streams = [
        (api.stub.GetTransactionResultsPdf, pb.GetTransactionResultsPdfRequest(**ids)),
        (api.stub.WatchTransaction, pb.WatchTransactionRequest(**ids)),
    ]
    for stream, request_ in streams:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stream(request_):  # type: ignore[operator]
                pass
        assert_invalid_argument(caught.value, lookup, "must not be `.` or `..`")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.stub.BatchGetTransactions(
            pb.BatchGetTransactionsRequest(lookups=[pb.GetTransactionRequest(**ids)])
        )
    assert_invalid_argument(caught.value, f"lookups[0].{lookup}", "must not be `.` or `..`")


@pytest.mark.parametrize(
    "request_",
    [
        pb.WatchTransactionRequest(order_id="  "),
        pb.WatchTransactionRequest(transaction_id="\n"),
    ],
)
async def test_watching_a_blank_id_is_invalid_argument(
    api: Running, request_: pb.WatchTransactionRequest
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.stub.WatchTransaction(request_).read()
    assert_invalid_argument(caught.value, request_.WhichOneof("lookup") or "", "non-space")


async def test_list_filters_and_pages_without_missing_anything(api: Running) -> None:
    runs = [with_fresh_ids(s) for s in SCENARIOS for _ in range(4)]
    for run in runs:
        for d in run["deliveries"]:
            await ingest(api, d["svix_id"], d["body"])

    async def all_pages(**filters: Any) -> list[pb.Transaction]:
        out, token = [], ""
        while True:
            page = await api.stub.ListTransactions(
                pb.ListTransactionsRequest(page_size=5, page_token=token, **filters)
            )
            assert len(page.transactions) <= 5
            out += page.transactions
            token = page.next_page_token
            if not token:
                return out

    everything = await all_pages()
    assert {t.id for t in everything} == {r["expect"]["transaction_id"] for r in runs}
    assert [t.revision for t in everything] == sorted(t.revision for t in everything)
    completed = await all_pages(status=pb.TRANSACTION_STATUS_COMPLETED)
    assert {t.id for t in completed} == {
        r["expect"]["transaction_id"] for r in runs if r["expect"]["status"].endswith("COMPLETED")
    }
    team = SCENARIOS[0]["deliveries"][0]["body"]["team_id"]
    assert len(await all_pages(team_id=team)) == sum(
        1 for r in runs if r["deliveries"][0]["body"]["team_id"] == team
    )
    assert await all_pages(user_id="nobody") == []
    since = timestamp_pb2.Timestamp()
    since.FromJsonString("2026-03-06T00:00:00Z")
    recent = await all_pages(updated_since=since)
    assert recent
    assert all(t.updated_at.ToJsonString() >= "2026-03-06" for t in recent)


async def test_list_paging_sees_a_transaction_changed_while_paging(api: Running) -> None:
    s = next(s for s in SCENARIOS if s["scenario"] == "redraw_completed")
    runs = [with_fresh_ids(s) for _ in range(3)]
    for run in runs:
        await ingest(api, run["deliveries"][0]["svix_id"], run["deliveries"][0]["body"])
    first = await api.stub.ListTransactions(pb.ListTransactionsRequest(page_size=1))
    # The transaction on the first page changes: it moves behind the others, not out of sight.
    d = runs[0]["deliveries"][2]
    await ingest(api, d["svix_id"], d["body"])
    rest = await api.stub.ListTransactions(
        pb.ListTransactionsRequest(page_size=10, page_token=first.next_page_token)
    )
    assert [t.id for t in rest.transactions][-1] == runs[0]["expect"]["transaction_id"]


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.ListTransactionsRequest(page_size=-1), "page_size"),
        (pb.ListTransactionsRequest(page_size=501), "page_size"),
        (pb.ListTransactionsRequest(page_token="garbage!"), "page_token"),
        (pb.ListTransactionsRequest(status=42), "status"),
        (
            pb.ListTransactionsRequest(updated_since=timestamp_pb2.Timestamp(seconds=-(10**15))),
            "updated_since",
        ),
        (
            pb.ListTransactionsRequest(updated_since=timestamp_pb2.Timestamp(seconds=10**15)),
            "updated_since",
        ),
        (
            pb.ListTransactionsRequest(updated_since=timestamp_pb2.Timestamp(nanos=-5)),
            "updated_since",
        ),
    ],
)
async def test_list_rejects_bad_arguments(
    api: Running, request_: pb.ListTransactionsRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.stub.ListTransactions(request_)
    assert_invalid_argument(caught.value, field, field)


def with_position(token: str, after: Any) -> str:
    """A page token as the service issues it, continuing after another position (a forgery)."""
    data = json.loads(base64.urlsafe_b64decode(token.encode()))
    data["after"] = after
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode()


@pytest.mark.parametrize(
    "after", [2**63, 2**64 + 5, 10**30, True, -1, 1.5], ids=lambda v: f"after={v!r}"
)
async def test_page_tokens_out_of_range_are_invalid_argument_on_every_list(
    api: Running, after: Any
) -> None:
    """Issue 16, item 7: a page token's position past 2^63 gave INTERNAL (SQLite) or
    UNAVAILABLE (PostgreSQL). Now INVALID_ARGUMENT naming page_token on both stores, on
    ListTransactions and ListTransactionEvents; the largest position still works."""
    run = with_fresh_ids(SCENARIOS[0])
    for d in run["deliveries"]:
        await ingest(api, d["svix_id"], d["body"])
    await ingest(api, "other", with_fresh_ids(SCENARIOS[0])["deliveries"][0]["body"])
    transaction_id = run["expect"]["transaction_id"]
    listed = await api.stub.ListTransactions(pb.ListTransactionsRequest(page_size=1))
    history = await api.stub.ListTransactionEvents(
        pb.ListTransactionEventsRequest(transaction_id=transaction_id, page_size=1)
    )
    assert listed.next_page_token
    assert history.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.stub.ListTransactions(
            pb.ListTransactionsRequest(
                page_size=1, page_token=with_position(listed.next_page_token, after)
            )
        )
    assert_invalid_argument(caught.value, "page_token", "not a page token issued")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.stub.ListTransactionEvents(
            pb.ListTransactionEventsRequest(
                transaction_id=transaction_id,
                page_size=1,
                page_token=with_position(history.next_page_token, after),
            )
        )
    assert_invalid_argument(caught.value, "page_token", "not a page token issued")
    # The largest position either store holds: an empty last page.
    last = 2**63 - 1
    page = await api.stub.ListTransactions(
        pb.ListTransactionsRequest(page_token=with_position(listed.next_page_token, last))
    )
    assert (list(page.transactions), page.next_page_token) == ([], "")
    events = await api.stub.ListTransactionEvents(
        pb.ListTransactionEventsRequest(
            transaction_id=transaction_id,
            page_size=1,
            page_token=with_position(history.next_page_token, last),
        )
    )
    assert (list(events.events), events.next_page_token) == ([], "")


@pytest.mark.parametrize(
    "payload",
    [b"[" * 100_000, b'{"after": 1, "filter": ' + b"[" * 200 + b"]" * 200 + b"}", b"A" * 4096],
    ids=["nested", "nested-filter", "long"],
)
async def test_forged_page_tokens_of_any_shape_are_invalid_argument(
    api: Running, payload: bytes
) -> None:
    """A token of nested brackets made json.loads raise RecursionError: INTERNAL on both lists.
    Tokens longer than any the service issues are refused before they are decoded."""
    run = with_fresh_ids(SCENARIOS[0])
    for d in run["deliveries"]:
        await ingest(api, d["svix_id"], d["body"])
    token = base64.urlsafe_b64encode(payload).decode()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.stub.ListTransactions(pb.ListTransactionsRequest(page_token=token))
    assert_invalid_argument(caught.value, "page_token", "not a page token issued")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.stub.ListTransactionEvents(
            pb.ListTransactionEventsRequest(
                transaction_id=run["expect"]["transaction_id"], page_token=token
            )
        )
    assert_invalid_argument(caught.value, "page_token", "not a page token issued")


async def test_a_page_token_only_works_with_its_own_filters(api: Running) -> None:
    for run in [with_fresh_ids(SCENARIOS[0]) for _ in range(3)]:
        await ingest(api, run["deliveries"][0]["svix_id"], run["deliveries"][0]["body"])
    page = await api.stub.ListTransactions(pb.ListTransactionsRequest(page_size=1))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.stub.ListTransactions(
            pb.ListTransactionsRequest(page_size=1, page_token=page.next_page_token, team_id="t")
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "other filters" in caught.value.details()


# -- lifecycle ----------------------------------------------------------------------------------


def _stopping_service(tmp_path: Path) -> TransactionService:
    # A grace no busy machine reaches: what these tests hold open is released by the test.
    return TransactionService(loopback_settings(tmp_path / "x.db", shutdown_grace_seconds=120))


def _ingest_requests(count: int) -> list[pb.IngestEventRequest]:
    deliveries = [d for _ in range(count) for d in with_fresh_ids(SCENARIOS[0])["deliveries"]]
    return [
        pb.IngestEventRequest(event_id=d["svix_id"], payload_json=json.dumps(d["body"]))
        for d in deliveries[:count]
    ]


async def _settled(calls: list[Any]) -> list[Any]:
    return await asyncio.gather(*calls, return_exceptions=True)


def _code(result: Any) -> str:
    """'OK', or the code of an error and its ErrorInfo reason, if it has one."""
    if not isinstance(result, grpc.RpcError):
        return "OK"
    try:
        reason = error_info(result).reason
    except AssertionError:  # no rich status: gRPC's own error, not the service's
        reason = "-"
    return f"{result.code().name} {reason}"


def _codes(results: list[Any]) -> list[str]:
    return [_code(r) for r in results]


async def _until(condition: Any, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + 120
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.01)


async def test_stopping_answers_in_flight_ingests_and_refuses_new_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Calls in flight when the stop begins are answered; calls arriving while the server drains
    are refused UNAVAILABLE (SHUTTING_DOWN), never CANCELLED. No timing is assumed: commits are
    held until the test has seen what happens meanwhile."""
    service = _stopping_service(tmp_path)
    port = await service.start()
    held = asyncio.Event()
    write = service.store.write

    async def held_write(*args: Any) -> Any:
        await held.wait()
        return await write(*args)

    monkeypatch.setattr(service.store, "write", held_write)
    taken: list[object] = []
    ingest_one = service.ingestor.ingest

    async def counted_ingest(*args: Any, **kwargs: Any) -> Any:
        taken.append(args)
        return await ingest_one(*args, **kwargs)

    monkeypatch.setattr(service.ingestor, "ingest", counted_ingest)
    stopping: asyncio.Task[None] | None = None
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TransactionServiceStub(channel)
            in_flight = [stub.IngestEvent(r) for r in _ingest_requests(30)]
            # The service has taken all 30 in (their commits are held).
            await _until(lambda: len(taken) == 30, "30 calls taken in")
            stopping = asyncio.create_task(service.stop())
            await _until(lambda: service.app.stopping, "the drain to begin")
            # Arriving during the drain, which the held commits keep open: refused at once.
            late = await _settled([stub.IngestEvent(r, timeout=120) for r in _ingest_requests(30)])
            assert set(_codes(late)) == {"UNAVAILABLE SHUTTING_DOWN"}, _codes(late)
            assert not stopping.done()
            held.set()
            await stopping
            results = await _settled(in_flight)
    finally:
        held.set()
        if stopping is None:
            await service.stop()
    # In flight: committed and acknowledged.
    assert set(_codes(results)) == {"OK"}, _codes(results)
    acknowledged = [r for r in results if isinstance(r, pb.IngestEventResponse)]
    # Every acknowledged event is in the store after the stop.
    with sqlite3.connect(tmp_path / "x.db") as conn:
        stored = {row[0] for row in conn.execute("SELECT event_id FROM events")}
    assert {r.event_id for r in acknowledged} <= stored


async def test_calls_waiting_in_grpc_core_keep_the_drain_open_and_are_answered(
    tmp_path: Path,
) -> None:
    """On a busy machine calls reach gRPC's core well before the event loop picks them up, and
    gRPC's stop cancels those it has not handed over. The event loop is held here while 30 calls
    arrive in the core and for longer than the drain's quiet period: the drain still counts
    them as not done (a quiet period alone would have let the stop cancel them), and once the
    loop is free each is answered, none CANCELLED."""
    service = _stopping_service(tmp_path)
    port = await service.start()
    results: list[str] = []

    def client() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TransactionServiceStub(channel)
            futures = [stub.IngestEvent.future(r, timeout=120) for r in _ingest_requests(30)]
            for future in futures:
                try:
                    results.append(_code(future.result()))
                except grpc.RpcError as exc:
                    results.append(_code(exc))

    sender = threading.Thread(target=client)
    try:
        sender.start()
        # The event loop is busy (blocked here) while the calls arrive in gRPC's core.
        deadline = time.monotonic() + 120
        while (
            service.arrivals.unfinished() != 30
            or time.monotonic() - service.arrivals.last < QUIET_SECONDS
        ):
            assert time.monotonic() < deadline, "30 calls in gRPC's core"
            time.sleep(0.01)  # noqa: ASYNC251 (holding the event loop is the point)
        assert not await service.arrivals.drained(limit=0)
    finally:
        await service.stop()
        await asyncio.to_thread(sender.join)
    assert len(results) == 30
    assert set(results) <= {"OK", "UNAVAILABLE SHUTTING_DOWN"}, results


async def test_stopping_ends_an_ingest_stream_waiting_for_its_next_request(tmp_path: Path) -> None:
    """A client's IngestEvents stream with nothing to send keeps it open. The stop ends it with
    SHUTTING_DOWN and the count answered, rather than holding the drain until the grace runs out
    and then cutting it off (before: UNAVAILABLE "Cancelling all calls", after the whole grace)."""
    service = _stopping_service(tmp_path)
    port = await service.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stream = pb_grpc.TransactionServiceStub(channel).IngestEvents()
        await stream.write(_ingest_requests(1)[0])
        assert (await stream.read()).outcome == pb.INGEST_OUTCOME_APPLIED
        await service.stop()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stream.read()
    assert _code(caught.value) == "UNAVAILABLE SHUTTING_DOWN"
    assert error_info(caught.value).metadata["answered"] == "1"


async def test_a_store_failure_is_unavailable_and_the_event_is_not_acknowledged(
    api: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(keys: Any, plan: Any) -> Any:
        raise OSError("disk full")

    monkeypatch.setattr(api.service.store, "write", broken)
    d = SCENARIOS[0]["deliveries"][0]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ingest(api, d["svix_id"], d["body"])
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "was not stored" in caught.value.details()
    assert "disk full" not in caught.value.details()
    monkeypatch.undo()
    # After the fault clears, the retry is applied as new.
    assert (await ingest(api, d["svix_id"], d["body"])).outcome == pb.INGEST_OUTCOME_APPLIED
