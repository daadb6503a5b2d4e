"""Issue 16, item 5: read amplification and the Junction budget, against real server processes.

- BatchGetTransactions of 500 lookups of one large transaction, 8 at once: refused with
  RESOURCE_EXHAUSTED while the server's memory grows by a bounded amount (about the response
  cap per call, not the 50 MB each built before); a batch within the cap answers every lookup,
  duplicates included, in order.
- GetTransactionResultsPdf: stalled readers hold no slot of Junction's requests, so
  ReconcileTransaction is not held up behind them; past the PDF budget the caller gets
  RESOURCE_EXHAUSTED with a retry hint; a transaction the service does not know never causes a
  request to Junction.

Bounds, not times, are asserted: the machine is shared.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from tests.conftest import database
from tests.fake_junction import FakeJunction
from tests.harness import error_info
from tests.process import running_server, server_env
from tests.read_tools import (
    BATCH_LOOKUPS,
    StalledReader,
    batch_attack,
    ingest_large,
    known_transaction,
)
from tests.test_abuse_ingest import retry_delay
from tests.test_grpc_api import largest_view
from transaction_service.api.wire import TransactionEncoder
from transaction_service.store.base import TransactionSnapshot
from transactions.v1 import transactions_pb2 as pb
from transactions.v1 import transactions_pb2_grpc as pb_grpc

MiB = 1 << 20
MAX_MESSAGE_BYTES = 4 * MiB
DEADLINE = 60.0


@pytest.mark.parametrize("store_kind", ["sqlite", "postgres"])
async def test_batches_of_a_large_transaction_are_refused_with_bounded_memory(
    tmp_path: Path, store_kind: str
) -> None:
    with (
        database(store_kind, tmp_path) as db,
        running_server(tmp_path, "--grpc-port", "0", "--db", db) as server,
    ):
        attack = await batch_attack(server.address, server.process.pid, calls=8, rounds=2)
    # Each answer would be 500 x 100 KB: over the 4 MiB cap, and refused as such.
    assert attack.transaction_bytes > 90_000
    assert set(attack.codes) == {"RESOURCE_EXHAUSTED"}
    # Before: each call built the whole 50 MB response first (8 at once: +3.1 GB). Now at most
    # about one response's worth each (measured: +36 MiB for 8); the bound is generous.
    assert attack.growth < 8 * MAX_MESSAGE_BYTES * 4, attack.summary()


@pytest.mark.parametrize("store_kind", ["sqlite", "postgres"])
async def test_batches_of_many_large_transactions_stop_reading_past_the_cap(
    tmp_path: Path, store_kind: str
) -> None:
    with (
        database(store_kind, tmp_path) as db,
        running_server(tmp_path, "--grpc-port", "0", "--db", db) as server,
    ):
        attack = await batch_attack(
            server.address, server.process.pid, calls=8, rounds=2, distinct=100
        )
    assert set(attack.codes) == {"RESOURCE_EXHAUSTED"}
    # Before: every call read, decoded and converted all 100 (8 at once: +3.5 GB). Now the
    # read stops once the transactions found pass the cap (measured: +250 MiB for 8, most of
    # it the allocator's, not held); the bound is generous.
    assert attack.growth < 768 * MiB, attack.summary()


@pytest.mark.parametrize("store_kind", ["sqlite", "postgres"])
async def test_a_batch_within_the_cap_answers_every_lookup_and_one_past_it_is_refused(
    tmp_path: Path, store_kind: str
) -> None:
    with (
        database(store_kind, tmp_path) as db,
        running_server(tmp_path, "--grpc-port", "0", "--db", db) as server,
    ):
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.TransactionServiceStub(channel)
            order_id = await ingest_large(stub)
            one = await stub.GetTransaction(
                pb.GetTransactionRequest(order_id=order_id), timeout=DEADLINE
            )
            lookup = pb.GetTransactionRequest(order_id=order_id)
            missing = pb.GetTransactionRequest(transaction_id="nobody")
            # Results take the transaction's size plus a few bytes of framing each.
            fits = MAX_MESSAGE_BYTES // (one.transaction.ByteSize() + 16) - 1
            lookups = [lookup, missing] * (fits // 2)
            answer = await stub.BatchGetTransactions(
                pb.BatchGetTransactionsRequest(lookups=lookups), timeout=DEADLINE
            )
            assert [r.found for r in answer.results] == [True, False] * (fits // 2)
            assert all(r.transaction == one.transaction for r in answer.results[::2]), (
                "every duplicate lookup answered with the transaction"
            )
            assert answer.revision >= one.transaction.revision

            too_many = [lookup] * (fits + 5)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.BatchGetTransactions(
                    pb.BatchGetTransactionsRequest(lookups=too_many), timeout=DEADLINE
                )
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_message_bytes" in (caught.value.details() or "")
            assert len(too_many) <= BATCH_LOOKUPS


# -- GetTransactionResultsPdf ---------------------------------------------------------------------

API_KEY = "abuse-reads-junction-key"


def junction_env(fake: FakeJunction, **settings: str) -> dict[str, str]:
    return server_env(
        TRANSACTION_SERVICE_JUNCTION_API_KEY=API_KEY,
        TRANSACTION_SERVICE_JUNCTION_BASE_URL=fake.base_url,
        **{f"TRANSACTION_SERVICE_{name.upper()}": value for name, value in settings.items()},
    )


async def read_pdf(stub: pb_grpc.TransactionServiceStub, **lookup: str) -> bytes:
    chunks = [
        m.chunk
        async for m in stub.GetTransactionResultsPdf(
            pb.GetTransactionResultsPdfRequest(**lookup), timeout=DEADLINE
        )
    ]
    return b"".join(chunks)


async def pdf_error(stub: pb_grpc.TransactionServiceStub, **lookup: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read_pdf(stub, **lookup)
    return caught.value


async def until(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.05)


async def test_stalled_pdf_readers_hold_no_junction_request_and_do_not_delay_reconcile(
    tmp_path: Path,
) -> None:
    """4 GetTransactionResultsPdf calls that never read (the issue's 4 stalled streams, which
    took all 4 of Junction's request slots, so ReconcileTransaction went from 0.9 s to its 20 s
    deadline): their PDFs are fetched whole and their requests to Junction end while the
    readers still stall; reconcile goes through; a fifth PDF call is refused for the budget."""
    with FakeJunction(api_key=API_KEY) as fake:
        env = junction_env(fake, results_pdf_max_calls="4")
        db = str(tmp_path / "x.db")
        with running_server(tmp_path, "--grpc-port", "0", "--db", db, env=env) as server:
            host, port = server.address.rsplit(":", 1)
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = pb_grpc.TransactionServiceStub(channel)
                transaction_id = await known_transaction(stub, fake, pdf_bytes=1 << 20)
                request = pb.GetTransactionResultsPdfRequest(transaction_id=transaction_id)
                stalled = [StalledReader(host, int(port), request) for _ in range(4)]
                try:
                    await until(
                        lambda: len(fake.requests_to("transaction_result_pdf")) == 4,
                        "the 4 PDF requests reach Junction",
                    )
                    # Each PDF is read whole; no request to Junction stays open for a reader.
                    await until(lambda: fake.in_flight == 0, "Junction's requests end")
                    assert not any(reader.ended.is_set() for reader in stalled)

                    answer = await stub.ReconcileTransaction(
                        pb.ReconcileTransactionRequest(transaction_id=transaction_id),
                        timeout=DEADLINE,
                    )
                    assert answer.transaction.id == transaction_id

                    refused = await pdf_error(stub, transaction_id=transaction_id)
                    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    info = error_info(refused)
                    assert info.reason == "PDF_BUDGET_EXHAUSTED"
                    assert info.metadata["limit"] == "results_pdf_max_calls"
                    assert retry_delay(refused) == 1.0
                    assert len(fake.requests_to("transaction_result_pdf")) == 4
                finally:
                    for reader in stalled:
                        reader.close()
                # A reader gone gives its place back.
                await until_answered(stub, transaction_id)


async def until_answered(stub: pb_grpc.TransactionServiceStub, transaction_id: str) -> bytes:
    """The PDF, asked for until the budget has room (a condition, not a time)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        try:
            return await read_pdf(stub, transaction_id=transaction_id)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_pdf_calls_past_the_rate_are_refused_with_when_to_retry(tmp_path: Path) -> None:
    with FakeJunction(api_key=API_KEY) as fake:
        env = junction_env(fake, results_pdf_calls_per_minute="3")
        db = str(tmp_path / "x.db")
        with running_server(tmp_path, "--grpc-port", "0", "--db", db, env=env) as server:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = pb_grpc.TransactionServiceStub(channel)
                transaction_id = await known_transaction(stub, fake, pdf_bytes=200_000)
                for _ in range(3):
                    pdf = await read_pdf(stub, transaction_id=transaction_id)
                    assert len(pdf) > 200_000
                refused = await pdf_error(stub, transaction_id=transaction_id)
                assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                info = error_info(refused)
                assert info.reason == "PDF_BUDGET_EXHAUSTED"
                assert info.metadata["limit"] == "results_pdf_calls_per_minute"
                assert 1.0 < retry_delay(refused) <= 60.0
                assert len(fake.requests_to("transaction_result_pdf")) == 3


