"""Server memory per open watch (issue 21, bench row 7), and where it goes.

Run: `.venv/bin/python bench/watch_memory.py [--against DIR] [--rounds N] [--singles N]
[--feeds N] [--per-stream N] [--bare]`. Prints figures; asserts nothing.

A server process (`transaction-service serve`, SQLite; with `--against DIR`, alternately DIR's
`src/` and stubs first on its PYTHONPATH) is loaded with `--singles` transactions, warmed by a
hundred watches opened and closed, then measured before and after opening `--singles`
single-transaction watches (one per transaction) and `--feeds` feeds, all with `batch_changes`
as bench row 5 opens them, spread over connections of at most 100 streams. Per watch:

- `rss`: the server's resident memory (VmRSS) after, less before, over the watches;
- `malloc`: bytes glibc's malloc has handed out and not taken back (mallinfo2, every arena):
  gRPC core's C allocations, and Python objects larger than 512 bytes;
- in a second server of the same tree started with tracemalloc (which costs memory of its own,
  so it is not used for `rss`): `python`, what the Python allocators hold (tracemalloc), and
  the allocation sites that grew most, per watch.

`--per-stream N` adds this tree's server with the same watches multiplexed on `Watch` streams,
N watches a stream (each stream's creates written at once, then every message read): the
design that shares one gRPC stream's cost between many watches.

`--bare` adds a bare grpc.aio server (this tree's gRPC options, uvloop) holding the same number
of server-streaming calls whose handler sent one message and waits: what gRPC costs per stream
whatever the service does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import os
import re
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WARM_WATCHES = 100
# Streams per connection: the server's default grpc_max_concurrent_streams (docs/limits.md).
PER_CHANNEL = 100
BARE_METHOD = "/bare.Bare/Wait"


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def malloc_in_use() -> int:
    """Bytes malloc has handed out, mmapped blocks included; 0 where mallinfo2 is missing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return 0
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def rss() -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]


def answer_measurements() -> None:
    """In the server process: a thread that answers `measure` lines on stdin with a JSON line of
    figures on stdout (and, when tracing, the allocation sites grown since the previous one)."""
    previous: list[tracemalloc.Snapshot] = []

    def loop() -> None:
        for line in sys.stdin:
            if line.startswith("exit"):  # at once, streams open (for heaptrack's "leaked")
                os._exit(0)
            if not line.startswith("measure"):
                continue
            gc.collect()
            figures: dict[str, Any] = {"rss": rss(), "malloc": malloc_in_use()}
            if tracemalloc.is_tracing():
                # Counted from the snapshot, without tracemalloc's own (the previous snapshot).
                snapshot = tracemalloc.take_snapshot().filter_traces(
                    (tracemalloc.Filter(False, tracemalloc.__file__),)
                )
                sizes = [trace.size for trace in snapshot.traces]
                figures["python"] = sum(sizes)
                # Blocks over 512 bytes come from malloc (pymalloc serves the smaller ones).
                figures["python_malloc"] = sum(size for size in sizes if size > 512)
                del sizes  # not counted in the next measurement
                if previous:
                    grown = snapshot.compare_to(previous[-1], "lineno")[:60]
                    figures["sites"] = [
                        (str(stat.traceback), stat.size_diff, stat.count_diff) for stat in grown
                    ]
                previous[:] = [snapshot]
            print(json.dumps(figures), flush=True)

    threading.Thread(target=loop, daemon=True).start()


def run_server(argv: list[str]) -> int:
    """`transaction-service serve ARGS` (from whichever tree PYTHONPATH names), answering
    measurements."""
    if os.environ.get("WATCH_MEMORY_TRACE"):
        tracemalloc.start(1)
    answer_measurements()
    from transaction_service import __file__ as where
    from transaction_service.cli.main import main

    print(json.dumps({"code": where}), flush=True)
    return main(["serve", *argv])


