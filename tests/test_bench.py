"""The benchmark runs (in its smallest mode, so it does not rot); its figures are not checked:
speed is never asserted by a test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_smoke_run_prints_the_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench.py"), "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cores shared by the servers and the clients" in result.stdout
    results = json.loads(out.read_text())
    for key in (
        "echo_ingest_rps",
        "ingest_event_ratio",
        "get_ratio",
        "ingest_events_ratio",
        "bytes_per_transaction",
        "server_memory_per_multiplexed_watch_bytes",
    ):
        assert results[key] > 0, key
    # Correctness is checked even in the smallest run: no watcher missed a change.
    assert results["fanout"]["missed"] == 0
    assert results["fanout_many_feeds"]["missed"] == 0


def test_outcomes_bench_runs_against_another_version(tmp_path: Path) -> None:
    """bench/outcomes.py, at its smallest, against this very tree (as DIR): every figure is
    printed with a ratio."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "outcomes.py"),
            "--against",
            str(ROOT),
            "--rounds",
            "1",
            "--events",
            "20",
            "--alone",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.splitlines()[-1])
    assert set(figures) == {
        f"{outcome}_{unit}"
        for outcome in ("applied", "duplicate", "stale")
        for unit in ("per_s", "cpu_us")
    } | {"applied_alone_p50_ms", "duplicate_alone_p50_ms"}
    assert all(f["ratio"] > 0 for f in figures.values())


def test_watch_memory_bench_runs_with_a_bare_server_and_resumed_watches(tmp_path: Path) -> None:
    """bench/watch_memory.py, at its smallest, with a bare grpc.aio server, the watches on
    Watch streams too (`--per-stream`), and resumed watches: its figures are printed for each.
    (`--against DIR` only runs the same servers with DIR's code first on the path; left out, it
    saves a part of the run.)"""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "watch_memory.py"),
            "--bare",
            "--resume",
            "--rounds",
            "1",
            "--singles",
            "20",
            "--feeds",
            "2",
            "--per-stream",
            "10",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("rss per watch") == 3, result.stdout
    assert result.stdout.count("python objects (tracemalloc") == 3, result.stdout
    assert "Watch (10 a stream)" in result.stdout
