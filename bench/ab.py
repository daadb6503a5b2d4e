"""The ingest path of this tree against another checkout's (A/B), each in a server process of its
own: what a change to the code costs IngestEvent, measured the way bench.py measures it.

Run: `.venv/bin/python bench/ab.py OTHER_TREE [--seconds S] [--rounds N] [--traced]`, e.g.
`bench/ab.py ../main` before merging a branch. Both servers run this tree's virtualenv (the same
libraries; only the service's own code differs: the other one's `src/` and its stubs come
first on its PYTHONPATH), on fresh SQLite files with the default synchronous=FULL, both running
throughout. Rounds alternate between them (as bench.py's rows 1-4 do) so both meet the same
neighbours on a shared machine; a ratio is the median of the rounds' ratios.

Per round and server: IngestEvent throughput with C calls in flight (distinct deliveries), then
the latency of calls made one at a time, and the server's CPU time per call over both (read from
/proc: the figure a busy neighbour moves least). With `--traced`, a third server runs this tree with
tracing on, exporting to an OTLP receiver in this process (which counts the spans), to show what
tracing costs when it is on. Tracing is off in the other two (no OTEL_* variables). With
`--reads`, each round also measures GetTransaction as bench.py's row 3 does (random known order
ids of 1,000 transactions, C in flight) and the server's CPU per read.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import (  # bench/bench.py: this script runs from bench/
    LISTENING,
    Process,
    as_request,
    channel,
    closed_loop,
    median,
    percentile,
    transactions,
)
from transactions.v1 import transactions_pb2 as pb
from transactions.v1 import transactions_pb2_grpc as pb_grpc


@contextmanager
def server_of(tree: Path, db: Path, **env: str) -> Iterator[tuple[str, int]]:
    """`transaction-service serve` with `tree`'s code first on the path; (address, pid)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("TRANSACTION_", "OTEL_"))}
    # The stubs are in generated/ in older trees, in client/src/ (with the client) in newer ones.
    parts = [tree / part for part in ("src", "client/src", "generated")]
    environ["PYTHONPATH"] = os.pathsep.join(str(part) for part in parts if part.is_dir())
    environ |= env
    args = [sys.executable, "-m", "transaction_service", "serve"]
    process = Process([*args, "--grpc-port", "0", "--http-port", "0", "--db", str(db)], env=environ)
    try:
        port = process.wait_for(LISTENING).group(1)
        yield f"127.0.0.1:{port}", process.process.pid
    finally:
        process.stop()


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process has used so far: unlike a rate, hardly moved by
    what else the machine runs."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def otlp_receiver() -> Iterator[tuple[str, list[int]]]:
    """An OTLP/gRPC trace receiver that only counts spans; (endpoint, [count])."""
    from opentelemetry.proto.collector.trace.v1 import (
        trace_service_pb2,
        trace_service_pb2_grpc,
    )

    count = [0]

    class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:
            count[0] += sum(
                len(scope.spans) for rs in request.resource_spans for scope in rs.scope_spans
            )
            return trace_service_pb2.ExportTraceServiceResponse()

    receiver = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), receiver)
    port = receiver.add_insecure_port("127.0.0.1:0")
    receiver.start()
    try:
        yield f"http://127.0.0.1:{port}", count
    finally:
        receiver.stop(0)


async def measure(
    stub: Any,
    pid: int,
    pool: list[pb.IngestEventRequest],
    seconds: float,
    concurrency: int,
    calls: int,
) -> tuple[float, float, float]:
    """(IngestEvent calls/s with `concurrency` in flight, p50 ms one at a time, the server's CPU
    milliseconds per call over both), taking fresh deliveries from the front of `pool`."""
    cpu = cpu_seconds(pid)
    load = await closed_loop(
        lambda i: stub.IngestEvent(pool[i]),
        concurrency=concurrency,
        seconds=seconds,
        limit=len(pool) - calls,
    )
    del pool[: load.calls]
    latencies = []
    for request in pool[:calls]:
        began = time.perf_counter()
        await stub.IngestEvent(request)
        latencies.append(time.perf_counter() - began)
    del pool[:calls]
    cpu_ms = (cpu_seconds(pid) - cpu) * 1000 / (load.calls + calls)
    return load.rate, percentile(latencies, 0.5) * 1000, cpu_ms


def ratio_to_other(figures: dict[str, list[float]], name: str) -> float:
    """The median of `name`'s rounds' ratios to the other tree's, round by round."""
    return median([a / b for a, b in zip(figures[name], figures["other"], strict=True)])


async def measure_reads(
    stub: Any, pid: int, order_ids: list[str], seconds: float, concurrency: int
) -> tuple[float, float]:
    """(GetTransaction calls/s with `concurrency` in flight, the server's CPU ms per call)."""
    cpu = cpu_seconds(pid)
    load = await closed_loop(
        lambda i: stub.GetTransaction(
            pb.GetTransactionRequest(order_id=order_ids[(i * 7919) % len(order_ids)])
        ),
        concurrency=concurrency,
        seconds=seconds,
        limit=10**9,
    )
    return load.rate, (cpu_seconds(pid) - cpu) * 1000 / load.calls


