"""What each ingest outcome costs, in process, against another version of the code measured in
the same run: did a change to the commit path make ingest, or a duplicate, dearer?

Run: `.venv/bin/python bench/outcomes.py --against DIR [--rounds N] [--events N]`, where DIR holds
another version's `src/` and its stubs (`client/src/`, or `generated/` in older versions; e.g. `git
archive main src client | tar -x -C DIR`). Each round runs both versions, one after the other, each
in a process of its own, on a fresh SQLite file with synchronous=FULL (the default): the ingest use
case and the store, no gRPC. The figures are medians over the rounds, and the ratio of each is the
median of the rounds' ratios, this version's over DIR's (each version goes first every other
round): both meet the same neighbours on a shared machine, so compare ratios, not rates.

Phases of one round, in order:
- applied: the first delivery of N new transactions, 32 in flight (they share commits);
- duplicate: the same N deliveries again, same ids (Svix retries), 32 in flight;
- stale: the same bodies under new ids (a provider re-send), 32 in flight;
  each as deliveries per second and as CPU microseconds per delivery (the process's own time,
  which neighbours move less than the wall clock);
- one at a time: 200 (`--alone`) new deliveries, then their retries, each alone in its commit
  (p50 latency: what a single retry costs when nothing shares its commit).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "junction"
IN_FLIGHT = 32


async def measure(events: int, alone: int) -> dict[str, float]:
    """One round on the code importable now (the worker's PYTHONPATH decides which)."""
    sys.path.append(str(ROOT))
    from tests.scenario_tools import with_fresh_ids
    from transaction_service.store.sqlite import SqliteStore
    from transaction_service.usecases.commit import CommitPath
    from transaction_service.usecases.ingest import Ingestor, decode_delivery

    scenarios = [json.loads(p.read_text()) for p in sorted(FIXTURES.glob("*.json"))]

    def firsts(count: int) -> list[tuple[str, str]]:
        found = []
        for i in range(count):
            d = with_fresh_ids(scenarios[i % len(scenarios)])["deliveries"][0]
            found.append((d["svix_id"], json.dumps(d["body"])))
        return found

    async def rate(ingestor: Ingestor, deliveries: list[tuple[str, str]]) -> tuple[float, float]:
        """(deliveries per second, CPU microseconds per delivery): the CPU time is the
        process's own (this thread and SQLite's), so neighbours on the machine move it less."""
        queue = list(reversed(deliveries))

        async def worker() -> None:
            while queue:
                event_id, body = queue.pop()
                delivery = decode_delivery(event_id, payload_json=body, max_body_bytes=1 << 20)
                await ingestor.ingest(delivery)

        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        return len(deliveries) / seconds, cpu / len(deliveries) * 1e6

    async def p50_ms(ingestor: Ingestor, deliveries: list[tuple[str, str]]) -> float:
        times = []
        for event_id, body in deliveries:
            delivery = decode_delivery(event_id, payload_json=body, max_body_bytes=1 << 20)
            started = time.perf_counter()
            await ingestor.ingest(delivery)
            times.append(time.perf_counter() - started)
        return statistics.median(times) * 1000

    with tempfile.TemporaryDirectory() as folder:
        store = SqliteStore(Path(folder) / "bench.db")
        await store.open()
        ingestor = Ingestor(CommitPath(store))
        ingestor.start()
        try:
            fresh = firsts(events)
            resent = [(f"{event_id}-resent", body) for event_id, body in fresh]
            figures: dict[str, float] = {}
            for outcome, deliveries in (
                ("applied", fresh),
                ("duplicate", fresh),
                ("stale", resent),
            ):
                per_s, cpu_us = await rate(ingestor, deliveries)
                figures[f"{outcome}_per_s"] = per_s
                figures[f"{outcome}_cpu_us"] = cpu_us
            singles = firsts(alone)
            figures["applied_alone_p50_ms"] = await p50_ms(ingestor, singles)
            figures["duplicate_alone_p50_ms"] = await p50_ms(ingestor, singles)
        finally:
            await ingestor.stop()
            await store.close()
    return figures


def run_worker(source: Path | None, events: int, alone: int) -> dict[str, float]:
    env = dict(os.environ)
    if source is not None:
        # The stubs live in generated/ in older versions, in client/src/ (with the client) now.
        found = [source / d for d in ("src", "generated", "client/src") if (source / d).is_dir()]
        env["PYTHONPATH"] = os.pathsep.join(map(str, found))
    done = subprocess.run(
        [sys.executable, __file__, "--worker", "--events", str(events), "--alone", str(alone)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(done.stdout))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", type=Path, help="another version's src/ and stubs")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--alone", type=int, default=200, help="deliveries one at a time")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(asyncio.run(measure(args.events, args.alone))))
        return 0
    if args.against is None:
        parser.error("--against DIR is required")
    ours: list[dict[str, float]] = []
    theirs: list[dict[str, float]] = []
    for i in range(args.rounds):
        print(f"outcomes: round {i + 1} of {args.rounds}", file=sys.stderr, flush=True)
        # Each version goes first every other round: neither always meets a cold cache.
        if i % 2:
            ours.append(run_worker(None, args.events, args.alone))
            theirs.append(run_worker(args.against, args.events, args.alone))
        else:
            theirs.append(run_worker(args.against, args.events, args.alone))
            ours.append(run_worker(None, args.events, args.alone))
    results: dict[str, Any] = {}
    print(f"{'figure':28} {'this':>10} {'against':>10} {'ratio':>7}  (median of rounds' ratios)")
    for key in ours[0]:
        mine = statistics.median(r[key] for r in ours)
        other = statistics.median(r[key] for r in theirs)
        ratio = statistics.median(a[key] / b[key] for a, b in zip(ours, theirs, strict=True))
        results[key] = {"this": mine, "against": other, "ratio": ratio}
        print(f"{key:28} {mine:10.2f} {other:10.2f} {ratio:7.2f}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
