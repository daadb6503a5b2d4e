"""The Junction API client against the fake Junction API: every endpoint, pagination, both status
spellings, and how it behaves when the provider misbehaves (429, 5xx, slow, down, refusing).

Backoff is asserted on the injected sleep, never on the clock."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest

from tests.conftest import SCENARIOS
from tests.fake_junction import FakeJunction
from transaction_service.junction.client import (
    JunctionBadResponse,
    JunctionClient,
    JunctionNotFound,
    JunctionPermanentError,
    JunctionRequestInvalid,
    JunctionTooLarge,
    JunctionUnavailable,
    RetryPolicy,
    junction_base_url,
)

NOW = datetime(2026, 3, 15, tzinfo=UTC)
REDRAW = next(s for s in SCENARIOS if s["scenario"] == "redraw_completed")
TRANSACTION_ID = REDRAW["expect"]["transaction_id"]
INITIAL_ID = REDRAW["expect"]["initial_order_id"]
REDRAW_ID = REDRAW["expect"]["redraw_order_id"]
POLICY = RetryPolicy(attempts=4, base_delay=1.0, max_delay=30.0, max_retry_after=60.0)


class RecordedSleep:
    """Stands in for asyncio.sleep: remembers each wait, waits for nothing."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


@pytest.fixture
def sleep() -> RecordedSleep:
    return RecordedSleep()


@pytest.fixture
def new_client(fake_junction: FakeJunction, sleep: RecordedSleep) -> Callable[..., JunctionClient]:
    def make(**overrides: Any) -> JunctionClient:
        options: dict[str, Any] = {
            "base_url": fake_junction.base_url,
            "api_key": fake_junction.api_key,
            "timeout": 5.0,
            "retry": POLICY,
            "sleep": sleep,
            "now": lambda: NOW,
            # The top of every jitter window: the backoff is then exactly its upper bound.
            "random": lambda: 1.0,
        }
        options.update(overrides)
        return JunctionClient(**options)

    return make


@pytest.fixture
async def client(new_client: Callable[..., JunctionClient]) -> AsyncIterator[JunctionClient]:
    async with new_client() as made:
        yield made


@pytest.fixture
def fake(fake_junction: FakeJunction) -> FakeJunction:
    """The fake, holding the redraw scenario as the API sees it once everything happened."""
    fake_junction.load_scenario(REDRAW)
    fake_junction.now = lambda: NOW
    return fake_junction


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


# --------------------------------------------------------------------------------------------------
# The endpoints
# --------------------------------------------------------------------------------------------------


async def test_an_order_is_read_as_the_same_object_a_webhook_carries(
    fake: FakeJunction, client: JunctionClient
) -> None:
    answer = await client.get_order(INITIAL_ID)

    webhook_data = next(
        d["body"]["data"] for d in REDRAW["deliveries"] if d["svix_id"] == "msg_pub-redraw_3"
    )
    assert answer.raw == webhook_data
    assert answer.order.id == INITIAL_ID
    assert answer.order.origin == "initial"
    assert answer.order.order_transaction is not None
    assert answer.order.order_transaction.id == TRANSACTION_ID
    [request] = fake.requests_to("order")
    assert request.path == f"/v3/order/{INITIAL_ID}"


@pytest.mark.parametrize("spelling", ["last_status", "low_level_status"])
async def test_an_order_transaction_is_read_in_either_status_spelling(
    fake: FakeJunction, client: JunctionClient, spelling: Any
) -> None:
    fake.status_spelling = spelling

    answer = await client.get_order_transaction(TRANSACTION_ID)

    assert all(spelling in entry for entry in answer.raw["orders"])
    transaction = answer.transaction
    assert transaction.id == TRANSACTION_ID
    assert transaction.status == "completed"
    assert transaction.team_id == REDRAW["deliveries"][0]["body"]["team_id"]
    statuses = {o.id: (o.origin, o.status, o.status_created_at) for o in transaction.orders}
    assert statuses == {
        INITIAL_ID: ("initial", "redraw_available", datetime(2026, 3, 6, 15, tzinfo=UTC)),
        REDRAW_ID: ("redraw", "completed", datetime(2026, 3, 12, 9, tzinfo=UTC)),
    }


