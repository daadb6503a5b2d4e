"""The bulk paths: IngestEvents (order, flow control, per-event errors) and BatchGetTransactions,
in process on SQLite and PostgreSQL; the ordered window on its own."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.conftest import SCENARIOS, database
from tests.harness import Running, check_expect, loopback_settings, struct
from tests.scenario_tools import with_fresh_ids
from tests.test_security import (  # noqa: F401 (`started` is a fixture)
    INGEST_TOKEN,
    READ_TOKEN,
    bearer,
    settings_for,
    started,
)
from transaction_service.api.servicer import MAX_BATCH_LOOKUPS, MAX_DELIVERIES_PER_REQUEST
from transaction_service.api.window import OrderedWindow
from transaction_service.server import TransactionService
from transaction_service.store.base import AppliedBatch, BatchKeys, Planner
from transactions.v1 import transactions_pb2 as pb
from transactions.v1 import transactions_pb2_grpc as pb_grpc

WAIT = 30.0
APPLIED = pb.INGEST_OUTCOME_APPLIED
DUPLICATE = pb.INGEST_OUTCOME_DUPLICATE


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait for `condition` with a deadline (never a fixed sleep)."""
    try:
        async with asyncio.timeout(WAIT):
            while not condition():
                await asyncio.sleep(0.01)
    except TimeoutError:
        pytest.fail(f"timed out waiting until {what}")


def request(delivery: dict[str, Any], *, as_json: bool = True) -> pb.IngestEventRequest:
    if as_json:
        return pb.IngestEventRequest(
            event_id=delivery["svix_id"], payload_json=json.dumps(delivery["body"])
        )
    return pb.IngestEventRequest(event_id=delivery["svix_id"], payload=struct(delivery["body"]))


async def stream_of(requests: list[pb.IngestEventRequest]) -> AsyncIterator[pb.IngestEventRequest]:
    for item in requests:
        yield item


# -- the ordered window, without gRPC -------------------------------------------------------------


