"""Attacks on the edge (issue 16, items 1 and 2), measured against a real server process: what
each costs the server, so a change can be compared before and after with the same command.

Run: `.venv/bin/python bench/abuse.py [--only http,unauth,streams,reset] [--json PATH]
[--set name=value ...]` (`--set` passes a setting to every server, e.g.
`--set http_body_timeout_seconds=3`; a setting the server does not know is only warned about,
so the same command runs on an older commit).

Rows (each on a fresh server, SQLite, as `transaction-service serve` in a process of its own;
the attacks come from this process: raw asyncio sockets and the `h2` library, see
tests/abuse_tools.py):
 http    1,000 connections sending a request head a byte every 2 s, plus 1,000 connections each
         sending a webhook head for a 1 MiB body and then the body 32 KiB a second; one
         correctly signed webhook and 5 gRPC health checks sent 1 s after all are open. Peak
         resident memory growth, memory left 3 s after the client closed what was still open,
         the signed webhook's status and time, and how long the server held the attackers (the
         attack ends when every one was closed, or after 60 s).
 unauth  tokens on; IngestEvent without a token whose payload is a 3.9 MiB Struct of 170,000
         fields: server CPU for one call, peak memory growth with 6 in flight, and
         GetTransaction latency (with a token, one at a time) while they are.
 streams 5,000 WatchTransactions calls on one connection, with a read token: the
         MAX_CONCURRENT_STREAMS the server advertises, and how many streams it had open at once.
 reset   150,000 streams opened and reset at once (HEADERS then RST_STREAM) on one
         connection: the server's CPU time for them, and GetTransaction latency meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import struct_pb2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# bench/bench.py (the script's folder is on sys.path, and a module wins over a namespace package).
from bench import LISTENING, Process
from tests.abuse_tools import (
    MiB,
    RssPeak,
    cpu_seconds,
    http_flood,
    rapid_reset,
    rss_bytes,
    server_settings,
)
from tests.conftest import SCENARIOS
from tests.webhook_tools import SECRET, metric, request
from transactions.v1 import transactions_pb2 as pb
from transactions.v1 import transactions_pb2_grpc as pb_grpc

HTTP_LISTENING = re.compile(r"http listening on \S+:(\d+)")
INGEST_TOKEN = "bench-ingest-token-0123456789"
READ_TOKEN = "bench-read-token-0123456789"
SERVICE = "/transactions.v1.TransactionService"


@contextmanager
def serve(
    folder: Path, extra: dict[str, str], **settings: str
) -> Iterator[tuple[Process, int, int]]:
    """A server on a fresh SQLite file; (process, gRPC port, HTTP port)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSACTION_SERVICE_")}
    env |= {f"TRANSACTION_SERVICE_{k.upper()}": v for k, v in (settings | extra).items()}
    db = folder / f"abuse-{time.monotonic_ns()}.db"
    args = [sys.executable, "-m", "transaction_service", "serve"]
    process = Process([*args, "--grpc-port", "0", "--http-port", "0", "--db", str(db)], env=env)
    try:
        grpc_port = int(process.wait_for(LISTENING).group(1))
        http_port = int(process.wait_for(HTTP_LISTENING).group(1))
        yield process, grpc_port, http_port
    finally:
        process.stop()