async def test_combined_results_are_kept_byte_for_byte_with_their_status(
    fake: FakeJunction, client: JunctionClient
) -> None:
    final = await client.get_transaction_results(TRANSACTION_ID)
    assert final.is_final
    assert final.result_count == 1
    assert final.order_transaction is not None
    assert final.order_transaction.id == TRANSACTION_ID

    # Odd spacing and key order survive: what is stored is what the provider sent.
    partial = (
        b'{"metadata": {"status": "partial", "patient": "Jane Doe"},  "results": [{"name": "A"}],'
        b' "missing_results": [{"name": "B"}, {"name": "C"}]}'
    )
    fake.set_results(TRANSACTION_ID, partial)
    answer = await client.get_transaction_results(TRANSACTION_ID)
    assert answer.raw_json == partial
    assert (answer.status, answer.is_final) == ("partial", False)
    assert (answer.result_count, answer.missing_result_count) == (1, 2)
    assert answer.order_transaction is None


async def test_the_results_pdf_is_read_whole_in_chunks(
    fake: FakeJunction, client: JunctionClient
) -> None:
    pdf = b"%PDF-1.7\n" + bytes(range(256)) * 40
    fake.set_pdf(TRANSACTION_ID, pdf)

    chunks = await client.fetch_transaction_results_pdf(
        TRANSACTION_ID, max_bytes=len(pdf), chunk_size=4096
    )

    assert b"".join(chunks) == pdf
    assert [len(c) for c in chunks] == [4096, 4096, len(pdf) - 8192]
    [request] = fake.requests_to("transaction_result_pdf")
    assert request.headers["accept"] == "application/pdf"


async def test_a_pdf_takes_an_interactive_slot_never_a_shared_one(
    fake: FakeJunction, new_client: Callable[..., JunctionClient]
) -> None:
    fake.set_pdf(TRANSACTION_ID, b"x" * 100_000)
    async with new_client(max_concurrency=1, interactive_concurrency=1) as client:
        fake.hold("transaction_result_pdf")
        pdf = asyncio.create_task(
            client.fetch_transaction_results_pdf(TRANSACTION_ID, max_bytes=1 << 20)
        )
        async with asyncio.timeout(10):
            while not fake.requests_to("transaction_result_pdf"):
                await asyncio.sleep(0.01)
            # The PDF's request is held at Junction; the shared slot is free all the same.
            await client.get_order(INITIAL_ID)
        fake.release("transaction_result_pdf")
        async with asyncio.timeout(10):
            assert len(b"".join(await pdf)) == 100_000
            # And once it is read, its slot is back: a second PDF does not wait.
            await client.fetch_transaction_results_pdf(TRANSACTION_ID, max_bytes=1 << 20)


async def test_a_pdf_over_the_limit_is_not_read_further_and_gives_its_slot_back(
    fake: FakeJunction, new_client: Callable[..., JunctionClient]
) -> None:
    fake.set_pdf(TRANSACTION_ID, b"x" * 100_000)
    async with new_client(interactive_concurrency=1) as client:
        for _ in range(2):  # with the only slot leaked, the second would wait forever
            async with asyncio.timeout(10):
                with pytest.raises(JunctionTooLarge) as caught:
                    await client.fetch_transaction_results_pdf(TRANSACTION_ID, max_bytes=50_000)
            assert caught.value.limit == 50_000


def order_updated_at(index: int, updated_at: datetime) -> dict[str, Any]:
    return {
        "id": f"00000000-0000-0000-0000-{index:012d}",
        "created_at": (datetime(2026, 1, 1, tzinfo=UTC) + timedelta(hours=index)).isoformat(),
        "updated_at": updated_at.isoformat(),
        "events": [],
    }