class CountingSource:
    """An async iterator of numbers that counts how many were pulled."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.pulled = 0

    def __aiter__(self) -> CountingSource:
        return self

    async def __anext__(self) -> int:
        if self.pulled == self.count:
            raise StopAsyncIteration
        self.pulled += 1
        return self.pulled - 1


async def test_window_answers_in_request_order_whatever_order_answers_finish() -> None:
    gates = {i: asyncio.Event() for i in range(20)}

    async def answer(i: int) -> int:
        await gates[i].wait()
        return i * 10

    window = OrderedWindow(CountingSource(20), answer, max_requests=20, max_bytes=1 << 20)
    taken: list[int] = []

    async def take() -> None:
        async for value in window.answers():
            taken.append(value)

    consumer = asyncio.create_task(take())
    for i in reversed(range(20)):  # the last request's answer is ready first
        gates[i].set()
    await consumer
    assert taken == [i * 10 for i in range(20)]


async def test_window_stops_reading_while_full_and_reads_one_more_per_answer_taken() -> None:
    source = CountingSource(100)
    gates = {i: asyncio.Event() for i in range(100)}

    async def answer(i: int) -> int:
        await gates[i].wait()
        return i

    window = OrderedWindow(source, answer, max_requests=8, max_bytes=1 << 20)
    answers = window.answers()
    first = asyncio.create_task(anext(answers))
    await until(lambda: source.pulled == 8, "the window is full")
    # Full, and nothing answered: the reader waits for room instead of reading.
    assert not window._room.is_set()
    assert source.pulled == 8
    assert window.in_flight == 8
    gates[0].set()
    assert await first == 0
    # Taking the next answer frees the first one's place: exactly one more request is read,
    # and no more while the second answer is not ready.
    second = asyncio.create_task(anext(answers))
    await until(lambda: source.pulled == 9, "one more request was read")
    assert window.in_flight == 8
    assert not window._room.is_set()
    for gate in gates.values():
        gate.set()
    assert await second == 1
    rest = [value async for value in answers]
    assert rest == list(range(2, 100))
    assert window.peak_in_flight == 8
    assert window.in_flight == 0


async def test_window_bounds_the_bytes_read_ahead_too() -> None:
    source = CountingSource(50)
    release = asyncio.Event()

    async def answer(i: int) -> int:
        await release.wait()
        return i

    window = OrderedWindow(source, answer, max_requests=1000, max_bytes=300, size=lambda _: 100)
    task = asyncio.create_task(anext(window.answers()))
    await until(lambda: source.pulled == 3, "300 bytes were read")
    assert window.in_flight_bytes == 300
    assert not window._room.is_set()
    release.set()
    assert await task == 0


async def test_window_stops_reading_when_told_and_answers_what_it_read() -> None:
    source = CountingSource(10)

    async def answer(i: int) -> int:
        return i

    window = OrderedWindow(
        source, answer, max_requests=100, max_bytes=1 << 20, keep_reading=lambda: source.pulled < 4
    )
    assert [v async for v in window.answers()] == [0, 1, 2, 3]
    assert window.stopped_early


# -- IngestEvents over gRPC, on each store --------------------------------------------------------


async def test_ingest_events_answers_each_request_in_order_after_its_commit(api: Running) -> None:
    """Several scenarios interleaved, retries and errors mixed in: one response per request, in
    request order; errors answered in the stream without ending it; the state as expected."""
    runs = [with_fresh_ids(s) for s in SCENARIOS]
    requests: list[pb.IngestEventRequest] = []
    expected: list[str] = []  # "applied/stale/ignored" | "duplicate" | "error:<code>"
    seen: set[str] = set()
    longest = max(len(r["deliveries"]) for r in runs)
    for i in range(longest):
        for r in runs:
            if i < len(r["deliveries"]):
                delivery = r["deliveries"][i]
                requests.append(request(delivery, as_json=i % 2 == 0))
                expected.append("ok")
                seen.add(delivery["svix_id"])
        # A retry of something sent before, and a bad body, between the good ones.
        first = runs[0]["deliveries"][0]
        requests.append(request(first))
        expected.append("duplicate")
        requests.append(pb.IngestEventRequest(event_id=f"bad-{i}", payload_json="{not json"))
        expected.append("error:INVALID_ARGUMENT")
    # The same id with another body: refused, the stream goes on.
    conflict = runs[1]["deliveries"][0]
    other_body = json.dumps({"event_type": "labtest.appointment.updated", "data": {}})
    requests.append(pb.IngestEventRequest(event_id=conflict["svix_id"], payload_json=other_body))
    expected.append("error:ALREADY_EXISTS")
    # A body without event_type, as a Struct: the field is named.
    requests.append(pb.IngestEventRequest(event_id="no-type", payload=struct({"data": {}})))
    expected.append("error:INVALID_ARGUMENT")
    requests.append(request(runs[2]["deliveries"][-1]))
    expected.append("duplicate")

    responses = [r async for r in api.stub.IngestEvents(stream_of(requests))]

    assert len(responses) == len(requests)
    revisions = []
    for sent, response, want in zip(requests, responses, expected, strict=True):
        if want.startswith("error:"):
            assert response.HasField("error"), (sent.event_id, response)
            code = grpc.StatusCode[want.removeprefix("error:")]
            assert response.error.code == code.value[0]
            assert response.outcome == pb.INGEST_OUTCOME_UNSPECIFIED
            assert response.event_id == sent.event_id
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                assert response.error.field_violations, response
        else:
            assert not response.HasField("error"), response
            assert response.event_id == sent.event_id
            if want == "duplicate":
                assert response.outcome == DUPLICATE
            else:
                assert response.outcome != DUPLICATE
            if response.outcome == APPLIED:
                revisions.append(response.revision)
    assert revisions == sorted(set(revisions))
    no_type = responses[expected.index("error:INVALID_ARGUMENT", len(expected) - 3)]
    assert [v.field for v in no_type.error.field_violations] == ["payload.event_type"]
    for r in runs:
        got = await api.stub.GetTransaction(
            pb.GetTransactionRequest(transaction_id=r["expect"]["transaction_id"])
        )
        check_expect(got.transaction, r["expect"])


async def test_an_undecodable_request_in_the_stream_is_answered_in_place(api: Running) -> None:
    """Raw bytes that are no IngestEventRequest: INVALID_ARGUMENT for that request only."""
    run = with_fresh_ids(SCENARIOS[0])
    good = [request(d).SerializeToString() for d in run["deliveries"]]
    raw = [good[0], b"\xff\xff\xff", *good[1:]]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{api.service.port}") as channel:
        call = channel.stream_stream(
            "/transactions.v1.TransactionService/IngestEvents",
            request_serializer=lambda raw: raw,
            response_deserializer=pb.IngestEventResponse.FromString,
        )
        responses = [r async for r in call(stream_of(raw))]  # type: ignore[arg-type]
    assert len(responses) == len(raw)
    assert responses[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "could not be decoded" in responses[1].error.message
    assert all(not r.HasField("error") for i, r in enumerate(responses) if i != 1)


async def test_requests_of_several_deliveries_are_answered_like_single_ones(api: Running) -> None:
    """The same deliveries, retries and refusals sent as requests of several deliveries, mixed
    with single requests: each delivery's result is the one it gets alone, in order, with its
    own error and field paths; the state comes out as expected."""
    runs = [with_fresh_ids(s) for s in SCENARIOS]
    singles = [
        request(d, as_json=k % 3 != 0)
        for k, d in enumerate(d for r in runs for d in r["deliveries"])
    ]
    bad = pb.IngestEventRequest(event_id="bad", payload=struct({"data": {}}))
    nested = pb.IngestEventRequest(deliveries=[singles[0]])
    conflict = pb.IngestEventRequest(
        event_id=singles[1].event_id,
        payload_json=json.dumps({"event_type": "labtest.appointment.updated", "data": {}}),
    )
    several = [
        pb.IngestEventRequest(deliveries=singles[:5]),
        singles[5],
        pb.IngestEventRequest(deliveries=[*singles[6:], bad, singles[0], nested, conflict]),
    ]
    responses = [r async for r in api.stub.IngestEvents(stream_of(several))]

    assert len(responses) == 3
    first, single, last = responses
    assert not single.results
    assert single.event_id == singles[5].event_id
    results = [*first.results, single, *last.results]
    sent = [*singles, bad, singles[0], nested, conflict]
    assert [r.event_id for r in results] == [r.event_id for r in sent]
    assert all(not r.HasField("error") for r in results[: len(singles)])
    assert [r.outcome for r in results[: len(singles)]].count(DUPLICATE) == 0
    refused, duplicate, nested_answer, conflicted = results[len(singles) :]
    assert refused.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert [v.field for v in refused.error.field_violations] == ["payload.event_type"]
    assert duplicate.outcome == DUPLICATE
    assert not duplicate.HasField("error")
    assert [v.field for v in nested_answer.error.field_violations] == ["deliveries"]
    assert conflicted.error.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
    revisions = [r.revision for r in results if r.outcome == APPLIED]
    assert revisions == sorted(set(revisions))
    for r in runs:
        got = await api.stub.GetTransaction(
            pb.GetTransactionRequest(transaction_id=r["expect"]["transaction_id"])
        )
        check_expect(got.transaction, r["expect"])


async def test_a_request_of_deliveries_that_cannot_be_taken_whole_is_refused_whole(
    api: Running,
) -> None:
    """Over MAX_DELIVERIES_PER_REQUEST, or deliveries beside a body of its own: the request's
    own `error` (INVALID_ARGUMENT naming `deliveries`), nothing stored, the stream goes on.
    IngestEvent refuses deliveries outright."""
    run = with_fresh_ids(SCENARIOS[0])
    one = request(run["deliveries"][0])
    too_many = pb.IngestEventRequest(deliveries=[one] * (MAX_DELIVERIES_PER_REQUEST + 1))
    both = pb.IngestEventRequest(
        event_id=one.event_id, payload_json=one.payload_json, deliveries=[one]
    )
    responses = [r async for r in api.stub.IngestEvents(stream_of([too_many, both]))]
    for response in responses:
        assert response.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert [v.field for v in response.error.field_violations] == ["deliveries"]
        assert not response.results
    assert "at most 500 deliveries per request, got 501" in responses[0].error.message
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.stub.IngestEvent(pb.IngestEventRequest(deliveries=[one]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.stub.GetTransaction(
            pb.GetTransactionRequest(order_id=run["deliveries"][0]["body"]["data"]["id"])
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def windowed_service(tmp_path: Path, window: int) -> TransactionService:
    """A service (not started) whose IngestEvents streams read `window` deliveries ahead."""
    settings = loopback_settings(str(tmp_path / "x.db"), ingest_stream_window=window)
    return TransactionService(settings)


class Written:
    """A stream's requests, counting how many the client has written."""

    def __init__(self, requests: list[pb.IngestEventRequest]) -> None:
        self.requests = requests
        self.count = 0

    async def __aiter__(self) -> AsyncIterator[pb.IngestEventRequest]:
        for item in self.requests:
            yield item
            self.count += 1


