"""The ingest use case on the real SQLite store: dedupe, merge, persist, change log."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import SCENARIOS, database
from tests.pg import table_rows
from tests.scenario_tools import expected_summary, view_summary, with_fresh_ids
from transaction_service.domain.payload import PayloadError
from transaction_service.junction.mapping import EVENT_ID_PREFIX as API_EVENT_ID_PREFIX
from transaction_service.store.base import Store
from transaction_service.store.postgres import PostgresStore
from transaction_service.store.sqlite import SqliteStore
from transaction_service.usecases.commit import CommitPath
from transaction_service.usecases.ingest import (
    DERIVED_EVENT_ID_PREFIX,
    RESERVED_EVENT_ID_PREFIXES,
    EventIdConflict,
    Ingestor,
    IngestResult,
    Outcome,
    decode_delivery,
)
from transaction_service.usecases.plan import REBUILD_EVENT_PREFIX
from transaction_service.usecases.results import RESULTS_EVENT_PREFIX

LIMIT = 1 << 20


class Harness:
    """The ingest use case on a real store: a SQLite file, or a PostgreSQL URL."""

    def __init__(self, db: Path | str) -> None:
        self.db = str(db)
        if self.db.startswith("postgresql://"):
            self.store: Store = PostgresStore(self.db, pool_size=4)
        else:
            # NORMAL: these tests are about logic, not fsync; durability has its own test.
            self.store = SqliteStore(db, synchronous="NORMAL")
        self.ingestor = Ingestor(CommitPath(self.store))

    async def __aenter__(self) -> Harness:
        await self.store.open()
        self.ingestor.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ingestor.stop()
        await self.store.close()

    async def send(self, event_id: str, body: dict[str, Any], *, raw: bool = False) -> IngestResult:
        if raw:
            delivery = decode_delivery(
                event_id, payload_json=json.dumps(body), max_body_bytes=LIMIT
            )
        else:
            delivery = decode_delivery(event_id, payload=body, max_body_bytes=LIMIT)
        return await self.ingestor.ingest(delivery)

    def rows(self, table: str) -> list[dict[str, Any]]:
        """Every row of a table, in insertion order where the table has one."""
        order = {"events": "seq", "changes": "revision"}.get(table)
        sql = f"SELECT * FROM {table}" + (f" ORDER BY {order}" if order else "")
        if self.db.startswith("postgresql://"):
            return table_rows(self.db, sql)
        with sqlite3.connect(self.db) as conn:
            conn.row_factory = sqlite3.Row
            return [dict(row) for row in conn.execute(sql)]


@pytest.fixture
async def harness(tmp_path: Path, store_kind: str) -> AsyncIterator[Harness]:
    with database(store_kind, tmp_path) as db:
        async with Harness(db) as h:
            yield h


async def test_revisions_increase_strictly_and_the_change_log_holds_every_change(
    harness: Harness,
) -> None:
    revisions = []
    for scenario in SCENARIOS:
        for d in scenario["deliveries"]:
            result = await harness.send(d["svix_id"], d["body"])
            if result.outcome == Outcome.APPLIED:
                revisions.append(result.revision)
    assert revisions == sorted(set(revisions))
    changes = harness.rows("changes")
    assert [c["revision"] for c in changes] == revisions
    assert await harness.store.head_revision() == revisions[-1]
    # The log records the state after each change, and which event made it.
    last = json.loads(changes[-1]["view"])
    assert last["id"] == SCENARIOS[-1]["expect"]["transaction_id"]


async def test_a_resend_under_a_new_id_is_stale_and_recorded(harness: Harness) -> None:
    scenario = SCENARIOS[0]
    for d in scenario["deliveries"]:
        await harness.send(d["svix_id"], d["body"])
    head = await harness.store.head_revision()
    resend = await harness.send("msg_resend", scenario["deliveries"][-1]["body"])
    assert resend.outcome == Outcome.STALE
    assert resend.revision == 0
    assert resend.transaction is not None
    assert resend.transaction.view.id == scenario["expect"]["transaction_id"]
    assert await harness.store.head_revision() == head
    assert [r["outcome"] for r in harness.rows("events") if r["event_id"] == "msg_resend"] == [
        "stale"
    ]


async def test_retries_are_counted_on_their_delivery_even_within_its_commit(
    harness: Harness,
) -> None:
    """A delivery and two retries sent together (one commit): one row, the retries counted on
    it with the time; a later retry counts on; the answers are unchanged (DUPLICATE)."""
    d = with_fresh_ids(SCENARIOS[0])["deliveries"][0]
    results = await asyncio.gather(*(harness.send(d["svix_id"], d["body"]) for _ in range(3)))
    assert sorted(r.outcome for r in results) == [
        Outcome.APPLIED,
        Outcome.DUPLICATE,
        Outcome.DUPLICATE,
    ]
    (row,) = harness.rows("events")
    assert row["duplicates"] == 2
    assert row["last_duplicate_at"] is not None
    again = await harness.send(d["svix_id"], d["body"], raw=True)
    assert again.outcome == Outcome.DUPLICATE
    assert again.transaction == results[0].transaction
    (row,) = harness.rows("events")
    assert row["duplicates"] == 3


async def test_an_old_update_arriving_late_is_stale(harness: Harness) -> None:
    s = next(s for s in SCENARIOS if s["scenario"] == "completed_without_redraw")
    newest, middle = s["deliveries"][2], s["deliveries"][1]
    await harness.send(newest["svix_id"], newest["body"])
    late = await harness.send(middle["svix_id"], middle["body"])
    assert late.outcome == Outcome.STALE


async def test_empty_event_id_is_derived_from_the_body_in_either_form(harness: Harness) -> None:
    body = SCENARIOS[0]["deliveries"][0]["body"]
    first = await harness.send("", body)
    assert first.outcome == Outcome.APPLIED
    assert first.event_id.startswith("sha256:")
    again = await harness.send("", body, raw=True)
    assert again.outcome == Outcome.DUPLICATE
    assert again.event_id == first.event_id


def test_the_reserved_event_id_prefixes_cover_every_id_the_service_makes_itself() -> None:
    """Issue 16, item 6: callers (gRPC, webhooks) may not take the prefixes of the service's own
    records; Junction API answers (source `api`, the reconcile's) keep them."""
    made = [
        API_EVENT_ID_PREFIX + "0" * 64,
        RESULTS_EVENT_PREFIX + "0" * 64,
        REBUILD_EVENT_PREFIX + "2026-12-07T00:00:00",
    ]
    body = SCENARIOS[0]["deliveries"][0]["body"]
    for event_id in made:
        assert event_id.startswith(RESERVED_EVENT_ID_PREFIXES)
        for source in ("grpc", "webhook"):
            with pytest.raises(PayloadError) as caught:
                decode_delivery(event_id, payload=body, max_body_bytes=LIMIT, source=source)
            assert [v.field for v in caught.value.violations] == ["event_id"]
    api = decode_delivery(made[0], payload=body, max_body_bytes=LIMIT, source="api")
    assert api.event_id == made[0]
    # An id the service derives: accepted back with its own body only.
    derived = decode_delivery("", payload=body, max_body_bytes=LIMIT).event_id
    assert derived.startswith(DERIVED_EVENT_ID_PREFIX)
    quoted = decode_delivery(derived, payload_json=json.dumps(body), max_body_bytes=LIMIT)
    assert quoted.event_id == derived
    other = SCENARIOS[0]["deliveries"][1]["body"]
    with pytest.raises(PayloadError):
        decode_delivery(derived, payload=other, max_body_bytes=LIMIT)


async def test_reusing_an_event_id_for_another_body_is_refused_and_stores_nothing(
    harness: Harness,
) -> None:
    d0, d1 = SCENARIOS[0]["deliveries"][:2]
    await harness.send("msg_same", d0["body"])
    before = (harness.rows("events"), harness.rows("transactions"), harness.rows("changes"))
    with pytest.raises(EventIdConflict):
        await harness.send("msg_same", d1["body"])
    after = (harness.rows("events"), harness.rows("transactions"), harness.rows("changes"))
    assert before == after


async def test_other_event_types_are_recorded_and_ignored(harness: Harness) -> None:
    body = {
        "event_type": "labtest.appointment.updated",
        "data": {"order_id": "o1", "order_transaction_id": "t1"},
    }
    result = await harness.send("msg_appt", body)
    assert result.outcome == Outcome.IGNORED
    assert result.transaction is None
    assert harness.rows("transactions") == []
    assert [r["event_type"] for r in harness.rows("events")] == ["labtest.appointment.updated"]


async def test_raw_bodies_are_kept_byte_for_byte(harness: Harness) -> None:
    raw = json.dumps(SCENARIOS[0]["deliveries"][0]["body"], indent=3) + "\n"
    delivery = decode_delivery("msg_raw", payload_json=raw, max_body_bytes=LIMIT)
    await harness.ingestor.ingest(delivery)
    (row,) = harness.rows("events")
    assert row["body"] == raw.encode()
    assert row["body_format"] == "json"


async def test_concurrent_deliveries_share_commits_and_all_land(harness: Harness) -> None:
    runs = [with_fresh_ids(s) for s in SCENARIOS for _ in range(20)]
    deliveries = [d for run in runs for d in run["deliveries"]]
    results = await asyncio.gather(*(harness.send(d["svix_id"], d["body"]) for d in deliveries))
    assert all(r.outcome in (Outcome.APPLIED, Outcome.STALE) for r in results)
    for run in runs:
        snapshot, _ = await harness.store.get(run["expect"]["transaction_id"])
        assert snapshot is not None
        assert view_summary(snapshot.view) == expected_summary(run)
    assert len(harness.rows("events")) == len(deliveries)


async def test_state_survives_reopening_the_store(tmp_path: Path, store_kind: str) -> None:
    scenario = SCENARIOS[-1]
    with database(store_kind, tmp_path) as db:
        async with Harness(db) as h:
            for d in scenario["deliveries"]:
                await h.send(d["svix_id"], d["body"])
            before = await h.store.get(scenario["expect"]["transaction_id"])
        async with Harness(db) as h:
            assert await h.store.get(scenario["expect"]["transaction_id"]) == before
            again = await h.send(
                scenario["deliveries"][0]["svix_id"], scenario["deliveries"][0]["body"]
            )
            assert again.outcome == Outcome.DUPLICATE


# -- legacy payloads -----------------------------------------------------------------------------


def legacy_variant(body: dict[str, Any]) -> dict[str, Any]:
    legacy = copy.deepcopy(body)
    del legacy["data"]["order_transaction"]
    legacy["data"].pop("origin", None)
    return legacy


@pytest.mark.parametrize("legacy_first", [True, False])
async def test_a_legacy_order_joins_its_real_transaction_whatever_came_first(
    harness: Harness, legacy_first: bool
) -> None:
    s = next(s for s in SCENARIOS if s["scenario"] == "completed_without_redraw")
    early, late = s["deliveries"][0], s["deliveries"][2]
    old = ("msg_legacy", legacy_variant(early["body"]))
    new = (late["svix_id"], late["body"])
    for event_id, body in [old, new] if legacy_first else [new, old]:
        await harness.send(event_id, body)
    order_id = s["expect"]["initial_order_id"]
    snapshot, _ = await harness.store.get_by_order(order_id)
    assert snapshot is not None
    assert snapshot.view.id == s["expect"]["transaction_id"]
    assert not snapshot.view.legacy
    assert view_summary(snapshot.view) == expected_summary(s)
    # The stand-in transaction is gone: one transaction, found by either id.
    assert [r["id"] for r in harness.rows("transactions")] == [s["expect"]["transaction_id"]]
    assert (await harness.store.get(order_id))[0] is None


async def test_a_legacy_order_alone_is_readable_by_its_order_id(harness: Harness) -> None:
    s = next(s for s in SCENARIOS if s["scenario"] == "cancelled")
    legacy = legacy_variant(s["deliveries"][-1]["body"])
    result = await harness.send("msg_legacy_only", legacy)
    assert result.outcome == Outcome.APPLIED
    order_id = s["expect"]["initial_order_id"]
    snapshot, _ = await harness.store.get_by_order(order_id)
    assert snapshot is not None
    assert snapshot.view.legacy
    assert snapshot.view.id == order_id
    assert snapshot.view.status.value == "cancelled"


async def test_a_refused_delivery_leaves_no_trace_and_its_batch_commits(
    harness: Harness,
) -> None:
    """Deliveries queued together share one commit; one of them refused (an event id reused
    with another body) is answered with its error and the rest are applied."""
    scenario = with_fresh_ids(SCENARIOS[0])
    good = [
        decode_delivery(d["svix_id"], payload=d["body"], max_body_bytes=LIMIT)
        for d in scenario["deliveries"]
    ]
    other_body = copy.deepcopy(scenario["deliveries"][1]["body"])
    conflicting = decode_delivery(good[0].event_id, payload=other_body, max_body_bytes=LIMIT)
    results = await asyncio.gather(
        harness.ingestor.ingest(good[0]),
        harness.ingestor.ingest(conflicting),
        *(harness.ingestor.ingest(d) for d in good[1:]),
        return_exceptions=True,
    )
    assert isinstance(results[1], EventIdConflict)
    assert results[0].outcome == Outcome.APPLIED  # type: ignore[union-attr]
    assert [r["event_id"] for r in harness.rows("events")] == [d.event_id for d in good]
    assert harness.rows("events")[0]["digest"] == good[0].event.digest


# -- fuzzing: no body crashes the service -----------------------------------------------------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
    | st.sampled_from(["2026-03-01T10:00:00Z", "2026-03-01T10:00:00.123456+02:00", "", "a.b.c"]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside a JSON document."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, child in value.items():
            out += paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            out += paths(child, (*prefix, i))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_bodies_are_applied_or_refused_never_crash(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    """Replace values anywhere in real bodies with arbitrary JSON: each delivery is either
    refused with field violations (before the store) or applied; nothing else happens."""
    run = with_fresh_ids(data.draw(st.sampled_from(SCENARIOS), label="scenario"))
    bodies = [copy.deepcopy(d["body"]) for d in run["deliveries"]]
    for body in bodies:
        for _ in range(data.draw(st.integers(0, 3), label="mutations")):
            path = data.draw(st.sampled_from(paths(body)), label="path")
            node = body
            for key in path[:-1]:
                node = node[key]
            if data.draw(st.booleans(), label="delete"):
                del node[path[-1]]
            else:
                node[path[-1]] = data.draw(JSON_VALUES, label="value")

    async def ingest_all() -> None:
        async with Harness(tmp_path_factory.mktemp("fuzz") / "fuzz.db") as h:
            for i, body in enumerate(bodies):
                as_json = data.draw(st.booleans(), label="as_json")
                try:
                    if as_json:
                        delivery = decode_delivery(
                            f"e{i}", payload_json=json.dumps(body), max_body_bytes=LIMIT
                        )
                    else:
                        delivery = decode_delivery(f"e{i}", payload=body, max_body_bytes=LIMIT)
                except PayloadError as exc:
                    refused = exc.violations
                else:
                    refused = []
                if refused:
                    assert all(v.description for v in refused)
                    continue
                result = await h.ingestor.ingest(delivery)
                assert result.outcome in (Outcome.APPLIED, Outcome.STALE, Outcome.IGNORED)

    asyncio.run(ingest_all())


# -- body retention ------------------------------------------------------------------------------


async def test_erased_bodies_keep_dedupe_and_the_audit_trail(harness: Harness) -> None:
    """After the body retention, bodies are gone but each event's id, digest, outcome and
    revision stay: a retry is still a DUPLICATE and a reused id still a conflict."""
    run = with_fresh_ids(SCENARIOS[0])
    d0, d1 = run["deliveries"][:2]
    first = await harness.send(d0["svix_id"], d0["body"])
    erased = await harness.store.erase_bodies(datetime.now(UTC) + timedelta(hours=1))
    assert erased == 1
    (row,) = harness.rows("events")
    assert row["body"] is None
    assert (row["outcome"], row["revision"], row["digest"]) == (
        "applied",
        first.revision,
        first_digest(d0["body"]),
    )
    assert (await harness.send(d0["svix_id"], d0["body"])).outcome == Outcome.DUPLICATE
    with pytest.raises(EventIdConflict):
        await harness.send(d0["svix_id"], d1["body"])
    # Nothing newer than the cutoff is touched.
    await harness.send(d1["svix_id"], d1["body"])
    assert await harness.store.erase_bodies(datetime.now(UTC) - timedelta(hours=1)) == 0
    assert [r["body"] is None for r in harness.rows("events")] == [True, False]


def first_digest(body: dict[str, Any]) -> str:
    return decode_delivery("x", payload=body, max_body_bytes=LIMIT).event.digest


async def test_one_log_line_per_event_only_when_asked_for(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without log_events an ingested event writes no log line (the metrics count it); with it,
    one INFO line of transaction_service.events per event."""
    run = with_fresh_ids(SCENARIOS[0])
    for log_events, want in ((False, 0), (True, 1)):
        store = SqliteStore(tmp_path / f"{log_events}.db", synchronous="NORMAL")
        await store.open()
        ingestor = Ingestor(CommitPath(store), log_events=log_events)
        ingestor.start()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="transaction_service.events"):
            delivery = run["deliveries"][0]
            await ingestor.ingest(
                decode_delivery(delivery["svix_id"], payload=delivery["body"], max_body_bytes=LIMIT)
            )
        await ingestor.stop()
        await store.close()
        lines = [r for r in caplog.records if r.name == "transaction_service.events"]
        assert len(lines) == want