async def test_orders_updated_in_a_window_are_paged_through_to_the_last_page(
    fake_junction: FakeJunction, client: JunctionClient
) -> None:
    start, end = datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 3, 10, tzinfo=UTC)
    inside = [order_updated_at(i, start + timedelta(days=i)) for i in range(7)]
    outside = [
        order_updated_at(100, start - timedelta(seconds=1)),
        order_updated_at(101, end + timedelta(seconds=1)),
    ]
    for order in [*reversed(inside), *outside]:
        fake_junction.add_order(order)

    pages = [page async for page in client.iter_orders_updated(start, end, page_size=3)]

    assert [len(p.orders) for p in pages] == [3, 3, 1]
    assert [o.order.id for p in pages for o in p.orders] == [o["id"] for o in inside]
    assert {p.total for p in pages} == {7}
    requests = fake_junction.requests_to("orders")
    assert [r.param("page") for r in requests] == ["1", "2", "3"]
    assert {r.param("size") for r in requests} == {"3"}
    assert {r.param("updated_start_date") for r in requests} == {"2026-03-01T00:00:00Z"}
    assert {r.param("updated_end_date") for r in requests} == {"2026-03-10T00:00:00Z"}


async def test_an_exactly_full_last_page_ends_the_walk_without_asking_for_more(
    fake_junction: FakeJunction, client: JunctionClient
) -> None:
    for i in range(4):
        fake_junction.add_order(order_updated_at(i, NOW - timedelta(hours=1)))

    pages = [page async for page in client.iter_orders_updated(NOW - timedelta(days=1))]
    assert [len(p.orders) for p in pages] == [4]

    pages = [p async for p in client.iter_orders_updated(NOW - timedelta(days=1), page_size=2)]
    assert [len(p.orders) for p in pages] == [2, 2]
    # Without an end, the window ends at the client's now, fixed for the whole walk.
    assert {r.param("updated_end_date") for r in fake_junction.requests_to("orders")} == {
        "2026-03-15T00:00:00Z"
    }
    assert len(fake_junction.requests_to("orders")) == 3


async def test_a_window_without_a_time_zone_is_refused_before_any_request(
    fake_junction: FakeJunction, client: JunctionClient
) -> None:
    with pytest.raises(JunctionRequestInvalid, match="start has no time zone"):
        async for _ in client.iter_orders_updated(datetime(2026, 3, 1)):
            pass
    assert fake_junction.requests == []


async def test_resend_events_names_the_orders_and_returns_what_junction_will_resend(
    fake: FakeJunction, client: JunctionClient
) -> None:
    resent = await client.resend_events([INITIAL_ID, REDRAW_ID])

    assert resent == [INITIAL_ID, REDRAW_ID]
    [request] = fake.requests_to("resend_events")
    assert request.method == "POST"
    assert request.json() == {"order_ids": [INITIAL_ID, REDRAW_ID]}


async def test_resend_events_over_a_window_of_up_to_60_days(
    fake: FakeJunction, client: JunctionClient
) -> None:
    start = NOW - timedelta(days=14)
    resent = await client.resend_events(start_at=start, end_at=NOW)

    assert sorted(resent) == sorted([INITIAL_ID, REDRAW_ID])
    [request] = fake.requests_to("resend_events")
    assert request.json() == {"start_at": "2026-03-01T00:00:00Z", "end_at": "2026-03-15T00:00:00Z"}

    # Without an end the window ends now (the provider's default), and may be 60 days long.
    await client.resend_events(start_at=NOW - timedelta(days=60))


@pytest.mark.parametrize(
    ("arguments", "complaint"),
    [
        ({}, "give order_ids, start_at, or both"),
        ({"order_ids": []}, "order_ids is empty"),
        ({"order_ids": [""]}, "order_ids is empty"),
        ({"end_at": NOW}, "end_at needs start_at"),
        ({"start_at": NOW - timedelta(days=60, seconds=1)}, "longer than the 60 days"),
        (
            {"start_at": NOW - timedelta(days=90), "end_at": NOW - timedelta(days=29)},
            "longer than the 60 days",
        ),
        ({"start_at": NOW + timedelta(days=1)}, "is after now"),
        ({"start_at": datetime(2026, 3, 1)}, "start_at has no time zone"),
    ],
)
async def test_a_resend_junction_would_refuse_is_refused_before_any_request(
    fake_junction: FakeJunction,
    client: JunctionClient,
    arguments: dict[str, Any],
    complaint: str,
) -> None:
    times = {k: v for k, v in arguments.items() if k != "order_ids"}
    with pytest.raises(JunctionRequestInvalid, match=complaint):
        await client.resend_events(arguments.get("order_ids"), **times)
    assert fake_junction.requests == []