def token(value: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {value}"),)


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


async def reads_until(
    stub: Any, order_id: str, done: asyncio.Event, pause: float = 0.01
) -> list[float]:
    """GetTransaction one at a time, `pause` s apart, until `done`; each call's seconds."""
    latencies: list[float] = []
    while not done.is_set():
        started = time.monotonic()
        try:
            await stub.GetTransaction(
                pb.GetTransactionRequest(order_id=order_id), metadata=token(READ_TOKEN), timeout=60
            )
            latencies.append(time.monotonic() - started)
        except grpc.aio.AioRpcError:
            latencies.append(float("inf"))
        await asyncio.sleep(pause)
    return latencies


def latency_summary(latencies: list[float]) -> dict[str, float]:
    """Calls, failed calls, and the median and highest latency of the others."""
    answered = [s for s in latencies if s != float("inf")]
    return {
        "calls": len(latencies),
        "failed": len(latencies) - len(answered),
        "p50_ms": ms(statistics.median(answered)) if answered else 0.0,
        "max_ms": ms(max(answered)) if answered else 0.0,
    }


@contextlib.asynccontextmanager
async def with_transaction(grpc_port: int) -> Any:
    """A channel and stub to the server, one delivery ingested; (stub, an order id of it)."""
    delivery = SCENARIOS[0]["deliveries"][0]
    body = struct_pb2.Struct()
    body.update(delivery["body"])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = pb_grpc.TransactionServiceStub(channel)
        await stub.IngestEvent(
            pb.IngestEventRequest(event_id=delivery["svix_id"], payload=body),
            metadata=token(INGEST_TOKEN),
        )
        yield channel, stub, delivery["body"]["data"]["id"]


async def row_http(folder: Path, extra: dict[str, str]) -> dict[str, Any]:
    body = json.dumps(SCENARIOS[0]["deliveries"][0]["body"]).encode()
    with serve(folder, extra, webhook_secrets=SECRET) as (process, grpc_port, http_port):
        report = await http_flood(
            pid=process.process.pid,
            host="127.0.0.1",
            http_port=http_port,
            grpc_address=f"127.0.0.1:{grpc_port}",
            secret=SECRET,
            body=body,
        )
    return report.summary()


def wide_struct(fields: int) -> bytes:
    payload = struct_pb2.Struct()
    payload.update({f"field{i:06d}": "value" for i in range(fields)})
    return pb.IngestEventRequest(event_id="wide", payload=payload).SerializeToString()


async def row_unauth(folder: Path, extra: dict[str, str]) -> dict[str, Any]:
    request_bytes = wide_struct(170_000)
    tokens = {"ingest_tokens": INGEST_TOKEN, "read_tokens": READ_TOKEN}
    with serve(folder, extra, **tokens) as (process, grpc_port, _):
        pid = process.process.pid
        async with with_transaction(grpc_port) as (channel, stub, order_id):
            ingest = channel.unary_unary(f"{SERVICE}/IngestEvent")

            async def unauthenticated() -> str:
                try:
                    await ingest(request_bytes, timeout=120)
                except grpc.aio.AioRpcError as error:
                    return error.code().name
                return "OK"

            await stub.GetTransaction(
                pb.GetTransactionRequest(order_id=order_id), metadata=token(READ_TOKEN)
            )
            before_cpu = cpu_seconds(pid)
            code = await unauthenticated()
            one_cpu = cpu_seconds(pid) - before_cpu
            await asyncio.sleep(1)
            rss_before = rss_bytes(pid)
            done = asyncio.Event()
            reads = asyncio.create_task(reads_until(stub, order_id, done))
            await asyncio.sleep(0.3)
            with RssPeak(pid, 0.02) as peak:
                codes = await asyncio.gather(*(unauthenticated() for _ in range(6)))
            done.set()
            latencies = await reads
    return {
        "message_mib": round(len(request_bytes) / MiB, 2),
        "code": code,
        "codes_in_flight": sorted(set(codes)),
        "cpu_one_call_s": round(one_cpu, 3),
        "rss_peak_growth_six_mib": round((peak.peak - rss_before) / MiB, 1),
        "reads_meanwhile": latency_summary(latencies),
    }


async def row_streams(folder: Path, extra: dict[str, str], streams: int = 5000) -> dict[str, Any]:
    tokens = {"ingest_tokens": INGEST_TOKEN, "read_tokens": READ_TOKEN}
    with serve(folder, extra, **tokens) as (_, grpc_port, http_port):
        # 3: SETTINGS_MAX_CONCURRENT_STREAMS
        advertised = server_settings("127.0.0.1", grpc_port).get(3)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.TransactionServiceStub(channel)
            calls = [
                stub.WatchTransactions(pb.WatchTransactionsRequest(), metadata=token(READ_TOKEN))
                for _ in range(streams)
            ]
            highest, last_change, started = 0.0, time.monotonic(), time.monotonic()
            headers = {"Authorization": f"Bearer {READ_TOKEN}"}
            while time.monotonic() - last_change < 5 and time.monotonic() - started < 120:
                await asyncio.sleep(0.5)
                reply = await asyncio.to_thread(
                    request, http_port, "GET", "/metrics", None, headers
                )
                now = metric(reply.body.decode(), "transaction_service_watch_streams")
                if now > highest:
                    highest, last_change = now, time.monotonic()
            for call in calls:
                call.cancel()
    return {"advertised_max_concurrent_streams": advertised, "open_at_once": int(highest)}


async def row_reset(folder: Path, extra: dict[str, str], streams: int = 150_000) -> dict[str, Any]:
    tokens = {"ingest_tokens": INGEST_TOKEN, "read_tokens": READ_TOKEN}
    with serve(folder, extra, **tokens) as (process, grpc_port, _):
        pid = process.process.pid
        async with with_transaction(grpc_port) as (_, stub, order_id):
            baseline = await reads_for(stub, order_id, 2.0)
            done = asyncio.Event()
            # 10 reads a second: what they cost the server is lost in the attack's.
            reads = asyncio.create_task(reads_until(stub, order_id, done, pause=0.1))
            before = cpu_seconds(pid)
            seconds = await asyncio.to_thread(
                rapid_reset, "127.0.0.1", grpc_port, f"{SERVICE}/GetTransaction", streams
            )
            # The server may still be working through what it received: wait until it is idle.
            while True:
                used = cpu_seconds(pid)
                await asyncio.sleep(1.0)
                if cpu_seconds(pid) - used < 0.05:
                    break
            spent = cpu_seconds(pid) - before
            done.set()
            latencies = await reads
    return {
        "streams": streams,
        "client_seconds": round(seconds, 2),
        "server_cpu_s": round(spent, 2),
        "reads_before": latency_summary(baseline),
        "reads_meanwhile": latency_summary(latencies),
    }


async def reads_for(stub: Any, order_id: str, seconds: float) -> list[float]:
    done = asyncio.Event()
    task = asyncio.create_task(reads_until(stub, order_id, done))
    await asyncio.sleep(seconds)
    done.set()
    return await task


Row = Callable[[Path, dict[str, str]], Awaitable[dict[str, Any]]]


async def run_rows(rows: dict[str, Row], only: str, extra: dict[str, str]) -> dict[str, Any]:
    """Each row of `only` (comma-separated names of `rows`) in turn, in a folder of its own;
    each row's figures printed as it ends."""
    results: dict[str, Any] = {"settings": extra}
    with tempfile.TemporaryDirectory(prefix="bench-abuse-") as folder:
        for name in only.split(","):
            started = time.monotonic()
            results[name] = await rows[name](Path(folder), extra)
            print(f"{name} ({time.monotonic() - started:.0f} s): {json.dumps(results[name])}")
    return results


def rows_main(doc: str, rows: dict[str, Row]) -> int:
    """The command line of an abuse bench: `--only`, `--set NAME=VALUE` (a server setting),
    `--json`."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(rows), help="rows to run, comma-separated")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.set)
    results = asyncio.run(run_rows(rows, args.only, extra))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


ROWS: dict[str, Row] = {
    "http": row_http,
    "unauth": row_unauth,
    "streams": row_streams,
    "reset": row_reset,
}

if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(
            rows_main(
                __doc__,
                {
                    "http": row_http,
                    "unauth": row_unauth,
                    "streams": row_streams,
                    "reset": row_reset,
                },
            )
        )
