"""A fake Junction API for tests: a real HTTP server on a free port, served from a thread.

It serves the documented shapes from data a test loads, so the client, the reconcile use case and
the real server process can all be pointed at it (`fake.base_url`):

    with FakeJunction(api_key="k") as fake:           # or the `fake_junction` fixture
        fake.load_scenario(scenario)                   # or add_order / add_transaction / ...
        fake.fail("order", 500, times=2)               # faults, per endpoint, consumed in order
        ... JunctionClient(base_url=fake.base_url, api_key="k") ...
        fake.requests_to("order")                      # what it was asked, headers included

Endpoints (the names faults and recordings use):
    order                   GET  /v3/order/{order_id}
    order_transaction       GET  /v3/order_transaction/{transaction_id}
    transaction_result      GET  /v3/order_transaction/{transaction_id}/result
    transaction_result_pdf  GET  /v3/order_transaction/{transaction_id}/result/pdf
    orders                  GET  /v3/orders   (updated_start_date, updated_end_date, page, size)
    resend_events           POST /v3/order/resend_events

It runs in a thread of its own, so it works the same from sync tests, from async tests (its work
never touches the test's event loop) and for a server process started by the test.

Shapes the fake invents where the provider's are not documented: error bodies are FastAPI's
`{"detail": ...}`, a 404 says "<Thing> not found", a bad API key gets 401.
"""

from __future__ import annotations

import copy
import json
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from time import monotonic
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

ENDPOINTS = (
    "order",
    "order_transaction",
    "transaction_result",
    "transaction_result_pdf",
    "orders",
    "resend_events",
)
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("POST", re.compile(r"^/v3/order/resend_events$"), "resend_events"),
    ("GET", re.compile(r"^/v3/order/(?P<id>[^/]+)$"), "order"),
    ("GET", re.compile(r"^/v3/order_transaction/(?P<id>[^/]+)$"), "order_transaction"),
    ("GET", re.compile(r"^/v3/order_transaction/(?P<id>[^/]+)/result$"), "transaction_result"),
    (
        "GET",
        re.compile(r"^/v3/order_transaction/(?P<id>[^/]+)/result/pdf$"),
        "transaction_result_pdf",
    ),
    ("GET", re.compile(r"^/v3/orders$"), "orders"),
]
StatusSpelling = Literal["last_status", "low_level_status"]
_SPELLINGS: dict[str, tuple[str, str]] = {
    "last_status": ("last_status", "last_status_created_at"),
    "low_level_status": ("low_level_status", "low_level_status_created_at"),
}
_RESEND_WINDOW = timedelta(days=60)


@dataclass(frozen=True)
class RecordedRequest:
    endpoint: str  # one of ENDPOINTS, or "unknown"
    method: str
    path: str
    query: dict[str, list[str]]
    # Lower-case names.
    headers: dict[str, str]
    body: bytes

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Fault:
    """What the next `times` requests to an endpoint get instead of (or before) their answer."""

    times: int
    status: int | None = None
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    # Wait this long before answering (normally, unless `status` is set): a slow provider.
    delay: float = 0.0
    # Close the connection without answering: a network error.
    disconnect: bool = False