# --------------------------------------------------------------------------------------------------
# When the provider misbehaves
# --------------------------------------------------------------------------------------------------


async def test_429_waits_the_seconds_retry_after_asks_then_retries(
    fake: FakeJunction, client: JunctionClient, sleep: RecordedSleep
) -> None:
    fake.fail("order", 429, retry_after=7)

    answer = await client.get_order(INITIAL_ID)

    assert answer.order.id == INITIAL_ID
    assert sleep.waits == [7.0]
    assert len(fake.requests_to("order")) == 2


async def test_429_with_retry_after_as_an_http_date(
    fake: FakeJunction, client: JunctionClient, sleep: RecordedSleep
) -> None:
    fake.fail("order_transaction", 429, retry_after=format_datetime(NOW + timedelta(seconds=42)))

    await client.get_order_transaction(TRANSACTION_ID)

    assert sleep.waits == [42.0]


async def test_429_without_retry_after_backs_off_like_a_5xx(
    fake: FakeJunction, client: JunctionClient, sleep: RecordedSleep
) -> None:
    fake.fail("order", 429, times=2)

    await client.get_order(INITIAL_ID)

    assert sleep.waits == [1.0, 2.0]


async def test_a_retry_after_longer_than_the_policy_waits_gives_up_at_once_saying_when(
    fake: FakeJunction, client: JunctionClient, sleep: RecordedSleep
) -> None:
    fake.fail("order", 429, retry_after=3600)

    with pytest.raises(JunctionUnavailable, match="retry after 3600 s") as caught:
        await client.get_order(INITIAL_ID)

    assert caught.value.retry_after == 3600.0
    assert sleep.waits == []
    assert len(fake.requests_to("order")) == 1


async def test_5xx_are_retried_with_exponential_backoff_then_succeed(
    fake: FakeJunction, client: JunctionClient, sleep: RecordedSleep
) -> None:
    fake.fail("order", 500, times=2)
    fake.fail("order", 503, times=1)

    answer = await client.get_order(REDRAW_ID)

    assert answer.order.id == REDRAW_ID
    assert sleep.waits == [1.0, 2.0, 4.0]
    assert len(fake.requests_to("order")) == 4


async def test_backoff_has_full_jitter_below_a_cap(
    fake: FakeJunction, new_client: Callable[..., JunctionClient], sleep: RecordedSleep
) -> None:
    fake.fail("order", 502, times=5)
    policy = RetryPolicy(attempts=6, base_delay=1.0, max_delay=5.0)
    async with new_client(retry=policy, random=lambda: 0.25) as client:
        await client.get_order(REDRAW_ID)

    # A quarter of min(cap, 1, 2, 4, 8, 16).
    assert sleep.waits == [0.25, 0.5, 1.0, 1.25, 1.25]


async def test_a_503_with_retry_after_waits_what_it_asks(
    fake: FakeJunction, client: JunctionClient, sleep: RecordedSleep
) -> None:
    fake.fail("transaction_result", 503, retry_after=12)

    await client.get_transaction_results(TRANSACTION_ID)

    assert sleep.waits == [12.0]


async def test_it_gives_up_after_the_retry_budget_with_unavailable(
    fake: FakeJunction, client: JunctionClient, sleep: RecordedSleep
) -> None:
    fake.fail("order_transaction", 503, times=10)

    with pytest.raises(JunctionUnavailable) as caught:
        await client.get_order_transaction(TRANSACTION_ID)

    error = caught.value
    assert str(error) == (
        f"GET /v3/order_transaction/{TRANSACTION_ID}: Junction is unavailable: "
        "4 attempts failed, the last with 503 Service Unavailable"
    )
    assert error.endpoint == "GET /v3/order_transaction/{transaction_id}"
    assert error.attempts == 4
    assert len(fake.requests_to("order_transaction")) == 4
    assert sleep.waits == [1.0, 2.0, 4.0]


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
async def test_a_permanent_4xx_raises_at_once_naming_endpoint_status_and_message(
    fake: FakeJunction, client: JunctionClient, sleep: RecordedSleep, status: int
) -> None:
    fake.fail("order", status, message="the provider explains " + "at length " * 60)

    with pytest.raises(JunctionPermanentError) as caught:
        await client.get_order(INITIAL_ID)

    error = caught.value
    assert isinstance(error, JunctionNotFound) == (status == 404)
    assert error.status == status
    assert str(error).startswith(f"GET /v3/order/{INITIAL_ID} answered {status} ")
    assert ": 'the provider explains at length" in str(error)
    # Cut: enough to act on, no more.
    assert "...'" in str(error)
    assert len(str(error)) < 400
    assert len(fake.requests_to("order")) == 1
    assert sleep.waits == []


