"""Attacks on the service's edge from outside, with clients cheap enough to run thousands of
connections from one process on a shared 2-core machine: raw asyncio protocols for HTTP, the `h2`
library for raw HTTP/2 frames. `tests/test_abuse_edge.py` asserts the bounds with them;
`bench/abuse.py` measures with them, before and after a change.

Nothing here knows the server's limits: each attack reports what the server did (answers, when it
closed each connection, its resident memory), and the caller judges.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.webhook_tools import WEBHOOK_PATH, signed_headers

MiB = 1024 * 1024
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})")


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match, status
    return int(match.group(1)) * 1024


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / _CLOCK_TICKS


_CLOCK_TICKS = 100
with contextlib.suppress(AttributeError, ValueError, OSError):
    import os

    _CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class RssPeak:
    """Samples a process's resident memory in a thread until stopped; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.peak = rss_bytes(pid)
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            with contextlib.suppress(OSError, AssertionError):
                self.peak = max(self.peak, rss_bytes(self.pid))

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


# -- HTTP -----------------------------------------------------------------------------------------


class Probe(asyncio.Protocol):
    """One client connection: sends what it is given, keeps the start of the server's answer
    and records when the server closed the connection (EOF or reset)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.opened_at = self.loop.time()
        self.closed_at: float | None = None
        self.received = bytearray()
        self.sent = 0
        self.transport: asyncio.Transport | None = None
        self.closed = self.loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.opened_at = self.loop.time()

    def data_received(self, data: bytes) -> None:
        if len(self.received) < 4096:
            self.received += data[: 4096 - len(self.received)]

    def eof_received(self) -> bool:
        self._ended()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended()

    def _ended(self) -> None:
        if self.closed_at is None:
            self.closed_at = self.loop.time()
        if not self.closed.done():  # a gather that timed out cancels it
            self.closed.set_result(None)

    @property
    def open(self) -> bool:
        return self.closed_at is None

    @property
    def never_opened(self) -> bool:
        """The connection was refused or reset while opening (a starved machine's listen
        backlog): the server never held it."""
        return self.transport is None

    @property
    def held(self) -> float | None:
        """Seconds from opening to the server's close; None while open."""
        return None if self.closed_at is None else self.closed_at - self.opened_at

    @property
    def status(self) -> int | None:
        """The status of the server's answer, if one came."""
        match = _STATUS_LINE.match(bytes(self.received))
        return int(match.group(1)) if match else None

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing() and self.open:
            self.transport.write(data)
            self.sent += len(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def open_probes(host: str, port: int, count: int, batch: int = 200) -> list[Probe]:
    """`count` connections, opened `batch` at a time (a connection refused or reset while
    opening counts as a probe closed at once)."""
    loop = asyncio.get_running_loop()
    probes: list[Probe] = []

    async def one() -> Probe:
        try:
            _, probe = await loop.create_connection(Probe, host, port)
        except OSError:
            probe = Probe()
            probe._ended()
        return probe

    for start in range(0, count, batch):
        probes += await asyncio.gather(*(one() for _ in range(min(batch, count - start))))
    return probes


def webhook_head(content_length: int, *, event_id: str | None = None) -> bytes:
    """A webhook request head with signature headers that look right (a current timestamp) and
    a signature that is not."""
    headers = {
        "Host": "localhost",
        "Content-Type": "application/json",
        "Content-Length": str(content_length),
        "svix-id": event_id or f"msg_{uuid.uuid4().hex}",
        "svix-timestamp": str(int(time.time())),
        "svix-signature": "v1,ZmFrZWZha2VmYWtlZmFrZWZha2VmYWtlZmFrZWZha2U=",
    }
    lines = [f"POST {WEBHOOK_PATH} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


SLOW_HEAD = (
    b"POST " + WEBHOOK_PATH.encode() + b" HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + (b"a" * 4000)
)


async def drip(
    probes: Sequence[Probe], pieces: Sequence[bytes], interval: float, stop: asyncio.Event
) -> None:
    """Every `interval` seconds (the first time too), send each open probe its next piece, until
    the pieces run out or `stop` is set (one loop for all probes: cheaper than a timer each)."""
    for piece in pieces:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
        if stop.is_set() or not any(p.open for p in probes):
            return
        for probe in probes:
            probe.send(piece)


async def signed_webhook(
    host: str, port: int, secret: str, body: bytes, event_id: str, timeout: float = 30.0
) -> tuple[int | None, float]:
    """One correctly signed webhook, head and body in one write, on a new connection; its
    status (None if the connection closed without one) and how long the answer took."""
    headers = signed_headers(secret, event_id, body) | {
        "Host": "localhost",
        "Content-Length": str(len(body)),
        "Connection": "close",
    }
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head = f"POST {WEBHOOK_PATH} HTTP/1.1\r\n{lines}"
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(head.encode() + b"\r\n" + body)
            answer = await reader.read()
            writer.close()
    except (OSError, TimeoutError):
        return None, time.monotonic() - started
    match = _STATUS_LINE.match(answer)
    return (int(match.group(1)) if match else None), time.monotonic() - started


async def health_latencies(address: str, calls: int, pause: float) -> list[float]:
    """gRPC health checks one at a time on one channel, `pause` apart; each one's seconds (a
    failed check counts as infinity)."""
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(calls):
            started = time.monotonic()
            try:
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                latencies.append(time.monotonic() - started)
            except grpc.aio.AioRpcError:
                latencies.append(float("inf"))
            await asyncio.sleep(pause)
    return latencies


@dataclass
class FloodReport:
    """What the server did under `http_flood`."""

    rss_before: int
    rss_peak: int
    rss_after: int
    webhook_status: int | None
    webhook_seconds: float
    grpc_seconds: list[float]
    # Per attacking connection: seconds until the server closed it (None: still open when the
    # attack ended), and the status it was answered with.
    slow_held: list[float | None] = field(default_factory=list)
    trickle_held: list[float | None] = field(default_factory=list)
    trickle_statuses: dict[int | None, int] = field(default_factory=dict)
    opened: int = 0
    # Slow-head connections refused or reset while opening (see Probe.never_opened).
    slow_never_opened: int = 0

    @property
    def rss_growth(self) -> int:
        return self.rss_peak - self.rss_before

    def summary(self) -> dict[str, object]:
        def held(values: list[float | None]) -> dict[str, object]:
            closed = [v for v in values if v is not None]
            return {
                "connections": len(values),
                "closed_by_server": len(closed),
                "max_held_s": round(max(closed), 2) if closed else None,
            }

        return {
            "rss_before_mib": round(self.rss_before / MiB, 1),
            "rss_peak_growth_mib": round(self.rss_growth / MiB, 1),
            "rss_after_growth_mib": round((self.rss_after - self.rss_before) / MiB, 1),
            "signed_webhook": {"status": self.webhook_status, "s": round(self.webhook_seconds, 3)},
            "grpc_health_max_s": round(max(self.grpc_seconds), 3) if self.grpc_seconds else None,
            "slow": held(self.slow_held),
            "slow_never_opened": self.slow_never_opened,
            "trickle": held(self.trickle_held),
            "trickle_statuses": {str(k): v for k, v in self.trickle_statuses.items()},
        }


async def http_flood(
    *,
    pid: int,
    host: str,
    http_port: int,
    grpc_address: str,
    secret: str,
    body: bytes,
    slow: int = 1000,
    trickle: int = 1000,
    body_size: int = MiB,
    chunk: int = 32 * 1024,
    interval: float = 1.0,
    head_interval: float = 2.0,
    settle: float = 1.0,
    window: float = 60.0,
) -> FloodReport:
    """`slow` connections sending a request head a byte every `head_interval` s, plus `trickle`
    connections sending a complete head for a `body_size` body and then the body `chunk` bytes
    every `interval` s. `settle` s after all are open, one correctly signed webhook (`body`) and
    gRPC health checks are sent. The attack lasts until the server closed every attacking
    connection or `window` s passed; then the rest are closed by the client and, after a pause,
    the server's memory is measured again."""
    rss_before = rss_bytes(pid)
    stop = asyncio.Event()
    with RssPeak(pid) as peak:
        slow_probes = await open_probes(host, http_port, slow)
        trickle_probes = await open_probes(host, http_port, trickle)
        pieces = [b"x" * chunk] * (body_size // chunk)
        for probe in trickle_probes:
            probe.send(webhook_head(body_size))
        drips = [
            asyncio.create_task(
                drip(slow_probes, [bytes([b]) for b in SLOW_HEAD], head_interval, stop)
            ),
            asyncio.create_task(drip(trickle_probes, pieces, interval, stop)),
        ]
        await asyncio.sleep(settle)
        checks = asyncio.create_task(health_latencies(grpc_address, 5, 0.2))
        status, seconds = await signed_webhook(
            host, http_port, secret, body, f"msg_{uuid.uuid4().hex}"
        )
        grpc_seconds = await checks
        everything = slow_probes + trickle_probes
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(window):
                await asyncio.gather(*(p.closed for p in everything))
        stop.set()
        await asyncio.gather(*drips)
    report = FloodReport(
        rss_before=rss_before,
        rss_peak=peak.peak,
        rss_after=0,
        webhook_status=status,
        webhook_seconds=seconds,
        grpc_seconds=grpc_seconds,
        slow_held=[p.held for p in slow_probes],
        trickle_held=[p.held for p in trickle_probes],
        opened=len(everything),
        slow_never_opened=sum(p.never_opened for p in slow_probes),
    )
    for probe in trickle_probes:
        report.trickle_statuses[probe.status] = report.trickle_statuses.get(probe.status, 0) + 1
    for probe in everything:
        probe.close()
    await asyncio.sleep(3)
    report.rss_after = rss_bytes(pid)
    return report


# -- HTTP/2 ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def h2_connection(host: str, port: int) -> Iterator[tuple[socket.socket, object]]:
    """A raw HTTP/2 connection (prior knowledge, as gRPC speaks it): the socket and an
    `h2.connection.H2Connection` that has sent its preface."""
    import h2.config
    import h2.connection

    sock = socket.create_connection((host, port))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    try:
        yield sock, conn
    finally:
        sock.close()


def grpc_headers(host: str, method: str, token: str | None = None) -> list[tuple[str, str]]:
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", method),
        (":authority", host),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    if token:
        headers.append(("authorization", f"Bearer {token}"))
    return headers


def server_settings(host: str, port: int, timeout: float = 10.0) -> dict[int, int]:
    """The SETTINGS the server sends on a new HTTP/2 connection (id -> value)."""
    import h2.events

    with h2_connection(host, port) as (sock, conn):
        sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):  # type: ignore[attr-defined]
                if isinstance(event, h2.events.RemoteSettingsChanged):
                    return {int(k): v.new_value for k, v in event.changed_settings.items()}
    raise AssertionError("the server sent no SETTINGS")


def rapid_reset(host: str, port: int, method: str, streams: int, batch: int = 500) -> float:
    """Open `streams` streams on one connection, each reset (RST_STREAM CANCEL) right after its
    HEADERS, `batch` pairs per write; reads and discards what the server sends. The seconds it
    took (the server's cost is measured by the caller)."""
    import h2.errors

    started = time.monotonic()
    with h2_connection(host, port) as (sock, conn):
        sock.setblocking(False)
        headers = grpc_headers(host, method)
        stream_id = 1
        sent = 0
        while sent < streams:
            for _ in range(min(batch, streams - sent)):
                conn.send_headers(stream_id, headers)  # type: ignore[attr-defined]
                conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)  # type: ignore[attr-defined]
                stream_id += 2
                sent += 1
            data = conn.data_to_send()  # type: ignore[attr-defined]
            view = memoryview(data)
            while view:
                try:
                    written = sock.send(view)
                    view = view[written:]
                except BlockingIOError:
                    _discard(sock, conn)
                    time.sleep(0.001)
            _discard(sock, conn)
    return time.monotonic() - started


def _discard(sock: socket.socket, conn: object) -> None:
    import h2.exceptions

    while True:
        try:
            data = sock.recv(1 << 20)
        except BlockingIOError:
            return
        if not data:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):
            conn.receive_data(data)  # type: ignore[attr-defined]


def json_line(value: object) -> str:
    return json.dumps(value, sort_keys=True)