class FakeJunction:
    """The fake API. `start()`/`stop()`, or use it as a context manager."""

    def __init__(
        self,
        api_key: str = "test-junction-key",
        *,
        status_spelling: StatusSpelling = "last_status",
        pdf_chunk_size: int = 1024,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.api_key = api_key
        # The provider's clock: the end of a resend window given without one.
        self.now = now
        # How `GET /v3/order_transaction/{id}` names its orders' statuses; the provider's spec
        # says `last_status`, webhooks say `low_level_status`.
        self.status_spelling: StatusSpelling = status_spelling
        self.pdf_chunk_size = pdf_chunk_size
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._orders: dict[str, dict[str, Any]] = {}
        self._transactions: dict[str, dict[str, Any]] = {}
        self._results: dict[str, bytes] = {}
        self._pdfs: dict[str, bytes] = {}
        self._faults: dict[str, list[Fault]] = {}
        self._holds: dict[str, threading.Event] = {}
        self._requests: list[RecordedRequest] = []
        self._in_flight = 0
        self._max_in_flight = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------ life cycle

    def start(self) -> FakeJunction:
        handler = type("_BoundHandler", (_Handler,), {"fake": self})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        # Wakes held and slow requests, so shutdown does not wait for them.
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None

    def __enter__(self) -> FakeJunction:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "start() the fake first"
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------------------------ data

    def add_order(self, order: dict[str, Any]) -> None:
        """Serve `order` (a webhook's `data`) at `GET /v3/order/{id}` and in the listing. Its
        transaction block, if any, updates the transaction unless the fake knows a newer one."""
        order = copy.deepcopy(order)
        with self._lock:
            self._orders[order["id"]] = order
        block = order.get("order_transaction")
        if block:
            self.add_transaction(block, team_id=order.get("team_id"), only_if_newer=True)

    def add_transaction(
        self,
        transaction: dict[str, Any],
        *,
        team_id: str | None = None,
        only_if_newer: bool = False,
    ) -> None:
        """Serve a transaction (`{id, status, orders}` in either spelling, `team_id` optional)."""
        stored = copy.deepcopy(transaction)
        if team_id and "team_id" not in stored:
            stored["team_id"] = team_id
        stored["orders"] = [_neutral_entry(entry) for entry in stored.get("orders", [])]
        with self._lock:
            known = self._transactions.get(stored["id"])
            if only_if_newer and known is not None and _as_of(known) > _as_of(stored):
                return
            self._transactions[stored["id"]] = stored

    def set_results(self, transaction_id: str, results: dict[str, Any] | bytes) -> None:
        """The body of `GET /v3/order_transaction/{id}/result` (JSON object, or raw bytes)."""
        raw = results if isinstance(results, bytes) else json.dumps(results).encode()
        with self._lock:
            self._results[transaction_id] = raw

    def remove_results(self, transaction_id: str) -> bytes | None:
        """Serve 404 for the transaction's results again (not ready yet); what was served."""
        with self._lock:
            return self._results.pop(transaction_id, None)

    def set_pdf(self, transaction_id: str, pdf: bytes) -> None:
        with self._lock:
            self._pdfs[transaction_id] = pdf

    def load_scenario(self, scenario: dict[str, Any]) -> None:
        """The API's view after every delivery of a fixture scenario: each order as its newest
        delivery shows it, the transaction from the newest block, and made-up combined results
        (`final` once the transaction is completed, else `partial`) and PDF."""
        newest: dict[str, dict[str, Any]] = {}
        team_ids: dict[str, str] = {}
        for delivery in scenario["deliveries"]:
            body = delivery["body"]
            data = body["data"]
            if body.get("team_id"):
                team_ids[data["id"]] = body["team_id"]
            known = newest.get(data["id"])
            if known is None or _time(data.get("updated_at")) >= _time(known.get("updated_at")):
                newest[data["id"]] = data
        for order_id, data in newest.items():
            data = {**data, "team_id": data.get("team_id") or team_ids.get(order_id)}
            self.add_order(data)
        for transaction_id, transaction in list(self._transactions.items()):
            status = "final" if transaction.get("status") == "completed" else "partial"
            self.set_results(
                transaction_id,
                {
                    "metadata": {"status": status, "interpretation": "normal"},
                    "results": [{"name": "Glucose", "slug": "glucose", "result": "90"}],
                    "missing_results": [],
                    "order_transaction": self._render_transaction(transaction, "low_level_status"),
                },
            )
            self.set_pdf(transaction_id, b"%PDF-1.4\n% fake results of " + transaction_id.encode())

    # ---------------------------------------------------------------------------------- faults

    def inject(self, endpoint: str, fault: Fault) -> None:
        if endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; one of {ENDPOINTS}")
        with self._lock:
            self._faults.setdefault(endpoint, []).append(fault)

    def fail(
        self,
        endpoint: str,
        status: int,
        *,
        times: int = 1,
        retry_after: str | float | None = None,
        message: str = "injected failure",
        body: bytes | None = None,
    ) -> None:
        """The next `times` requests get `status` (with `Retry-After` if given)."""
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        payload = body if body is not None else json.dumps({"detail": message}).encode()
        self.inject(endpoint, Fault(times=times, status=status, body=payload, headers=headers))

    def slow(self, endpoint: str, seconds: float, *, times: int = 1) -> None:
        """The next `times` requests are answered only after `seconds`."""
        self.inject(endpoint, Fault(times=times, delay=seconds))

    def disconnect(self, endpoint: str, *, times: int = 1) -> None:
        """The next `times` requests get the connection closed without an answer."""
        self.inject(endpoint, Fault(times=times, disconnect=True))

    def hold(self, endpoint: str) -> None:
        """Requests to `endpoint` wait (counted in flight) until `release(endpoint)`."""
        with self._lock:
            self._holds[endpoint] = threading.Event()

    def release(self, endpoint: str) -> None:
        with self._lock:
            gate = self._holds.pop(endpoint, None)
        if gate is not None:
            gate.set()

    # ---------------------------------------------------------------------------- observations

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def requests_to(self, endpoint: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.endpoint == endpoint]

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    @property
    def max_in_flight(self) -> int:
        """The most requests the fake was answering at once, since start."""
        with self._lock:
            return self._max_in_flight

    # ----------------------------------------------------------------------- request handling

    def _route(self, method: str, path: str) -> tuple[str, str | None]:
        for route_method, pattern, endpoint in _ROUTES:
            match = pattern.match(path)
            if route_method == method and match:
                return endpoint, match.groupdict().get("id")
        return "unknown", None

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)

    def _done(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _next_fault(self, endpoint: str) -> Fault | None:
        with self._lock:
            queue = self._faults.get(endpoint)
            if not queue:
                return None
            fault = queue[0]
            fault.times -= 1
            if fault.times <= 0:
                queue.pop(0)
            return fault

    def _wait_if_held(self, endpoint: str) -> None:
        with self._lock:
            gate = self._holds.get(endpoint)
        if gate is None:
            return
        while not gate.wait(0.05) and not self._stopping.is_set():
            pass

    def _answer(
        self, endpoint: str, item_id: str | None, request: RecordedRequest
    ) -> tuple[int, dict[str, str], bytes | Iterator[bytes]]:
        """(status, headers, body) for a request that reached the data."""
        if request.headers.get("x-vital-api-key") != self.api_key:
            return _error(401, "Invalid API key")
        with self._lock:
            if endpoint == "order":
                order = self._orders.get(item_id or "")
                return _json(200, order) if order else _error(404, "Order not found")
            if endpoint == "order_transaction":
                transaction = self._transactions.get(item_id or "")
                if transaction is None:
                    return _error(404, "Order transaction not found")
                return _json(200, self._render_transaction(transaction, self.status_spelling))
            if endpoint == "transaction_result":
                results = self._results.get(item_id or "")
                if results is None:
                    return _error(404, "Results not found")
                return 200, {"Content-Type": "application/json"}, results
            if endpoint == "transaction_result_pdf":
                pdf = self._pdfs.get(item_id or "")
                if pdf is None:
                    return _error(404, "Results not found")
                size = self.pdf_chunk_size
                chunks = iter([pdf[i : i + size] for i in range(0, len(pdf), size)])
                return 200, {"Content-Type": "application/pdf"}, chunks
            if endpoint == "orders":
                return self._list_orders(request)
            if endpoint == "resend_events":
                return self._resend(request)
        return _error(404, "Not Found")

    def _render_transaction(
        self, transaction: dict[str, Any], spelling: StatusSpelling
    ) -> dict[str, Any]:
        status_key, at_key = _SPELLINGS[spelling]
        rendered = {k: v for k, v in transaction.items() if k != "orders"}
        rendered["orders"] = [
            {
                **{k: v for k, v in entry.items() if k not in ("status", "status_created_at")},
                status_key: entry.get("status"),
                at_key: entry.get("status_created_at"),
            }
            for entry in transaction.get("orders", [])
        ]
        return rendered

    def _list_orders(
        self, request: RecordedRequest
    ) -> tuple[int, dict[str, str], bytes | Iterator[bytes]]:
        try:
            page = int(request.param("page") or 1)
            size = int(request.param("size") or 50)
            start = _query_time(request.param("updated_start_date"))
            end = _query_time(request.param("updated_end_date"))
        except ValueError as exc:
            return _validation_error(["query"], str(exc))
        if page < 1:
            return _validation_error(["query", "page"], "Input should be at least 1")
        if not 1 <= size <= 100:
            return _validation_error(["query", "size"], "Input should be between 1 and 100")
        matching = [
            order
            for order in self._orders.values()
            if (start is None or _time(order.get("updated_at")) >= start)
            and (end is None or _time(order.get("updated_at")) <= end)
        ]
        matching.sort(key=lambda o: (_time(o.get("created_at")), o["id"]))
        chunk = matching[(page - 1) * size : page * size]
        return _json(200, {"orders": chunk, "total": len(matching), "page": page, "size": size})

    def _resend(self, request: RecordedRequest) -> tuple[int, dict[str, str], bytes]:
        try:
            body = request.json()
        except ValueError:
            return _validation_error(["body"], "Invalid JSON")
        order_ids = body.get("order_ids")
        start_at, end_at = body.get("start_at"), body.get("end_at")
        if order_ids is None and start_at is None:
            return _validation_error(["body"], "At least one of order_ids or start_at is required")
        chosen: list[str] = []
        if order_ids is not None:
            chosen += [i for i in order_ids if i in self._orders]
        if start_at is not None:
            start = _time(start_at)
            end = _time(end_at) if end_at else self.now()
            if end - start > _RESEND_WINDOW:
                return _validation_error(["body"], "The window cannot exceed 60 days")
            chosen += [
                order_id
                for order_id, order in self._orders.items()
                if start <= _time(order.get("updated_at")) <= end and order_id not in chosen
            ]
        return _json(200, {"order_ids": chosen})


class _Handler(BaseHTTPRequestHandler):
    fake: FakeJunction
    # Keep-alive, as the provider; every answer has a length or is chunked.
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: pytest shows what failed

    def _serve(self, method: str) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        endpoint, item_id = self.fake._route(method, url.path)
        request = RecordedRequest(
            endpoint=endpoint,
            method=method,
            path=url.path,
            query=parse_qs(url.query),
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
        )
        self.fake._record(request)
        try:
            self.fake._wait_if_held(endpoint)
            fault = self.fake._next_fault(endpoint)
            if fault is not None and fault.disconnect:
                self.close_connection = True
                return
            if fault is not None and fault.delay:
                self.fake._stopping.wait(fault.delay)
            if fault is not None and fault.status is not None:
                headers = {"Content-Type": "application/json", **fault.headers}
                self._write(fault.status, headers, fault.body)
            else:
                self._write(*self.fake._answer(endpoint, item_id, request))
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up (a timeout): nothing to answer.
            self.close_connection = True
        finally:
            self.fake._done()

    def _write(self, status: int, headers: dict[str, str], body: bytes | Iterator[bytes]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if isinstance(body, bytes):
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for chunk in body:
            self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")


def _json(status: int, value: Any) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(value).encode()


def _error(status: int, detail: str) -> tuple[int, dict[str, str], bytes]:
    return _json(status, {"detail": detail})


def _validation_error(loc: list[str], message: str) -> tuple[int, dict[str, str], bytes]:
    return _json(422, {"detail": [{"loc": loc, "msg": message, "type": "value_error"}]})


def _time(value: str | None) -> datetime:
    if not value:
        return datetime.min.replace(tzinfo=UTC)
    parsed = datetime.fromisoformat(value)
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed


def _query_time(value: str | None) -> datetime | None:
    # The provider: "If a date is provided without a time, the time will be set to 00:00:00".
    if not value:
        return None
    if len(value) == 10:
        return datetime.combine(date.fromisoformat(value), time.min, tzinfo=UTC)
    return _time(value)


def _neutral_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """A transaction entry with its status under neutral names, whichever spelling it came in."""
    out = {
        k: v
        for k, v in entry.items()
        if k
        not in (
            "low_level_status",
            "low_level_status_created_at",
            "last_status",
            "last_status_created_at",
        )
    }
    out["status"] = entry.get("low_level_status") or entry.get("last_status")
    out["status_created_at"] = entry.get("low_level_status_created_at") or entry.get(
        "last_status_created_at"
    )
    return out


def _as_of(transaction: dict[str, Any]) -> datetime:
    times = [
        _time(entry.get(key))
        for entry in transaction.get("orders", [])
        for key in ("updated_at", "status_created_at")
    ]
    return max(times, default=datetime.min.replace(tzinfo=UTC))


def wait_until(predicate: Callable[[], bool], *, timeout: float = 10.0) -> None:
    """For sync tests: wait for `predicate` with a deadline (never a fixed sleep)."""
    never = threading.Event()
    deadline = monotonic() + timeout
    while not predicate():
        if monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        never.wait(0.01)