async def test_an_unknown_transaction_never_reaches_junction(tmp_path: Path) -> None:
    with FakeJunction(api_key=API_KEY) as fake:
        env = junction_env(fake)
        db = str(tmp_path / "x.db")
        with running_server(tmp_path, "--grpc-port", "0", "--db", db, env=env) as server:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = pb_grpc.TransactionServiceStub(channel)
                transaction_id = await known_transaction(stub, fake, pdf_bytes=1000)
                # Junction knows this one; the service does not.
                fake.set_pdf("known-to-junction-only", b"%PDF-1.4\n")
                for lookup in (
                    {"transaction_id": "known-to-junction-only"},
                    {"order_id": "known-to-junction-only"},
                    *({"transaction_id": f"unknown-{i}"} for i in range(40)),
                ):
                    error = await pdf_error(stub, **lookup)
                    assert error.code() == grpc.StatusCode.NOT_FOUND
                assert fake.requests_to("transaction_result_pdf") == []
                # The budget was not spent on them either (30 a minute by default).
                assert await read_pdf(stub, transaction_id=transaction_id)


async def test_a_pdf_call_ends_at_its_deadline_and_an_oversize_pdf_is_refused(
    tmp_path: Path,
) -> None:
    with FakeJunction(api_key=API_KEY) as fake:
        env = junction_env(
            fake,
            results_pdf_max_calls="1",
            results_pdf_call_seconds="2",
            results_pdf_max_bytes="300000",
        )
        db = str(tmp_path / "x.db")
        with running_server(tmp_path, "--grpc-port", "0", "--db", db, env=env) as server:
            host, port = server.address.rsplit(":", 1)
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = pb_grpc.TransactionServiceStub(channel)
                transaction_id = await known_transaction(stub, fake, pdf_bytes=200_000)
                request = pb.GetTransactionResultsPdfRequest(transaction_id=transaction_id)
                reader = StalledReader(host, int(port), request)
                try:
                    await until(
                        lambda: len(fake.requests_to("transaction_result_pdf")) == 1,
                        "the stalled call's PDF request",
                    )
                    # The stalled call has the only place; past its deadline it is given back
                    # although the reader never reads.
                    pdf = await until_answered(stub, transaction_id)
                    assert len(pdf) > 200_000
                    assert not reader.ended.is_set() or reader.status != "OK"
                finally:
                    reader.close()

                # A caller that reads only after the deadline: DEADLINE_EXCEEDED, naming the
                # setting, after what it was sent before.
                late = StalledReader(host, int(port), request)
                try:
                    await until(
                        lambda: len(fake.requests_to("transaction_result_pdf")) == 3,
                        "the late reader's PDF request",
                    )
                    await asyncio.sleep(3)  # past the call's 2 s, however fast the machine
                    late.resume()
                    await until(late.ended.is_set, "the late reader's call ends")
                    assert late.status == "DEADLINE_EXCEEDED"
                    assert 0 < late.received < 200_000
                finally:
                    late.close()

                fake.set_pdf(transaction_id, b"%PDF-1.4\n" + b"x" * 400_000)
                for _ in range(2):  # the place is given back after a refusal too
                    error = await pdf_error(stub, transaction_id=transaction_id)
                    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert "TRANSACTION_SERVICE_RESULTS_PDF_MAX_BYTES" in (error.details() or "")


def test_the_cache_of_serialized_transactions_is_bounded_by_bytes() -> None:
    """Reads of many large transactions must not make the server keep each one's bytes: the
    cache of serialized transactions (one per revision) is bounded by bytes as well as count."""
    view = largest_view("x")
    one = len(TransactionEncoder().encode(TransactionSnapshot(view, 1)))
    assert one > 400_000
    encoder = TransactionEncoder(max_bytes=3 * one)
    for revision in range(1, 21):
        assert len(encoder.encode(TransactionSnapshot(view, revision))) == one
        assert encoder.cached_bytes <= 3 * one
    assert encoder.cached_bytes == 3 * one  # the newest three