def run_bare() -> None:
    """A bare grpc.aio server whose one method sends a message and waits."""
    import grpc
    import uvloop

    from transaction_service.config import Settings
    from transaction_service.server import grpc_options

    async def wait(request: bytes, context: Any) -> Any:
        yield b"x"
        await asyncio.get_running_loop().create_future()

    async def serve() -> None:
        server = grpc.aio.server(options=grpc_options(Settings()))
        handler = grpc.method_handlers_generic_handler(
            "bare.Bare", {"Wait": grpc.unary_stream_rpc_method_handler(wait)}
        )
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(json.dumps({"port": port}), flush=True)
        await server.wait_for_termination()

    if os.environ.get("WATCH_MEMORY_TRACE"):
        tracemalloc.start(1)
    answer_measurements()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve())


# -- the measuring side ------------------------------------------------------------------------


@contextmanager
def started(args: list[str], tree: Path | None, trace: bool) -> Iterator[tuple[Any, str]]:
    """A server process (this script in `server` or `bare` mode); (Process, address)."""
    from bench import LISTENING, Process

    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRANSACTION_", "OTEL_"))}
    if tree is not None:
        parts = [tree / part for part in ("src", "client/src", "generated")]
        env["PYTHONPATH"] = os.pathsep.join(str(part) for part in parts if part.is_dir())
    if trace:
        env["WATCH_MEMORY_TRACE"] = "1"
    process = Process([sys.executable, str(Path(__file__)), *args], env=env)
    try:
        if args[0] == "bare":
            port = json.loads(process.wait_for(re.compile(r'^\{"port"'), stdout=True).string)
            address = f"127.0.0.1:{port['port']}"
        else:
            address = f"127.0.0.1:{process.wait_for(LISTENING).group(1)}"
        yield process, address
    finally:
        process.stop()


def measure(process: Any) -> dict[str, Any]:
    """Ask the server process for its figures (see `answer_measurements`)."""
    assert process.process.stdin is not None
    seen = len(process.out)
    process.process.stdin.write("measure\n")
    process.process.stdin.flush()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for line in process.out[seen:]:
            if line.startswith('{"rss"'):
                return json.loads(line)  # type: ignore[no-any-return]
        time.sleep(0.1)
    raise SystemExit("watch_memory: the server did not answer a measurement")