class GatedWrites:
    """Holds every store write until `open()`: ingest answers nothing meanwhile."""

    def __init__(self, service: TransactionService) -> None:
        self.gate = asyncio.Event()
        store = service.app.store
        real: Callable[[BatchKeys, Planner[Any]], Awaitable[tuple[AppliedBatch, Any]]] = store.write

        async def write(keys: BatchKeys, plan: Planner[Any]) -> tuple[AppliedBatch, Any]:
            await self.gate.wait()
            return await real(keys, plan)

        store.write = write  # type: ignore[method-assign]

    def open(self) -> None:
        self.gate.set()


async def test_ingest_events_stops_reading_while_its_window_is_full(tmp_path: Path) -> None:
    """With commits held up, the server reads exactly `ingest_stream_window` requests and no
    more, although the client has written more (HTTP/2 holds them); once commits go on, every
    request is answered, in order."""
    window = 4
    service = windowed_service(tmp_path, window)
    port = await service.start()
    gate = GatedWrites(service)
    metrics = service.app.metrics.registry
    in_flight = "transaction_service_ingest_stream_requests_in_flight"
    runs = [with_fresh_ids(SCENARIOS[i % len(SCENARIOS)]) for i in range(8)]
    requests = [request(d) for r in runs for d in r["deliveries"]]
    written = Written(requests)

    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TransactionServiceStub(channel)
            call = stub.IngestEvents(written)
            reading = asyncio.create_task(_collect(call))
            await until(lambda: metrics.get_sample_value(in_flight) == window, "window full")
            # The client goes on writing into the connection's buffers...
            await until(lambda: written.count >= 2 * window, "the client wrote past the window")
            # ...but the server has read no further.
            assert metrics.get_sample_value(in_flight) == window
            assert not reading.done()
            gate.open()
            responses = await reading
        assert [r.event_id for r in responses] == [r.event_id for r in requests]
        assert all(not r.HasField("error") for r in responses)
        assert metrics.get_sample_value(in_flight) == 0
    finally:
        gate.open()
        await service.stop()