async def main_async(args: argparse.Namespace) -> None:
    other = Path(args.other).resolve()
    folder = Path(tempfile.mkdtemp(prefix="bench-ab-"))
    per_server = int(args.rounds * (args.seconds * 1500 + args.calls)) + 1000
    stored = 1000 if args.reads else 0
    per_server += stored
    names = ["this", "other"] + (["this, traced"] if args.traced else [])
    pools = {
        name: [as_request(run["deliveries"][0]) for run in transactions(per_server)]
        for name in names
    }
    common = dict(item.split("=", 1) for item in args.env)
    with ExitStack() as stack:
        addresses = {
            "this": stack.enter_context(server_of(ROOT, folder / "this.db", **common)),
            "other": stack.enter_context(server_of(other, folder / "other.db", **common)),
        }
        spans: list[int] = [0]
        if args.traced:
            endpoint, spans = stack.enter_context(otlp_receiver())
            addresses["this, traced"] = stack.enter_context(
                server_of(
                    ROOT,
                    folder / "traced.db",
                    **common,
                    OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
                    OTEL_EXPORTER_OTLP_PROTOCOL="grpc",
                )
            )
        rates: dict[str, list[float]] = {name: [] for name in names}
        p50s: dict[str, list[float]] = {name: [] for name in names}
        cpus: dict[str, list[float]] = {name: [] for name in names}
        channels = {name: channel(address) for name, (address, _) in addresses.items()}
        stubs = {name: pb_grpc.TransactionServiceStub(ch) for name, ch in channels.items()}
        pids = {name: pid for name, (_, pid) in addresses.items()}
        for name, stub in stubs.items():  # warm up: first connections, first commits
            await measure(stub, pids[name], pools[name], 0.5, args.concurrency, 20)
        order_ids: dict[str, list[str]] = {}
        for name, stub in stubs.items():  # what --reads reads
            order_ids[name] = []
            for start in range(0, stored, 50):  # within the server's streams per connection
                answers = await asyncio.gather(
                    *(stub.IngestEvent(r) for r in pools[name][start : start + 50])
                )
                order_ids[name] += [a.transaction.orders[0].id for a in answers]
            del pools[name][:stored]
        read_rates: dict[str, list[float]] = {name: [] for name in names}
        read_cpus: dict[str, list[float]] = {name: [] for name in names}
        for round_number in range(args.rounds):
            order = names if round_number % 2 == 0 else list(reversed(names))
            for name in order:
                rate, p50, cpu = await measure(
                    stubs[name], pids[name], pools[name], args.seconds, args.concurrency, args.calls
                )
                rates[name].append(rate)
                p50s[name].append(p50)
                cpus[name].append(cpu)
                if args.reads:
                    read_rate, read_cpu = await measure_reads(
                        stubs[name], pids[name], order_ids[name], args.seconds, args.concurrency
                    )
                    read_rates[name].append(read_rate)
                    read_cpus[name].append(read_cpu)
            print(
                f"round {round_number + 1}: "
                + ", ".join(
                    f"{name} {rates[name][-1]:.0f}/s p50 {p50s[name][-1]:.2f} ms "
                    f"cpu {cpus[name][-1]:.3f} ms/call"
                    for name in names
                ),
                flush=True,
            )
        for ch in channels.values():
            await ch.close()
    print()
    print(f"IngestEvent, {args.concurrency} in flight ({args.rounds} rounds of {args.seconds} s):")
    for name in names:
        ratio = ratio_to_other(rates, name)
        print(
            f"  {name:14} median {median(rates[name]):7.0f}/s  ratio to other {ratio:.3f}"
            f"  (rounds: {', '.join(f'{r:.0f}' for r in rates[name])})"
        )
    print(f"IngestEvent one at a time, p50 of {args.calls} calls per round:")
    for name in names:
        ratio = ratio_to_other(p50s, name)
        print(
            f"  {name:14} median {median(p50s[name]):6.2f} ms  ratio to other {ratio:.3f}"
            f"  (rounds: {', '.join(f'{p:.2f}' for p in p50s[name])})"
        )
    print("server CPU per call (user + system, over both measurements of a round):")
    for name in names:
        ratio = ratio_to_other(cpus, name)
        print(
            f"  {name:14} median {median(cpus[name]):6.3f} ms  ratio to other {ratio:.3f}"
            f"  (rounds: {', '.join(f'{c:.3f}' for c in cpus[name])})"
        )
    if args.reads:
        print(f"GetTransaction, {args.concurrency} in flight, and the server's CPU per read:")
        for name in names:
            rate_ratio = ratio_to_other(read_rates, name)
            cpu_ratio = ratio_to_other(read_cpus, name)
            print(
                f"  {name:14} median {median(read_rates[name]):7.0f}/s  ratio to other "
                f"{rate_ratio:.3f}; CPU {median(read_cpus[name]) * 1000:5.0f} us  ratio to other "
                f"{cpu_ratio:.3f}  (rounds: "
                + ", ".join(f"{c * 1000:.0f}" for c in read_cpus[name])
                + ")"
            )
    if args.traced:
        print(f"spans received from the traced server: {spans[0]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", help="the other checkout (its src/ and stubs are used)")
    parser.add_argument("--seconds", type=float, default=4.0, help="throughput per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--calls", type=int, default=150, help="sequential calls per round")
    parser.add_argument("--traced", action="store_true", help="also this tree with tracing on")
    parser.add_argument("--reads", action="store_true", help="also GetTransaction (row 3's)")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a variable for every server (e.g. TRANSACTION_SERVICE_LOG_LEVEL=WARNING)",
    )
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