async def test_a_validation_error_keeps_the_provider_reasons_but_not_the_values(
    fake: FakeJunction, client: JunctionClient
) -> None:
    detail = [
        {
            "loc": ["path", "order_id"],
            "msg": "Input should be a valid UUID",
            "input": "Jane Doe 1990-05-01",
        }
    ]
    fake.fail("order", 422, body=json.dumps({"detail": detail}).encode())

    with pytest.raises(JunctionPermanentError) as caught:
        await client.get_order(INITIAL_ID)

    assert "'path.order_id: Input should be a valid UUID'" in str(caught.value)
    assert "Jane" not in str(caught.value)


async def test_a_wrong_api_key_is_refused_for_good_with_a_hint(
    fake: FakeJunction, new_client: Callable[..., JunctionClient]
) -> None:
    async with new_client(api_key="sk_us_wrong") as client:
        with pytest.raises(JunctionPermanentError) as caught:
            await client.get_order(INITIAL_ID)

    assert caught.value.status == 401
    assert "'Invalid API key'" in str(caught.value)
    assert "check the API key" in str(caught.value)


async def test_a_slow_answer_times_out_and_is_retried(
    fake: FakeJunction, new_client: Callable[..., JunctionClient], sleep: RecordedSleep
) -> None:
    fake.slow("order", 30)

    async with new_client(timeout=0.3) as client:
        answer = await client.get_order(INITIAL_ID)

    assert answer.order.id == INITIAL_ID
    assert len(fake.requests_to("order")) == 2
    assert sleep.waits == [1.0]


async def test_a_dropped_connection_is_retried(
    fake: FakeJunction, client: JunctionClient, sleep: RecordedSleep
) -> None:
    fake.disconnect("order", times=2)

    await client.get_order(INITIAL_ID)

    assert len(fake.requests_to("order")) == 3
    assert sleep.waits == [1.0, 2.0]