async def test_the_window_counts_each_delivery_of_a_request(tmp_path: Path) -> None:
    """A request of several deliveries takes that many places in the window: with commits held
    up and a window of 4, requests of 3 deliveries are read two at a time (the second overshoots
    by its own size), not four."""
    service = windowed_service(tmp_path, 4)
    port = await service.start()
    gate = GatedWrites(service)
    metrics = service.app.metrics.registry
    in_flight = "transaction_service_ingest_stream_requests_in_flight"
    runs = [with_fresh_ids(SCENARIOS[i % len(SCENARIOS)]) for i in range(6)]
    singles = [request(r["deliveries"][0]) for r in runs]
    requests = [pb.IngestEventRequest(deliveries=singles[i : i + 3]) for i in (0, 3)]
    requests += [pb.IngestEventRequest(deliveries=[request(d)]) for d in runs[0]["deliveries"][1:]]
    written = Written(requests)

    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TransactionServiceStub(channel)
            reading = asyncio.create_task(_collect(stub.IngestEvents(written)))
            await until(lambda: metrics.get_sample_value(in_flight) == 6, "two requests read")
            await until(lambda: written.count == len(requests), "the client wrote every request")
            assert metrics.get_sample_value(in_flight) == 6
            assert not reading.done()
            gate.open()
            responses = await reading
        answered = [r.event_id for response in responses for r in response.results]
        assert answered == [r.event_id for q in requests for r in q.deliveries]
        assert metrics.get_sample_value(in_flight) == 0
    finally:
        gate.open()
        await service.stop()


