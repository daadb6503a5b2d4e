"""Watch: many watches on one bidirectional stream, each exactly what its own stream would be."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message

# googleapis-common-protos ships no type information (and typeshed has none for it).
from google.rpc import code_pb2, error_details_pb2  # type: ignore[import-untyped]

from tests.conftest import SCENARIOS
from tests.harness import Running, error_info, violated_fields
from tests.scenario_tools import with_fresh_ids
from tests.test_watch import (
    DEADLINE,
    REDRAW,
    channel_to,
    ingest_direct,
    legacy_variant,
    log_revisions,
    wait_for,
)
from transaction_service.api.multiplex import WatchStream
from transaction_service.usecases.watch import WatchFilter
from transactions.v1 import transactions_pb2 as pb

__all__ = ["channel_to"]  # the fixture, shared with test_watch.py


class Stream:
    """A Watch call: requests written as the test goes, responses read by watch id."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.responses: list[pb.WatchResponse] = []

    async def create(self, watch_id: int, **target: Message) -> None:
        await self.call.write(
            pb.WatchRequest(create=pb.WatchCreateRequest(watch_id=watch_id, **target))
        )

    async def cancel(self, watch_id: int) -> None:
        await self.call.write(pb.WatchRequest(cancel=pb.WatchCancelRequest(watch_id=watch_id)))

    async def read_until(
        self, done: Callable[[list[pb.WatchResponse]], bool], timeout: float = DEADLINE
    ) -> list[pb.WatchResponse]:
        async with asyncio.timeout(timeout):
            while not done(self.responses):
                response = await self.call.read()
                assert response is not grpc.aio.EOF, self.responses
                self.responses.append(response)
        return self.responses

    def of(self, watch_id: int) -> list[pb.WatchResponse]:
        return [r for r in self.responses if r.watch_id == watch_id]

    def events(self, watch_id: int) -> list[str]:
        return [r.WhichOneof("event") for r in self.of(watch_id)]

    def changes(self, watch_id: int) -> list[pb.TransactionChange]:
        """Every change of a watch, unbatched or in batches, in order."""
        found = []
        for r in self.of(watch_id):
            inner = getattr(r, r.WhichOneof("event"))
            if r.WhichOneof("event") in ("transaction", "transactions"):
                event = inner.WhichOneof("event")
                if event == "change":
                    found.append(inner.change)
                elif event == "changes":
                    found.extend(inner.changes.changes)
        return found

    def canceled(self, watch_id: int) -> Any:
        (ended,) = [r.canceled for r in self.of(watch_id) if r.WhichOneof("event") == "canceled"]
        return ended


def one(**lookup: Any) -> dict[str, Message]:
    return {"transaction": pb.WatchTransactionRequest(**lookup)}


def feed(**options: Any) -> dict[str, Message]:
    return {"transactions": pb.WatchTransactionsRequest(**options)}


def detail(status: Any, message: Message) -> Any:
    for packed in status.details:
        if packed.Is(message.DESCRIPTOR):
            packed.Unpack(message)
            return message
    raise AssertionError(f"no {message.DESCRIPTOR.name} in {status}")


@contextlib.asynccontextmanager
async def watch_stream(stub: Any) -> AsyncIterator[Stream]:
    call = stub.Watch()
    try:
        yield Stream(call)
    finally:
        call.cancel()


# -- several watches on one stream ---------------------------------------------------------------


def small_buffers(monkeypatch: pytest.MonkeyPatch) -> list[WatchStream]:
    """Every `Watch` stream made from here has a buffer of 16 KiB; the list gets each."""
    streams: list[WatchStream] = []
    real_init = WatchStream.__init__

    def small(self: WatchStream, **kwargs: Any) -> None:
        real_init(self, **kwargs, max_bytes=16 * 1024)
        streams.append(self)

    monkeypatch.setattr(WatchStream, "__init__", small)
    return streams


