"""Issue 16, item 5: reads that amplify, measured against real server processes.
`tests/test_abuse_reads.py` asserts the bounds with these; `bench/abuse_reads.py` measures with
them, before and after a change.

Nothing here knows the server's limits: each attack reports what the server did (answers,
codes, its resident memory), and the caller judges.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import statistics
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import grpc

from tests.abuse_tools import RssPeak, grpc_headers, h2_connection, rss_bytes
from tests.conftest import SCENARIOS
from tests.fake_junction import FakeJunction
from tests.scenario_tools import with_fresh_ids
from transactions.v1 import transactions_pb2 as pb
from transactions.v1 import transactions_pb2_grpc as pb_grpc

BATCH_LOOKUPS = 500


def large_transaction_body(orders: int = 50, id_length: int = 1000) -> dict[str, Any]:
    """An order's `created` webhook whose transaction block lists `orders` orders with ids of
    `id_length` characters: a transaction of about 100 KB on the wire with the defaults, fresh
    ids each call. The first order is the carrying one."""
    body = json.loads(json.dumps(SCENARIOS[0]["deliveries"][0]["body"]))
    stamp = uuid.uuid4().hex
    data = body["data"]
    block = data["order_transaction"]
    first = block["orders"][0]
    ids = [f"{i:04d}-{stamp}-".ljust(id_length, "x") for i in range(orders)]
    data["id"] = ids[0]
    block["id"] = f"txn-{stamp}"
    parent = f"parent-{stamp}-".ljust(id_length, "x")
    block["orders"] = [dict(first, id=order_id, parent_id=parent) for order_id in ids]
    return body


async def ingest_large(stub: pb_grpc.TransactionServiceStub, metadata: Any = None) -> str:
    """One large transaction ingested; the order id of its carrying order."""
    body = large_transaction_body()
    await stub.IngestEvent(
        pb.IngestEventRequest(event_id=f"large-{uuid.uuid4().hex}", payload_json=json.dumps(body)),
        metadata=metadata,
        timeout=60,
    )
    return str(body["data"]["id"])


@dataclass
class BatchAttack:
    """What concurrent worst-case BatchGetTransactions calls did to the server."""

    calls: int
    transaction_bytes: int
    codes: list[str]
    baseline_rss: int
    peak_rss: int

    @property
    def growth(self) -> int:
        return self.peak_rss - self.baseline_rss

    def summary(self) -> dict[str, object]:
        return {
            "calls": self.calls,
            "transaction_kib": round(self.transaction_bytes / 1024, 1),
            "codes": sorted(set(self.codes)),
            "peak_rss_growth_mib": round(self.growth / 2**20, 1),
        }


async def batch_attack(
    address: str,
    pid: int,
    *,
    calls: int = 8,
    rounds: int = 3,
    distinct: int = 1,
    metadata: Any = None,
) -> BatchAttack:
    """`calls` concurrent BatchGetTransactions of 500 lookups of `distinct` large transactions
    (in turn), `rounds` times over; the server's peak resident memory against what it was
    before."""
    async with grpc.aio.insecure_channel(
        address, options=[("grpc.max_receive_message_length", 64 << 20)]
    ) as channel:
        stub = pb_grpc.TransactionServiceStub(channel)
        order_ids = [await ingest_large(stub, metadata) for _ in range(distinct)]
        one = await stub.GetTransaction(
            pb.GetTransactionRequest(order_id=order_ids[0]), metadata=metadata, timeout=60
        )
        request = pb.BatchGetTransactionsRequest(
            lookups=[
                pb.GetTransactionRequest(order_id=order_ids[i % distinct])
                for i in range(BATCH_LOOKUPS)
            ]
        )

        async def call() -> str:
            try:
                await stub.BatchGetTransactions(request, metadata=metadata, timeout=120)
            except grpc.aio.AioRpcError as exc:
                return exc.code().name
            return "OK"

        # Settle: what a first call allocates for good (caches, arenas) is not the attack's.
        await call()
        await asyncio.sleep(1)
        baseline = rss_bytes(pid)
        codes: list[str] = []
        with RssPeak(pid, interval=0.02) as peak:
            for _ in range(rounds):
                codes += await asyncio.gather(*(call() for _ in range(calls)))
        return BatchAttack(calls, one.transaction.ByteSize(), codes, baseline, peak.peak)


# -- GetTransactionResultsPdf --------------------------------------------------------------------

PDF_METHOD = "/transactions.v1.TransactionService/GetTransactionResultsPdf"
REDRAW = next(s for s in SCENARIOS if s["scenario"] == "redraw_completed")


class StalledReader:
    """A GetTransactionResultsPdf call on a raw HTTP/2 connection that never lets a byte of the
    answer come (its stream's flow-control window is 0), but otherwise behaves: it answers the
    server's pings, so it is a live client that does not read. A thread watches the connection
    and records how the call ended, if it does (`status`: the grpc-status, "RST_STREAM" or
    "closed")."""

    def __init__(self, host: str, port: int, request: pb.GetTransactionResultsPdfRequest) -> None:
        self._stack = contextlib.ExitStack()
        self._sock, self._conn = self._stack.enter_context(h2_connection(host, port))
        self.status: str | None = None
        self.ended = threading.Event()
        # Once `resume()` is called, it reads: received data is acknowledged (the window
        # opens again) and counted.
        self.reading = False
        self.received = 0
        self._lock = threading.Lock()
        import h2.settings

        conn: Any = self._conn
        conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        message = request.SerializeToString()
        conn.send_headers(1, grpc_headers(host, PDF_METHOD))
        conn.send_data(1, b"\x00" + len(message).to_bytes(4, "big") + message, end_stream=True)
        self._sock.sendall(conn.data_to_send())
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        import h2.events
        import h2.exceptions

        conn: Any = self._conn
        try:
            while True:
                data = self._sock.recv(65536)
                if not data:
                    self._end("closed")
                    return
                with self._lock:
                    try:
                        events = conn.receive_data(data)
                    except h2.exceptions.ProtocolError:
                        self._end("closed")
                        return
                for event in events:
                    if isinstance(event, h2.events.DataReceived) and event.stream_id == 1:
                        self.received += len(event.data)
                        if self.reading:
                            with self._lock:
                                conn.acknowledge_received_data(
                                    event.flow_controlled_length, event.stream_id
                                )
                    if isinstance(event, h2.events.TrailersReceived | h2.events.ResponseReceived):
                        headers = dict(event.headers)
                        status = headers.get(b"grpc-status")
                        if status is not None:
                            self._end(status_name(int(status)))
                    elif isinstance(event, h2.events.StreamReset):
                        self._end("RST_STREAM")
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        self._end("closed")
                with self._lock:
                    self._sock.sendall(conn.data_to_send())
        except OSError:
            self._end("closed")

    def resume(self) -> None:
        """Start reading: open the stream's window, and keep it open."""
        conn: Any = self._conn
        with self._lock:
            self.reading = True
            conn.increment_flow_control_window(1 << 20, stream_id=1)
            self._sock.sendall(conn.data_to_send())

    def _end(self, status: str) -> None:
        if self.status is None:
            self.status = status
        self.ended.set()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the thread's recv
        self._stack.close()
        self._thread.join(timeout=10)


def status_name(code: int) -> str:
    return next((c.name for c in grpc.StatusCode if c.value[0] == code), str(code))


async def known_transaction(
    stub: pb_grpc.TransactionServiceStub, fake: FakeJunction, pdf_bytes: int, metadata: Any = None
) -> str:
    """A completed redraw transaction, fresh ids, known to the service (its webhooks ingested)
    and to the fake Junction (with a PDF of `pdf_bytes`); its id."""
    scenario = with_fresh_ids(REDRAW)
    for delivery in scenario["deliveries"]:
        await stub.IngestEvent(
            pb.IngestEventRequest(
                event_id=delivery["svix_id"], payload_json=json.dumps(delivery["body"])
            ),
            metadata=metadata,
            timeout=60,
        )
    fake.load_scenario(scenario)
    transaction_id = str(scenario["expect"]["transaction_id"])
    fake.set_pdf(transaction_id, b"%PDF-1.4\n" + b"x" * pdf_bytes)
    return transaction_id


async def reconcile_seconds(
    stub: pb_grpc.TransactionServiceStub, transaction_id: str, timeout: float, metadata: Any = None
) -> float | str:
    """One ReconcileTransaction's seconds, or the code it failed with."""
    started = time.monotonic()
    try:
        await stub.ReconcileTransaction(
            pb.ReconcileTransactionRequest(transaction_id=transaction_id),
            metadata=metadata,
            timeout=timeout,
        )
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    return round(time.monotonic() - started, 3)


async def stalled_pdf_readers(
    fake: FakeJunction,
    address: str,
    *,
    readers: int = 4,
    pdf_bytes: int = 1 << 20,
    deadline: float = 20.0,
    metadata: Any = None,
) -> dict[str, object]:
    """ReconcileTransaction's latency alone (median of 5), then while `readers` PDF calls stall
    (each on its own connection, none reading); what the stalled calls got, and how many PDF
    requests reached Junction. Then 20 PDF calls for an unknown transaction."""
    host, port = address.rsplit(":", 1)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.TransactionServiceStub(channel)
        transaction_id = await known_transaction(stub, fake, pdf_bytes, metadata)
        alone = [
            await reconcile_seconds(stub, transaction_id, deadline, metadata) for _ in range(5)
        ]
        pdf_before = len(fake.requests_to("transaction_result_pdf"))
        request = pb.GetTransactionResultsPdfRequest(transaction_id=transaction_id)
        stalled = [StalledReader(host, int(port), request) for _ in range(readers)]
        try:
            # Until each has reached Junction or been answered (refused), or 10 s passed.
            settle = time.monotonic() + 10
            while time.monotonic() < settle:
                reached = len(fake.requests_to("transaction_result_pdf")) - pdf_before
                if reached + sum(r.ended.is_set() for r in stalled) >= readers:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            during = await reconcile_seconds(stub, transaction_id, deadline, metadata)
            statuses = [r.status or "open" for r in stalled]
        finally:
            for reader in stalled:
                reader.close()
        reached = len(fake.requests_to("transaction_result_pdf")) - pdf_before
        unknown_codes = []
        for i in range(20):
            try:
                async for _ in stub.GetTransactionResultsPdf(
                    pb.GetTransactionResultsPdfRequest(transaction_id=f"unknown-{i}"),
                    metadata=metadata,
                    timeout=30,
                ):
                    pass
                unknown_codes.append("OK")
            except grpc.aio.AioRpcError as exc:
                unknown_codes.append(exc.code().name)
        unknown_reached = len(fake.requests_to("transaction_result_pdf")) - pdf_before - reached
    numbers = [s for s in alone if isinstance(s, float)]
    return {
        "reconcile_alone_s": round(statistics.median(numbers), 3) if numbers else alone,
        "reconcile_with_stalled_s": during,
        "stalled_calls": sorted(set(statuses)),
        "stalled_counts": {s: statuses.count(s) for s in set(statuses)},
        "pdf_requests_to_junction": reached,
        "unknown_codes": sorted(set(unknown_codes)),
        "unknown_requests_to_junction": unknown_reached,
    }