async def _collect(call: Any) -> list[pb.IngestEventResponse]:
    return [response async for response in call]


async def test_ingest_events_needs_an_ingest_token(tmp_path: Path, started: Any) -> None:  # noqa: F811
    settings = settings_for(tmp_path, ingest_tokens=[INGEST_TOKEN], read_tokens=[READ_TOKEN])
    service = await started(settings)
    run = with_fresh_ids(SCENARIOS[0])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        stub = pb_grpc.TransactionServiceStub(channel)
        for metadata, code in (
            ([], grpc.StatusCode.UNAUTHENTICATED),
            (bearer(READ_TOKEN), grpc.StatusCode.PERMISSION_DENIED),
        ):
            # Refused before any request is read: nothing is written (a client still writing
            # when the refusal lands can see its own write fail instead of the status).
            call = stub.IngestEvents(metadata=metadata)
            assert await call.code() == code
        requests = [request(d) for d in run["deliveries"]]
        answered = await _collect(
            stub.IngestEvents(stream_of(requests), metadata=bearer(INGEST_TOKEN))
        )
        assert len(answered) == len(requests)
        lookup = pb.GetTransactionRequest(transaction_id=run["expect"]["transaction_id"])
        batch = await stub.BatchGetTransactions(
            pb.BatchGetTransactionsRequest(lookups=[lookup]), metadata=bearer(READ_TOKEN)
        )
        assert batch.results[0].found


# -- BatchGetTransactions ---------------------------------------------------------------------


async def test_batch_get_answers_every_lookup_in_order(api: Running) -> None:
    runs = [with_fresh_ids(s) for s in SCENARIOS]
    requests = [request(d) for r in runs for d in r["deliveries"]]
    await _collect(api.stub.IngestEvents(stream_of(requests)))
    lookups: list[pb.GetTransactionRequest] = []
    want: list[str | None] = []
    for r in runs:
        txn_id = r["expect"]["transaction_id"]
        lookups.append(pb.GetTransactionRequest(transaction_id=txn_id))
        want.append(txn_id)
        lookups.append(pb.GetTransactionRequest(order_id="no-such-order"))
        want.append(None)
        for order_id in r["expect"]["orders"]:
            lookups.append(pb.GetTransactionRequest(order_id=order_id))
            want.append(txn_id)
    lookups.append(lookups[0])  # the same lookup twice: answered twice
    want.append(want[0])
    # An order id asked for as a transaction id: not found (the lookup kinds are distinct).
    some_order = next(iter(runs[0]["expect"]["orders"]))
    lookups.append(pb.GetTransactionRequest(transaction_id=some_order))
    want.append(None)

    answer = await api.stub.BatchGetTransactions(pb.BatchGetTransactionsRequest(lookups=lookups))

    assert len(answer.results) == len(lookups)
    for result, txn_id in zip(answer.results, want, strict=True):
        assert result.found == (txn_id is not None)
        assert result.transaction.id == (txn_id or "")
        if txn_id is not None:
            assert answer.revision >= result.transaction.revision
    for r in runs:
        index = want.index(r["expect"]["transaction_id"])
        check_expect(answer.results[index].transaction, r["expect"])
        single = await api.stub.GetTransaction(
            pb.GetTransactionRequest(transaction_id=r["expect"]["transaction_id"])
        )
        assert single.transaction == answer.results[index].transaction