@contextlib.asynccontextmanager
async def unread_watch_stream(port: int) -> AsyncIterator[tuple[Stream, Any]]:
    """A `Watch` stream on a channel with a small HTTP/2 window (so that gRPC's own buffers fill
    early): the stream's helper, and its call."""
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{port}",
        options=[("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)],
    ) as channel:
        call = channel.stream_stream(
            "/transactions.v1.TransactionService/Watch",
            request_serializer=pb.WatchRequest.SerializeToString,
            response_deserializer=pb.WatchResponse.FromString,
        )()
        yield Stream(call), call


async def test_several_watches_on_one_stream_each_get_what_their_own_stream_would(
    api: Running,
) -> None:
    d = REDRAW["deliveries"]
    order_id = d[0]["body"]["data"]["id"]
    await ingest_direct(api, d[:1])
    async with watch_stream(api.stub) as stream:
        await stream.create(1, **one(order_id=order_id))
        await stream.create(2, **feed())
        await stream.create(3, **one(transaction_id="not-seen-yet"))
        await stream.read_until(
            lambda rs: all(len([r for r in rs if r.watch_id == w]) >= 2 for w in (1, 2, 3))
        )
        # Each created is acknowledged first, then opens as its own stream would.
        assert stream.of(1)[1].transaction.WhichOneof("event") == "current"
        assert stream.of(1)[1].transaction.current.progress_revision == 1
        assert stream.of(2)[1].transactions.progress.revision == 1
        assert stream.of(3)[1].transaction.progress.revision == 1
        assert [stream.events(w)[0] for w in (1, 2, 3)] == ["created"] * 3
        await ingest_direct(api, d[1:])
        revisions = await log_revisions(api)
        await stream.read_until(lambda _: len(stream.changes(2)) == len(revisions) - 1)
        await stream.read_until(lambda _: [c.revision for c in stream.changes(1)] == revisions[1:])
        assert [c.revision for c in stream.changes(2)] == revisions[1:]
        assert stream.changes(3) == []
        # Cancel one: its `canceled` is OK, and the others go on.
        await stream.cancel(1)
        await stream.read_until(lambda _: "canceled" in stream.events(1))
        assert stream.canceled(1).code == code_pb2.OK
        await wait_for(lambda: api.service.hub.subscriber_count == 2)
        later = with_fresh_ids(REDRAW)["deliveries"][0]
        await ingest_direct(api, [later])
        await stream.read_until(lambda _: stream.changes(2)[-1].event_id == later["svix_id"])
        assert stream.events(1)[-1] == "canceled"
        # A cancel of an id not open is ignored; the id of an ended watch may be used again.
        await stream.cancel(1)
        await stream.cancel(99)
        before = len(stream.changes(1))
        await stream.create(1, **feed(start_revision=revisions[-1]))
        await stream.read_until(lambda _: len(stream.changes(1)) == before + 1)
        assert stream.changes(1)[-1].event_id == later["svix_id"]
        assert stream.events(1).count("canceled") == 1
        assert stream.events(1).count("created") == 2


async def test_resumed_watches_replay_then_go_live_without_gap_or_repeat(api: Running) -> None:
    runs = [with_fresh_ids(s) for s in SCENARIOS for _ in range(20)]
    half = len(runs) // 2
    for run in runs[:half]:
        await ingest_direct(api, run["deliveries"])
    kept = await log_revisions(api)
    start = kept[len(kept) // 2]
    watched = runs[0]["expect"]["transaction_id"]
    async with watch_stream(api.stub) as stream:
        await stream.create(1, **feed(start_revision=start))
        await stream.create(2, **feed(start_revision=start, batch_changes=True))
        await stream.create(3, **one(transaction_id=watched, start_revision=0))
        # The rest is ingested while the replays are under way.
        await ingest_direct(api, [d for r in runs[half:] for d in r["deliveries"]])
        final = await log_revisions(api)
        expected = [r for r in final if r > start]
        for watch_id in (1, 2):
            await stream.read_until(
                lambda _, w=watch_id: (
                    bool(stream.changes(w)) and stream.changes(w)[-1].revision == final[-1]
                )
            )
            assert [c.revision for c in stream.changes(watch_id)] == expected
        assert "changes" in [r.transactions.WhichOneof("event") for r in stream.of(2)[1:]]
        mine = await log_revisions(api, WatchFilter(transaction_id=watched))
        await stream.read_until(lambda _: len(stream.changes(3)) == len(mine))
        assert [c.revision for c in stream.changes(3)] == mine


async def test_a_legacy_standin_watch_follows_into_its_real_transaction(api: Running) -> None:
    scenario = next(s for s in SCENARIOS if s["scenario"] == "completed_without_redraw")
    run = with_fresh_ids(scenario)
    last = run["deliveries"][-1]
    order_id = last["body"]["data"]["id"]
    await ingest_direct(
        api, [{"svix_id": "legacy-" + last["svix_id"], "body": legacy_variant(last["body"])}]
    )
    async with watch_stream(api.stub) as stream:
        await stream.create(7, **one(transaction_id=order_id))
        await stream.read_until(lambda _: len(stream.of(7)) == 2)
        await ingest_direct(api, [last])
        await stream.read_until(lambda _: len(stream.changes(7)) == 1)
        (fold,) = stream.changes(7)
        assert fold.transaction.id == run["expect"]["transaction_id"]
        assert pb.CHANGE_KIND_LEGACY_MERGED in fold.kinds
        assert pb.CHANGE_KIND_TRANSACTION_COMPLETED not in fold.kinds


async def test_idle_watches_get_progress_messages(channel_to: Callable[..., Any]) -> None:
    _, stub = await channel_to(watch_progress_seconds=0.05)
    async with watch_stream(stub) as stream:
        await stream.create(1, **feed())
        await stream.create(2, **one(order_id="o"))
        await stream.read_until(lambda _: len(stream.of(1)) >= 4 and len(stream.of(2)) >= 4)
        assert {r.transactions.progress.revision for r in stream.of(1)[1:]} == {0}
        assert {r.transaction.progress.revision for r in stream.of(2)[1:]} == {0}


# -- per-watch errors end that watch only ----------------------------------------------------------


async def test_per_watch_errors_cancel_that_watch_and_the_stream_goes_on(api: Running) -> None:
    run = with_fresh_ids(REDRAW)
    await ingest_direct(api, run["deliveries"])
    head = await api.service.store.head_revision()
    async with watch_stream(api.stub) as stream:
        await stream.create(1, **feed())
        await stream.create(2, **one(transaction_id=""))
        await stream.create(3, **feed(kinds=[pb.CHANGE_KIND_UNSPECIFIED]))
        await stream.create(4, **one(order_id="o", start_revision=-1))
        await stream.create(5)
        await stream.create(0, **feed())
        await stream.create(-3, **feed())
        await stream.create(6, **feed(start_revision=head + 1))
        ended = (2, 3, 4, 5, 0, -3, 6)
        await stream.read_until(lambda _: all("canceled" in stream.events(w) for w in ended))
        fields = {
            w: [
                v.field
                for v in detail(stream.canceled(w), error_details_pb2.BadRequest()).field_violations
            ]
            for w in (2, 3, 4, 5, 0, -3)
        }
        assert fields == {
            2: ["create.transaction.transaction_id"],
            3: ["create.transactions.kinds[0]"],
            4: ["create.transaction.start_revision"],
            5: ["create.target"],
            0: ["create.watch_id"],
            -3: ["create.watch_id"],
        }
        assert {stream.canceled(w).code for w in fields} == {code_pb2.INVALID_ARGUMENT}
        # Refused creates get no `created`, only their `canceled`.
        assert all(stream.events(w) == ["canceled"] for w in fields)
        future = stream.canceled(6)
        assert future.code == code_pb2.OUT_OF_RANGE
        info = detail(future, error_details_pb2.ErrorInfo())
        assert (info.reason, info.metadata["head_revision"]) == ("REVISION_IN_FUTURE", str(head))
        # Compacted: as WatchTransactions ends, with the same ErrorInfo.
        await api.service.store.trim_changes(datetime.now(UTC) + timedelta(hours=1))
        await stream.create(8, **feed(start_revision=1))
        await stream.read_until(lambda _: "canceled" in stream.events(8))
        compacted = stream.canceled(8)
        assert compacted.code == code_pb2.OUT_OF_RANGE
        info = detail(compacted, error_details_pb2.ErrorInfo())
        assert info.reason == "REVISION_COMPACTED"
        assert info.metadata["compacted_revision"] == str(head)
        assert info.metadata["last_sent_revision"] == "1"
        # The first watch and the stream go on.
        d = with_fresh_ids(REDRAW)["deliveries"][0]
        await ingest_direct(api, [d])
        await stream.read_until(lambda _: len(stream.changes(1)) == 1)
        assert stream.changes(1)[0].event_id == d["svix_id"]
        assert api.service.hub.subscriber_count == 1


async def test_an_unexpected_error_in_a_watch_cancels_it_internal_and_is_logged(
    api: Running, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = api.service.hub.watch

    def broken(where: WatchFilter, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        if where.team_id == "broken":

            async def fails() -> AsyncIterator[Any]:
                raise RuntimeError("a bug")
                yield

            return fails()
        return real(where, *args, **kwargs)

    monkeypatch.setattr(api.service.hub, "watch", broken)
    async with watch_stream(api.stub) as stream:
        await stream.create(1, **feed(team_id="broken"))
        await stream.create(2, **feed())
        await stream.read_until(lambda _: "canceled" in stream.events(1) and len(stream.of(2)) == 2)
        assert stream.canceled(1).code == code_pb2.INTERNAL
        assert "a bug" not in stream.canceled(1).message
        assert any(r.exc_info and "Watch stream" in r.getMessage() for r in caplog.records)


# -- what ends the stream ------------------------------------------------------------------------


async def test_a_duplicate_watch_id_ends_the_stream_invalid_argument(api: Running) -> None:
    async with watch_stream(api.stub) as stream:
        await stream.create(1, **feed())
        await stream.read_until(lambda _: len(stream.of(1)) == 2)
        await stream.create(1, **one(order_id="o"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stream.read_until(lambda _: False)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violated_fields(caught.value) == ["create.watch_id"]
    await wait_for(lambda: api.service.hub.subscriber_count == 0)


@pytest.mark.parametrize("raw", [b"", b"\xff\xff\xff"])
async def test_a_request_neither_create_nor_cancel_ends_the_stream_invalid_argument(
    api: Running, raw: bytes
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{api.service.port}") as channel:
        call = channel.stream_stream(
            "/transactions.v1.TransactionService/Watch",
            request_serializer=lambda r: r,
            response_deserializer=pb.WatchResponse.FromString,
        )()
        await call.write(raw)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(caught.value) == ["request" if not raw else ""]


async def test_after_a_half_close_watches_go_on_and_the_stream_ends_ok_with_the_last(
    api: Running,
) -> None:
    async with watch_stream(api.stub) as stream:
        await stream.create(1, **feed())
        await stream.create(2, **one(order_id="o", start_revision=-1))
        await stream.call.done_writing()
        d = with_fresh_ids(REDRAW)["deliveries"][0]
        await stream.read_until(lambda _: len(stream.of(1)) == 2)
        await ingest_direct(api, [d])
        await stream.read_until(lambda _: len(stream.changes(1)) == 1)
        assert stream.canceled(2).code == code_pb2.INVALID_ARGUMENT
    # With nothing open, a half-closed stream ends OK.
    async with watch_stream(api.stub) as stream:
        await stream.create(1, **feed(start_revision=-1))
        await stream.call.done_writing()
        await stream.read_until(lambda _: "canceled" in stream.events(1))
        assert await stream.call.read() is grpc.aio.EOF
        assert await stream.call.code() == grpc.StatusCode.OK


# -- limits ----------------------------------------------------------------------------------------


async def test_creates_past_the_most_watches_of_a_stream_are_resource_exhausted(
    channel_to: Callable[..., Any],
) -> None:
    service, stub = await channel_to(watch_max_per_stream=3)
    async with watch_stream(stub) as stream:
        for watch_id in range(1, 5):
            await stream.create(watch_id, **one(order_id=f"o-{watch_id}"))
        await stream.read_until(lambda _: "canceled" in stream.events(4))
        refused = stream.canceled(4)
        assert refused.code == code_pb2.RESOURCE_EXHAUSTED
        info = detail(refused, error_details_pb2.ErrorInfo())
        assert (info.reason, info.metadata["max_watches"]) == ("TOO_MANY_WATCHES", "3")
        # Once one is cancelled there is room again.
        await stream.cancel(2)
        await stream.create(5, **one(order_id="o-5"))
        await stream.read_until(lambda _: len(stream.of(5)) == 2)
        assert stream.events(5) == ["created", "transaction"]
        await wait_for(lambda: service.hub.subscriber_count == 3)


async def test_creates_past_the_budget_wait_and_none_is_refused(
    channel_to: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Creates come at most `watch_creates_per_second` a stream (a second's worth at once):
    past it the server reads the next request only once the budget allows. With 2 a second,
    the third of five creates sent at once waits; all five are created, none refused."""
    streams: list[WatchStream] = []
    real_init = WatchStream.__init__

    def recorded(self: WatchStream, **kwargs: Any) -> None:
        real_init(self, **kwargs)
        streams.append(self)

    monkeypatch.setattr(WatchStream, "__init__", recorded)
    _, stub = await channel_to(watch_creates_per_second=2)
    async with watch_stream(stub) as stream:
        for watch_id in range(1, 6):
            await stream.create(watch_id, **one(order_id=f"o-{watch_id}"))
        await stream.read_until(lambda _: all(len(stream.of(w)) == 2 for w in range(1, 6)))
        assert all(stream.events(w) == ["created", "transaction"] for w in range(1, 6))
        (mux,) = streams
        assert mux.create_waits >= 1


async def test_a_stream_not_read_holds_a_bounded_buffer_and_its_watches_miss_nothing(
    channel_to: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client reads nothing while hundreds of changes are committed: the stream's buffer
    stays within its bound (plus one message per watch), the watches stop taking changes and
    fall behind, and once the client reads they catch up from the change log, missing none."""
    streams = small_buffers(monkeypatch)
    service, _ = await channel_to(watch_queue_size=8)
    async with unread_watch_stream(service.port) as (stream, call):
        watches = range(1, 11)
        for watch_id in watches:
            await stream.create(watch_id, **feed())
        await stream.read_until(lambda rs: len(rs) == 20)
        peak = 0
        for run in [with_fresh_ids(s) for s in SCENARIOS for _ in range(40)]:
            await ingest_direct(service, run["deliveries"])
            (mux,) = streams
            peak = max(peak, mux.buffered)
        expected = await log_revisions_of(service)
        # The bound, plus at most one message per watch that passed the gate together.
        assert peak <= 16 * 1024 + len(watches) * 8 * 1024, peak
        await stream.read_until(
            lambda _: all(
                stream.changes(w) and stream.changes(w)[-1].revision == expected[-1]
                for w in watches
            )
        )
        for watch_id in watches:
            assert [c.revision for c in stream.changes(watch_id)] == expected
        # They fell off the hub's buffer of recent changes while they waited for room, and
        # caught up from the change log.
        metric = service.app.metrics.registry.get_sample_value
        assert metric("transaction_service_watch_overflows_total") >= len(watches)
        assert metric("transaction_service_watch_catch_ups_total") >= len(watches)
        call.cancel()


async def test_a_full_buffer_lets_its_waiting_watches_in_one_at_a_time() -> None:
    """Watches waiting for room are let in in turn, not all woken at each message sent: with
    a thousand watches waiting on a busy stream, waking them all each time made every message
    cost a thousand task switches (one stream of 1,000 feeds took 13 times the CPU of ten
    streams of 100 for the same messages). Each waits a bounded number of times."""
    stream = WatchStream(max_watches=1000, max_bytes=100)
    stream.push(b"x" * 100)  # full
    waiting = 200
    puts = [asyncio.create_task(stream.put(b"y" * 10)) for _ in range(waiting)]
    await asyncio.sleep(0)
    assert stream.room_waits == waiting
    sent = 0
    async for _ in stream.messages(lambda: AssertionError("not shutting down")):
        sent += 1
        await asyncio.sleep(0)
        if sent == waiting + 1:
            break
    assert all(p.done() for p in puts)
    # Each waited at most a few times (once, plus a look that found the buffer full again).
    assert stream.room_waits <= 3 * waiting, stream.room_waits


async def test_a_watch_waiting_for_room_holds_no_message_made_for_it(
    channel_to: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A watch makes its next message only once the buffer has room for it, and queues it at
    once: while it waits it holds its event, not the event's encoding (a batch's message can
    be up to half of max_message_bytes: a thousand batched feeds replaying on a stream that
    was not read made the server hold 780 MB, beyond the buffer's bound)."""
    import transaction_service.api.servicer as servicer

    made: list[bytes] = []
    pushed: list[bytes] = []
    real_framed, real_push = servicer.framed, WatchStream.push

    def framed(*args: Any) -> bytes:
        made.append(real_framed(*args))
        return made[-1]

    def push(self: WatchStream, data: bytes) -> None:
        pushed.append(data)
        real_push(self, data)

    monkeypatch.setattr(servicer, "framed", framed)
    monkeypatch.setattr(WatchStream, "push", push)
    streams = small_buffers(monkeypatch)
    service, _ = await channel_to()
    for run in [with_fresh_ids(s) for s in SCENARIOS for _ in range(5)]:
        await ingest_direct(service, run["deliveries"])
    async with unread_watch_stream(service.port) as (stream, call):
        for watch_id in range(1, 11):
            await stream.create(watch_id, **feed(start_revision=0, batch_changes=True))
        # The buffer fills and stays full (nothing is read): watches wait for room.
        await wait_for(lambda: bool(streams) and streams[0].room_waits >= 5)
        assert [id(m) for m in made] == [id(p) for p in pushed if any(p is m for m in made)]
        call.cancel()
        await wait_for(lambda: service.hub.subscriber_count == 0)


async def test_a_failed_stream_ends_after_what_was_queued_when_it_failed() -> None:
    """A stream ended by an error (a duplicate watch id, a request neither create nor cancel)
    sends what was queued, then the error; its watches end at once. They went on queueing:
    against a server, twenty feeds replaying from revision 0 sent 3,258 more messages after
    the duplicate create before the INVALID_ARGUMENT came, and more watches, longer."""
    from transaction_service.errors import InvalidArgument

    stream = WatchStream(max_watches=10, max_bytes=100)

    async def busy() -> None:
        while True:
            await stream.put(b"x" * 10)

    stream.start(1, busy())
    await wait_for(lambda: stream.room_waits > 0)  # the buffer is full
    stream.fail(InvalidArgument([]))
    queued, sent = stream.buffered, 0

    async def send() -> None:
        nonlocal sent
        async for data in stream.messages(lambda: AssertionError("not shutting down")):
            sent += len(data)
            assert sent <= queued
            await asyncio.sleep(0)

    with pytest.raises(InvalidArgument):
        await send()
    assert sent == queued
    assert stream.watches == {}


async def log_revisions_of(service: Any) -> list[int]:
    page = await service.store.changes_after(0, 1_000_000)
    return [c.revision for c in page.changes]


# -- shutdown --------------------------------------------------------------------------------------


async def test_shutdown_cancels_every_watch_with_its_resume_point_then_ends_the_stream(
    channel_to: Callable[..., Any],
) -> None:
    service, stub = await channel_to(shutdown_grace_seconds=30)
    await ingest_direct(service, REDRAW["deliveries"][:2])
    order_id = REDRAW["deliveries"][0]["body"]["data"]["id"]
    async with watch_stream(stub) as stream:
        await stream.create(1, **one(order_id=order_id))
        await stream.create(2, **feed())
        await stream.create(3, **feed(start_revision=1))
        await stream.read_until(lambda _: all(len(stream.of(w)) >= 2 for w in (1, 2, 3)))
        started = asyncio.get_running_loop().time()
        await service.stop()
        assert asyncio.get_running_loop().time() - started < 30
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stream.read_until(lambda _: False)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(caught.value).reason == "SHUTTING_DOWN"
        for watch_id in (1, 2, 3):
            ended = stream.canceled(watch_id)
            assert ended.code == code_pb2.UNAVAILABLE
            info = detail(ended, error_details_pb2.ErrorInfo())
            assert (info.reason, info.metadata["last_sent_revision"]) == ("SHUTTING_DOWN", "2")
            assert stream.events(watch_id)[-1] == "canceled"


async def test_a_read_token_may_watch(channel_to: Callable[..., Any]) -> None:
    read, ingest_token = "r" * 20, "i" * 20
    _, stub = await channel_to(read_tokens=[read], ingest_tokens=[ingest_token])
    refused = stub.Watch()
    await refused.write(pb.WatchRequest(create=pb.WatchCreateRequest(watch_id=1, **feed())))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await refused.read()
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    call = stub.Watch(metadata=[("authorization", f"Bearer {read}")])
    stream = Stream(call)
    await stream.create(1, **feed())
    await stream.read_until(lambda _: len(stream.of(1)) == 2)
    call.cancel()


def test_the_canceled_of_a_client_cancel_is_an_ok_status() -> None:
    from transaction_service.api.multiplex import canceled

    response = pb.WatchResponse.FromString(canceled(12, None))
    assert response.watch_id == 12
    assert response.WhichOneof("event") == "canceled"
    assert response.canceled.code == 0


async def test_a_fault_reading_the_requests_ends_the_stream_internal_and_is_logged(
    api: Running, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from transaction_service.api.servicer import TransactionServicer

    def broken(*args: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(TransactionServicer, "_create_watch", broken)
    async with watch_stream(api.stub) as stream:
        await stream.create(1, **feed())
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stream.read_until(lambda _: False)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "a bug" not in caught.value.details()
    assert any(r.exc_info and "Watch" in r.getMessage() for r in caplog.records)


# -- the Python client on Watch streams ------------------------------------------------------------


async def test_the_client_shares_watch_streams_and_cancels_a_watch_left(api: Running) -> None:
    """`TransactionClient(watches_per_stream=2)`: three watches take two Watch streams; each
    gets what it would on a stream of its own; a watch whose iteration ends is cancelled on the
    server, and a stream left without watches is closed."""
    from transaction_client import TransactionClient

    run = with_fresh_ids(REDRAW)
    order_id = run["deliveries"][0]["body"]["data"]["id"]
    hub = api.service.hub
    async with TransactionClient(f"127.0.0.1:{api.service.port}", watches_per_stream=2) as client:
        assert client.watch_streams is not None
        feeds = [client.watch_transactions(start_revision=0) for _ in range(2)]
        single = client.watch_transaction(order_id=order_id, start_revision=0)
        got: list[list[Any]] = [[], [], []]

        async def drain(watch: Any, into: list[Any]) -> None:
            async for item in watch:
                into.append(item)

        tasks = [
            asyncio.create_task(drain(w, into))
            for w, into in zip([*feeds, single], got, strict=True)
        ]
        await ingest_direct(api, run["deliveries"])
        revisions = await log_revisions(api)
        await wait_for(lambda: all([c.revision for c in g] == revisions for g in got))
        assert client.watch_streams.streams == 2
        assert hub.subscriber_count == 3
        tasks[2].cancel()
        await wait_for(lambda: hub.subscriber_count == 2)
        assert client.watch_streams.streams == 1
        for task in tasks[:2]:
            task.cancel()
        await wait_for(lambda: hub.subscriber_count == 0)
        assert client.watch_streams.streams == 0


async def test_a_watch_left_while_its_buffer_is_full_does_not_hold_up_its_stream(
    api: Running,
) -> None:
    """Two watches share a `Watch` stream; the consumer of one stops reading until its buffers
    are full (the stream's reader then waits to hand it the next message), then leaves it.
    The other watch goes on: what was on its way to the watch left is dropped, and the
    stream's reader does not wait for a consumer that is gone."""
    from transaction_client import TransactionClient

    async with TransactionClient(f"127.0.0.1:{api.service.port}", watches_per_stream=2) as client:
        assert client.watch_streams is not None
        # It would notice the silence and resume elsewhere, late: not what is under test.
        kept = client.watch_transactions(start_revision=0, silence_timeout=10 * DEADLINE)
        left = client.watch_transactions(start_revision=0, buffer_size=1)
        got: list[Any] = []

        async def drain() -> None:
            async for item in kept:
                got.append(item)

        task = asyncio.create_task(drain())
        items = left.__aiter__()
        await ingest_direct(api, with_fresh_ids(REDRAW)["deliveries"][:1])
        await items.__anext__()
        (stream,) = client.watch_streams._streams
        call = stream.watches[2]
        # Changes until the left watch's buffer on the stream is full, then more: the stream's
        # reader waits to hand them to it.
        while not call.messages.full():
            await ingest_direct(api, with_fresh_ids(REDRAW)["deliveries"])
            await asyncio.sleep(0.06)  # a batched watch's rest: the next change is a message
        await ingest_direct(api, with_fresh_ids(REDRAW)["deliveries"])
        await asyncio.sleep(0.06)
        await left.aclose()
        await ingest_direct(api, with_fresh_ids(REDRAW)["deliveries"])
        revisions = await log_revisions(api)
        await wait_for(lambda: [c.revision for c in got] == revisions)
        task.cancel()


async def test_a_broken_shared_stream_leaves_no_task_behind(
    api: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `Watch` stream that breaks under the client's watches: they resume on a new stream,
    and nothing of the broken one is left running (gRPC's task sending its requests waited
    for ever for the next one, and, once collected, asyncio printed "Task was destroyed but
    it is pending!" and "aclose(): asynchronous generator is already running")."""
    from transaction_client import TransactionClient
    from transaction_service.errors import Unavailable

    streams: list[WatchStream] = []
    real_init = WatchStream.__init__

    def recorded(self: WatchStream, **kwargs: Any) -> None:
        real_init(self, **kwargs)
        streams.append(self)

    monkeypatch.setattr(WatchStream, "__init__", recorded)

    def senders() -> list[asyncio.Task[Any]]:
        return [
            t
            for t in asyncio.all_tasks()
            if "_consume_request_iterator" in repr(t.get_coro()) and not t.done()
        ]

    async with TransactionClient(f"127.0.0.1:{api.service.port}", watches_per_stream=10) as client:
        watch = client.watch_transactions(start_revision=0)
        got: list[Any] = []

        async def drain() -> None:
            async for item in watch:
                got.append(item)

        task = asyncio.create_task(drain())
        await ingest_direct(api, with_fresh_ids(REDRAW)["deliveries"])
        await wait_for(lambda: len(got) > 0)
        assert len(senders()) == 1
        streams[0].fail(Unavailable("the stream breaks"))
        await ingest_direct(api, with_fresh_ids(REDRAW)["deliveries"])
        revisions = await log_revisions(api)
        await wait_for(lambda: [c.revision for c in got] == revisions)
        assert len(streams) == 2
        assert watch.reconnects == 1
        await wait_for(lambda: len(senders()) == 1)
        task.cancel()