async def open_multiplexed(
    address: str, singles: list[str], feeds: int, per_stream: int, resume: bool
) -> Any:
    """The watches of `open_watches`, `per_stream` to a `Watch` stream; returns a closer once
    each watch got its first message after `created`."""
    from bench import channel
    from transactions.v1 import transactions_pb2 as pb
    from transactions.v1 import transactions_pb2_grpc as pb_grpc

    start = {"start_revision": 0} if resume else {}
    creates = [
        pb.WatchCreateRequest(
            watch_id=i + 1,
            transaction=pb.WatchTransactionRequest(transaction_id=txn, batch_changes=True, **start),
        )
        for i, txn in enumerate(singles)
    ] + [
        pb.WatchCreateRequest(
            watch_id=len(singles) + i + 1,
            transactions=pb.WatchTransactionsRequest(batch_changes=True, **start),
        )
        for i in range(feeds)
    ]
    groups = [creates[i : i + per_stream] for i in range(0, len(creates), per_stream)]
    channels = [channel(address) for _ in range(max(1, -(-len(groups) // PER_CHANNEL)))]
    loop = asyncio.get_running_loop()
    calls: list[Any] = []
    opened = [loop.create_future() for _ in groups]

    async def read(call: Any, group: list[Any], got: asyncio.Future[None]) -> None:
        waiting = {create.watch_id for create in group}
        with contextlib.suppress(Exception):
            async for response in call:
                if response.WhichOneof("event") != "created":
                    waiting.discard(response.watch_id)
                    if not waiting and not got.done():
                        got.set_result(None)

    readers = []
    for i, group in enumerate(groups):
        call = pb_grpc.TransactionServiceStub(channels[i % len(channels)]).Watch()
        calls.append(call)
        readers.append(asyncio.create_task(read(call, group, opened[i])))
        for create in group:
            await call.write(pb.WatchRequest(create=create))
    await asyncio.gather(*opened)

    async def close() -> None:
        for call in calls:
            call.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for ch in channels:
            await ch.close()
        await asyncio.sleep(0.5)

    return close


async def open_watches(
    address: str,
    singles: list[str],
    feeds: int,
    bare: bool,
    resume: bool = False,
    per_stream: int = 0,
) -> Any:
    """Open the watches (with `resume`, from revision 0: each replays the change log first),
    read every message they get, wait for each one's first; returns a closer. With
    `per_stream`, on `Watch` streams of that many watches each (see `open_multiplexed`)."""
    from bench import channel
    from transactions.v1 import transactions_pb2 as pb
    from transactions.v1 import transactions_pb2_grpc as pb_grpc

    if per_stream:
        return await open_multiplexed(address, singles, feeds, per_stream, resume)
    start = {"start_revision": 0} if resume else {}
    total = len(singles) + feeds
    channels = [channel(address) for _ in range(max(1, -(-total // PER_CHANNEL)))]
    calls: list[Any] = []
    for i in range(total):
        ch = channels[i % len(channels)]
        if bare:
            calls.append(ch.unary_stream(BARE_METHOD)(b""))
        elif i < len(singles):
            stub = pb_grpc.TransactionServiceStub(ch)
            request = pb.WatchTransactionRequest(
                transaction_id=singles[i], batch_changes=True, **start
            )
            calls.append(stub.WatchTransaction(request))
        else:
            stub = pb_grpc.TransactionServiceStub(ch)
            feed = pb.WatchTransactionsRequest(batch_changes=True, **start)
            calls.append(stub.WatchTransactions(feed))
    loop = asyncio.get_running_loop()
    first = [loop.create_future() for _ in calls]

    async def read(call: Any, got: asyncio.Future[None]) -> None:
        # Every message is taken, so that no stream waits on flow control holding a message.
        with contextlib.suppress(Exception):
            async for _ in call:
                if not got.done():
                    got.set_result(None)

    readers = [asyncio.create_task(read(c, f)) for c, f in zip(calls, first, strict=True)]
    await asyncio.gather(*first)

    async def close() -> None:
        for call in calls:
            call.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for ch in channels:
            await ch.close()
        await asyncio.sleep(0.5)

    return close


async def one_server(
    tree: Path | None,
    folder: Path,
    singles: int,
    feeds: int,
    trace: bool,
    bare: bool,
    unknown: bool = False,
    resume: bool = False,
    per_stream: int = 0,
) -> dict[str, Any]:
    """One server's figures: before and after the watches opened (with `unknown`, of
    transactions not ingested: the server serves no call before the watches)."""
    from bench import as_request, channel, stream_all, transactions
    from transactions.v1 import transactions_pb2 as pb
    from transactions.v1 import transactions_pb2_grpc as pb_grpc

    ids: list[str] = []
    if bare:
        args = ["bare"]
    else:
        db = Path(tempfile.mkdtemp(dir=folder)) / "watch.db"
        args = ["server", "--grpc-port", "0", "--http-port", "0", "--db", str(db)]
    with started(args, tree, trace) as (process, address):
        if unknown:
            ids = [f"unknown-{i}" for i in range(singles)]
        elif not bare:
            runs = list(transactions(singles))
            async with channel(address) as ch:
                stub = pb_grpc.TransactionServiceStub(ch)
                _, responses = await stream_all(
                    stub, [as_request(r["deliveries"][0]) for r in runs]
                )
                ids = [r.transaction.id for r in responses]
                for txn in ids[:200]:
                    await stub.GetTransaction(pb.GetTransactionRequest(transaction_id=txn))
        else:
            ids = [""] * singles
        warm = await open_watches(address, ids[:WARM_WATCHES], 0, bare, per_stream=per_stream)
        await warm()
        before = measure(process)
        close = await open_watches(address, ids, feeds, bare, resume, per_stream)
        await asyncio.sleep(2 if resume else 1)
        after = measure(process)
        await close()
        code = next((json.loads(line)["code"] for line in process.out if '"code"' in line), "")
    watches = singles + feeds
    figures: dict[str, Any] = {
        "code": code,
        "rss": (after["rss"] - before["rss"]) / watches,
        "malloc": (after["malloc"] - before["malloc"]) / watches,
    }
    if trace:
        figures["python"] = (after["python"] - before["python"]) / watches
        figures["python_malloc"] = (after["python_malloc"] - before["python_malloc"]) / watches
        figures["sites"] = [
            (site, size / watches, count / watches) for site, size, count in after["sites"]
        ]
    return figures


def report(
    name: str, runs: list[dict[str, Any]], traced: dict[str, Any] | None, sites: int
) -> None:
    per = ", ".join(f"{r['rss'] / 1024:.1f}" for r in runs)
    mall = ", ".join(f"{r['malloc'] / 1024:.1f}" for r in runs)
    # With `--rounds 0`, the traced server's figures alone.
    runs = runs or ([traced] if traced else [])
    print(f"{name}: {runs[0]['code']}")
    print(f"  rss per watch (KiB, each round):    {per}")
    print(f"  malloc per watch (KiB, each round): {mall}")
    if traced:
        python, large = traced["python"], traced["python_malloc"]
        core = sum(r["malloc"] for r in runs) / len(runs) - large
        print(
            f"  python objects (tracemalloc, a server of its own): {python / 1024:.2f} KiB per "
            f"watch, {large / 1024:.2f} of it in blocks over 512 B (from malloc)"
        )
        print(
            f"  malloc less those Python blocks (gRPC core's C allocations): {core / 1024:.1f} KiB"
        )
        print("  allocation sites grown most, per watch (innermost Python frame):")
        for site, size, count in traced["sites"][:sites]:
            print(f"    {size:8.0f} B {count:6.2f} blocks  {site}")


async def main_async(args: argparse.Namespace) -> None:
    folder = Path(tempfile.mkdtemp(prefix="watch-memory-"))
    # (name, tree, bare, watches per Watch stream: 0 for a stream per watch)
    trees: list[tuple[str, Path | None, bool, int]] = []
    if not args.bare_only:
        trees.append(("this tree", None, False, 0))
        if args.per_stream:
            name = f"this tree, Watch ({args.per_stream} a stream)"
            trees.append((name, None, False, args.per_stream))
    if args.against:
        trees.append((f"against {args.against}", args.against, False, 0))
    if args.bare or args.bare_only:
        trees.append(("bare grpc.aio server", None, True, 0))
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in trees}
    for _ in range(args.rounds):
        for name, tree, bare, per_stream in trees:
            runs[name].append(
                await one_server(
                    tree,
                    folder,
                    args.singles,
                    args.feeds,
                    False,
                    bare,
                    args.unknown,
                    args.resume,
                    per_stream,
                )
            )
    traced = {}
    if not args.no_trace:
        for name, tree, bare, per_stream in trees:
            traced[name] = await one_server(
                tree,
                folder,
                args.singles,
                args.feeds,
                True,
                bare,
                args.unknown,
                args.resume,
                per_stream,
            )
    print(f"{args.singles} single-transaction watches + {args.feeds} feeds")
    for name, *_ in trees:
        report(name, runs[name], traced.get(name), args.sites)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "server":
        sys.exit(run_server(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "bare":
        run_bare()
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", type=Path, help="another tree's src/ and client/src/")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--singles", type=int, default=1000)
    parser.add_argument("--feeds", type=int, default=100)
    parser.add_argument("--bare", action="store_true", help="also a bare grpc.aio server")
    parser.add_argument(
        "--per-stream",
        type=int,
        default=0,
        help="also this tree with the watches multiplexed on Watch streams, N a stream",
    )
    parser.add_argument(
        "--unknown",
        action="store_true",
        help="watch transactions not ingested (no call reaches the server before the watches)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="watches from revision 0 (each replays the change log first), as resuming clients",
    )
    parser.add_argument("--bare-only", action="store_true", help="only the bare server")
    parser.add_argument("--sites", type=int, default=15, help="allocation sites to print")
    parser.add_argument("--no-trace", action="store_true", help="skip the tracemalloc servers")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