async def test_batch_get_refuses_bad_lookups_naming_them(api: Running) -> None:
    cases = [
        ([], "lookups"),
        ([pb.GetTransactionRequest(order_id="a"), pb.GetTransactionRequest()], "lookups[1]"),
        ([pb.GetTransactionRequest(transaction_id="  ")], "lookups[0].transaction_id"),
        ([pb.GetTransactionRequest(order_id="a")] * (MAX_BATCH_LOOKUPS + 1), "lookups"),
    ]
    for lookups, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await api.stub.BatchGetTransactions(pb.BatchGetTransactionsRequest(lookups=lookups))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in caught.value.details()
    # A full batch of unknown ids is fine: each marked not found.
    many = [pb.GetTransactionRequest(order_id=f"o-{i}") for i in range(MAX_BATCH_LOOKUPS)]
    answer = await api.stub.BatchGetTransactions(pb.BatchGetTransactionsRequest(lookups=many))
    assert [r.found for r in answer.results] == [False] * MAX_BATCH_LOOKUPS


async def test_stores_read_many_in_one_snapshot(tmp_path: Path, store_kind: str) -> None:
    """The store method under BatchGetTransactions: unknown ids are absent, known ones decoded
    once per transaction, the head revision read with them."""
    with database(store_kind, tmp_path) as db:
        settings = settings_for(tmp_path, db=db)
        service = TransactionService(settings)
        port = await service.start()
        try:
            run = with_fresh_ids(SCENARIOS[-1])
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.TransactionServiceStub(channel)
                await _collect(
                    stub.IngestEvents(stream_of([request(d) for d in run["deliveries"]]))
                )
            orders = list(run["expect"]["orders"])
            txn_id = run["expect"]["transaction_id"]
            by_id, by_order, head = await service.store.get_many([txn_id, "nope"], [*orders, "x"])
            assert set(by_id) == {txn_id}
            assert set(by_order) == set(orders)
            assert all(s is by_id[txn_id] for s in by_order.values())
            assert head == await service.store.head_revision() >= by_id[txn_id].revision
            assert await service.store.get_many([], []) == ({}, {}, head)
        finally:
            await service.stop()


# -- `transaction-service ingest` against a server process ------------------------------------


def test_ingest_command_feeds_files_and_summarises(tmp_path: Path) -> None:
    """Fixture files and JSON lines (envelopes, raw bodies, a broken line) through a real server
    process: the summary counts each outcome and lists each refusal with its file and line; the
    exit status says whether anything was refused. Sent again: all duplicates, exit 0."""
    from tests.process import assert_served_as_expected, serve_db

    runs = [with_fresh_ids(s) for s in SCENARIOS]
    fixtures = []
    for r in runs:
        path = tmp_path / f"{r['scenario']}.json"
        path.write_text(json.dumps(r, indent=2))
        fixtures.append(path)
    extra = with_fresh_ids(SCENARIOS[0])
    first, *rest = extra["deliveries"]
    lines = [
        json.dumps({"event_id": first["svix_id"], "body": first["body"]}),
        "",
        "{this is not json",
        *(json.dumps(d["body"]) for d in rest),  # raw bodies: ids derived from them
    ]
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    total = sum(len(r["deliveries"]) for r in runs) + len(extra["deliveries"]) + 1

    with serve_db(tmp_path / "x.db") as server:

        def ingest(*files: Path) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "transaction_service",
                    "ingest",
                    "--address",
                    server.address,
                    *map(str, files),
                ],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )

        result = ingest(*fixtures, jsonl)
        assert result.returncode == 1, result.stderr
        summary, *details = result.stdout.splitlines()
        assert summary.startswith(f"ingested {total} deliveries: ")
        assert summary.endswith(", 1 refused")
        assert details[0] == "refused:"
        assert details[1].startswith(
            f"  {jsonl}:3: INVALID_ARGUMENT: invalid request: payload_json"
        )
        for r in runs:
            assert_served_as_expected(server, r)

        again = ingest(*fixtures)
        assert again.returncode == 0, again.stdout + again.stderr
        count = sum(len(r["deliveries"]) for r in runs)
        assert again.stdout.splitlines() == [
            f"ingested {count} deliveries: 0 applied, {count} duplicate, 0 stale, 0 ignored, "
            "0 refused"
        ]
        missing = ingest(tmp_path / "missing.jsonl")
        assert missing.returncode == 2
        assert "missing.jsonl: cannot read it" in missing.stderr
        assert "Traceback" not in missing.stderr