async def test_an_unreachable_api_is_unavailable_after_the_budget(
    new_client: Callable[..., JunctionClient], sleep: RecordedSleep
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    async with new_client(base_url=f"http://127.0.0.1:{closed_port}") as client:
        with pytest.raises(JunctionUnavailable, match="the last with ConnectError") as caught:
            await client.get_order(INITIAL_ID)

    assert caught.value.attempts == 4
    assert len(sleep.waits) == 3


async def test_an_answer_of_the_wrong_shape_names_the_field_never_the_value(
    fake: FakeJunction, client: JunctionClient
) -> None:
    order = {
        "id": INITIAL_ID,
        "patient_details": {"first_name": "Jane"},
        "events": [{"id": "Jane's id", "created_at": "2026-03-01T10:00:00Z", "status": "x"}],
    }
    fake.fail("order", 200, body=json.dumps(order).encode())
    with pytest.raises(JunctionBadResponse, match=r"events\[0\]\.id") as caught:
        await client.get_order(INITIAL_ID)
    assert "Jane" not in str(caught.value)

    fake.fail("order", 200, body=b"<html>Jane</html>")
    with pytest.raises(JunctionBadResponse, match="not a JSON object") as caught:
        await client.get_order(INITIAL_ID)
    assert "Jane" not in str(caught.value)


async def test_an_id_cannot_reach_another_path_and_an_empty_one_is_refused(
    fake: FakeJunction, client: JunctionClient
) -> None:
    with pytest.raises(JunctionNotFound):
        await client.get_order("../order_transaction/" + TRANSACTION_ID)
    [request] = fake.requests_to("order")
    assert request.path == f"/v3/order/..%2Forder_transaction%2F{TRANSACTION_ID}"

    with pytest.raises(JunctionRequestInvalid, match="order_id is empty"):
        await client.get_order("")
    assert len(fake.requests) == 1

    # Issue 16, item 7: quoting leaves `.` and `..` as they are, and the URL would name the
    # parent path (`/v3/order_transaction/..` is `/v3/`): refused, nothing sent.
    for dots in (".", ".."):
        with pytest.raises(JunctionRequestInvalid, match="order_id must not be"):
            await client.get_order(dots)
        with pytest.raises(JunctionRequestInvalid, match="transaction_id must not be"):
            await client.get_order_transaction(dots)
        with pytest.raises(JunctionRequestInvalid, match="transaction_id must not be"):
            await client.get_transaction_results(dots)
        with pytest.raises(JunctionRequestInvalid, match="transaction_id must not be"):
            await client.fetch_transaction_results_pdf(dots, max_bytes=1 << 20)
    assert len(fake.requests) == 1


# --------------------------------------------------------------------------------------------------
# Concurrency, and the key
# --------------------------------------------------------------------------------------------------


async def test_the_concurrency_cap_is_never_exceeded(
    fake: FakeJunction, new_client: Callable[..., JunctionClient]
) -> None:
    fake.hold("order")
    async with new_client(max_concurrency=3) as client:
        calls = [asyncio.create_task(client.get_order(INITIAL_ID)) for _ in range(10)]
        # Held at the fake: once three are in, a fourth could only come if the cap let it.
        await wait_for(lambda: fake.in_flight >= 3)
        fake.release("order")
        answers = await asyncio.gather(*calls)

    assert len(answers) == 10
    assert len(fake.requests_to("order")) == 10
    assert fake.max_in_flight == 3


async def test_a_request_waiting_to_retry_does_not_hold_a_slot(
    fake: FakeJunction, new_client: Callable[..., JunctionClient]
) -> None:
    retry_may_go = asyncio.Event()
    waits = []

    async def sleep_until_told(seconds: float) -> None:
        waits.append(seconds)
        await retry_may_go.wait()

    fake.fail("order", 500)
    async with new_client(max_concurrency=1, sleep=sleep_until_told) as client:
        first = asyncio.create_task(client.get_order(INITIAL_ID))
        await wait_for(lambda: waits == [1.0])
        # The first call is backing off: the only slot is free for another.
        async with asyncio.timeout(10):
            await client.get_order(REDRAW_ID)
        retry_may_go.set()
        await first


async def test_the_api_key_is_sent_on_every_request_and_never_logged_or_echoed(
    fake: FakeJunction,
    client: JunctionClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.fail("order", 500)
    fake.fail("order_transaction", 403, message=f"key {fake.api_key} may not read this")

    await client.get_order(INITIAL_ID)
    with pytest.raises(JunctionPermanentError) as caught:
        await client.get_order_transaction(TRANSACTION_ID)
    await client.get_transaction_results(TRANSACTION_ID)

    assert {r.headers.get("x-vital-api-key") for r in fake.requests} == {fake.api_key}
    assert fake.api_key not in str(caught.value)
    assert "key [api key] may not read this" in str(caught.value)
    assert fake.api_key not in repr(client)
    assert "order/{order_id}: 500 Internal Server Error; retry 1 of 3" in caplog.text
    assert fake.api_key not in caplog.text
    # Bodies are health data: nothing of them reaches a log line.
    assert "Jane" not in caplog.text
    assert "Glucose" not in caplog.text


@pytest.mark.parametrize(
    ("region", "environment", "base_url"),
    [
        ("us", "production", "https://api.us.junction.com"),
        ("eu", "production", "https://api.eu.junction.com"),
        ("us", "sandbox", "https://api.sandbox.us.junction.com"),
        ("eu", "sandbox", "https://api.sandbox.eu.junction.com"),
    ],
)
def test_the_base_url_follows_region_and_environment(
    region: str, environment: str, base_url: str
) -> None:
    assert junction_base_url(region, environment) == base_url
    assert junction_base_url(region, environment, explicit="http://127.0.0.1:9/") == (
        "http://127.0.0.1:9"
    )


def test_an_unknown_region_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match="regions are us, eu; environments are production, sa"):
        junction_base_url("ap", "production")
