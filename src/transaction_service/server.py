"""The running process: the `App` and its two listeners, gRPC and HTTP, started and stopped
together in one event loop.

Start: check the settings that need files or ports (TLS files, both ports), open the app (store,
ingest, watch, background tasks), then serve gRPC and HTTP. Stop (SIGTERM/SIGINT): gRPC health and
HTTP readiness flip to not serving and new webhooks are refused with 503, so balancers and Svix go
elsewhere; watch streams end with the revision to resume from; after `shutdown_delay_seconds` both
listeners drain (calls and requests in flight get `shutdown_grace_seconds`); then queued deliveries
are committed and the store is closed last.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from transaction_service import tracing
from transaction_service.api.access import CallObserver
from transaction_service.api.auth import READ_METHODS
from transaction_service.api.drain import CallArrivals
from transaction_service.api.gateway import Gateway
from transaction_service.api.reflection import reflection_handlers
from transaction_service.api.servicer import TransactionServicer, method_handlers
from transaction_service.api.tls import server_credentials, transport_mode
from transaction_service.app import App, StartupError
from transaction_service.auth import BearerTokens
from transaction_service.config import Settings
from transaction_service.http import HttpListener, webhook_mode
from transaction_service.junction.client import JunctionClient
from transaction_service.store.base import Store
from transaction_service.usecases.ingest import Ingestor
from transaction_service.usecases.watch import ChangeHub
from transactions.v1 import transactions_pb2 as pb

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TransactionService"].full_name
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# The methods whose successful unary calls get sampled access lines (access_log_reads_every):
# the service's reads and the health checks (probes call them every few seconds).
SAMPLED_READS = frozenset(
    [f"/{SERVICE_NAME}/{name}" for name in READ_METHODS]
    + [f"/{HEALTH_SERVICE_NAME}/{name}" for name in ("Check", "List")]
)


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # A second process must not share the port: gRPC sets SO_REUSEPORT by default, and two
        # servers on one port (and one database) would each take part of the traffic.
        ("grpc.so_reuseport", 0),
        # Ping clients every keepalive_seconds and drop them if no answer within
        # keepalive_timeout_seconds, so dead or frozen peers of long-lived watch streams are
        # noticed and their subscriptions released (gRPC's default is every 2 hours).
        ("grpc.keepalive_time_ms", int(settings.keepalive_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_seconds * 1000)),
        # gRPC core times out an unanswered keepalive ping by this (default 60 s), not only by
        # keepalive_timeout_ms: without it a frozen client kept its streams for over a minute.
        ("grpc.http2.ping_timeout_ms", int(settings.keepalive_timeout_seconds * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        # gRPC cancels calls the server has not picked up yet once more than 1,000 are pending
        # (and refuses at once past 3,000). Every client reopens its watches at once after a
        # restart or a failover; thousands of simultaneous calls must wait their turn, not fail.
        ("grpc.server.max_pending_requests", 20_000),
        ("grpc.server.max_pending_requests_hard_limit", 40_000),
        # Let clients ping as often as every 10 s without being sent GOAWAY.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        # What one connection can hold (docs/limits.md). Streams in progress at once, advertised
        # as SETTINGS_MAX_CONCURRENT_STREAMS; a stream past it is refused (REFUSED_STREAM)
        # before any of it reaches Python.
        ("grpc.max_concurrent_streams", settings.grpc_max_concurrent_streams),
        # A stream the client reset keeps counting until the server has let go of it (gRPC's
        # default, stated here because the cap rests on it): without it, streams opened and
        # reset at once slip past the cap, and 150,000 of them cost 20 s of CPU instead of 4.
        ("grpc.http.overload_protection", 1),
        # A connection that has not finished its TLS handshake and HTTP/2 preface by then is
        # closed (gRPC's default is 120 s).
        ("grpc.server_handshake_timeout_ms", int(settings.grpc_handshake_timeout_seconds * 1000)),
    ]


def _check_port_free(host: str, port: int) -> None:
    """A clear error for a port in use, before gRPC prints its own multi-line complaint."""
    if port == 0:
        return
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # Like every server socket: a port left in TIME_WAIT by a previous run is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((bare, port))
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc} "
                "(is another transaction-service running? set --grpc-port)"
            ) from None


class TransactionService:
    """The whole running service: `start()` opens the app and binds; `stop()` drains and closes."""

    def __init__(self, settings: Settings, app: App | None = None) -> None:
        self.settings = settings
        self.app = app if app is not None else App(settings)
        self.health = health_aio.HealthServicer()
        tokens = BearerTokens(settings.ingest_tokens, settings.read_tokens)
        self.arrivals = CallArrivals()
        self.observer = observer = CallObserver(
            self.app.metrics,
            tokens,
            reads_every=settings.access_log_reads_every,
            read_methods=SAMPLED_READS,
        )
        for service in (
            pb.DESCRIPTOR.services_by_name["TransactionService"],
            health_pb2.DESCRIPTOR.services_by_name["Health"],
        ):
            observer.register(service)
        # Every call's handler comes from the gateway: arrivals for draining, the token check,
        # request ids, metrics and access lines (api/gateway.py). Tracing's interceptor, when
        # tracing is on, runs before it: its span covers the call, so access lines carry its
        # trace id.
        self.gateway = Gateway(observer, self.arrivals, tokens)
        self.server = self.arrivals.track(
            lambda: grpc.aio.server(
                options=grpc_options(settings), interceptors=tracing.interceptors()
            )
        )
        self.server.add_generic_rpc_handlers((self.gateway,))
        self.http = HttpListener(self.app)
        self.port = 0
        self._health_updates: set[asyncio.Task[None]] = set()

    @property
    def http_port(self) -> int:
        return self.http.port

    # Shortcuts used by tests and tools.
    @property
    def store(self) -> Store:
        return self.app.store

    @property
    def hub(self) -> ChangeHub:
        return self.app.hub

    @property
    def ingestor(self) -> Ingestor:
        return self.app.ingestor

    async def start(self) -> int:
        """Open the app and serve both listeners; the gRPC port. Raises StartupError (nothing
        is left open then)."""
        settings = self.settings
        _check_port_free(settings.grpc_host, settings.grpc_port)
        credentials = server_credentials(settings)
        self.http.bind()
        try:
            await self.app.start()
        except BaseException:
            await self.http.stop()
            raise
        try:
            self.gateway.add(*method_handlers(TransactionServicer(self.app)))
            self.gateway.add_generated(health_pb2_grpc.add_HealthServicer_to_server, self.health)
            for name, handlers in reflection_handlers([SERVICE_NAME, HEALTH_SERVICE_NAME]).items():
                self.gateway.add(name, handlers)
            address = f"{settings.grpc_host}:{settings.grpc_port}"
            try:
                if credentials is None:
                    self.port = self.server.add_insecure_port(address)
                else:
                    self.port = self.server.add_secure_port(address, credentials)
            except RuntimeError:
                raise StartupError(f"cannot listen on {address}") from None
            await self.server.start()
            await self.http.start()
            await self._set_health(self.app.store.health.healthy)
            self.app.store.health.subscribe(self._store_health_changed)
        except BaseException:
            await self.server.stop(0)
            await self.http.stop()
            await self.app.stop()
            raise
        return self.port

    def _store_health_changed(self, healthy: bool) -> None:
        task = asyncio.get_running_loop().create_task(self._set_health(healthy))
        self._health_updates.add(task)
        task.add_done_callback(self._health_updates.discard)

    async def _set_health(self, healthy: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if healthy
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        # Ignored by the servicer once shutdown began.
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def begin_shutdown(self) -> None:
        """Stop taking new work while still listening: gRPC health says NOT_SERVING, /readyz
        503, new webhooks 503, and watch streams end with the revision to resume from."""
        await self.health.enter_graceful_shutdown()
        self.app.begin_shutdown()

    async def stop(self) -> None:
        # Health and readiness first, so balancers stop sending new work while in-flight calls
        # finish. Watch streams never end by themselves: they are ended here too, rather than
        # cut off when the grace period runs out.
        await self.begin_shutdown()
        await asyncio.gather(self._stop_grpc(), self.http.stop())
        # Then commit what is queued and close the store.
        await self.app.stop()

    async def _stop_grpc(self) -> None:
        """Stop the gRPC server once it has nothing to cancel, within the grace.

        Calls arriving meanwhile are picked up and refused UNAVAILABLE by the app. gRPC's stop
        cancels (CANCELLED) the calls its core has not handed over yet, those that arrive while
        it waits, and those still running at the end of the grace: so it is called only once no
        call is in progress or waiting and none arrived for a moment (api/drain.py)."""
        grace = self.settings.shutdown_grace_seconds
        started = time.monotonic()
        if not await self.arrivals.drained(limit=grace):
            log.warning("grpc: calls still in progress after the grace (%gs): cancelled", grace)
            self.observer.cutting_off = True
        await self.server.stop(max(0.0, grace - (time.monotonic() - started)))


def log_security(settings: Settings) -> None:
    """State at start how each door is guarded; loudly where it is open."""
    tokens = (len(settings.ingest_tokens), len(settings.read_tokens))
    if any(tokens):
        guard = f"bearer tokens required ({tokens[0]} ingest, {tokens[1]} read)"
    else:
        guard = "no tokens configured: every caller may ingest and read"
    log.info("grpc: %s; %s", transport_mode(settings), guard)
    if not any(tokens) and not settings.tls_client_ca and not is_loopback(settings.grpc_host):
        log.warning(
            "grpc: OPEN TO THE NETWORK: listening on %s with neither tokens nor mutual TLS, so "
            "anyone who can reach the port can ingest, read and change every transaction (turn "
            "a completed one into a cancelled one). Set TRANSACTION_SERVICE_INGEST_TOKENS and "
            "TRANSACTION_SERVICE_READ_TOKENS, or --tls-client-ca; or listen on 127.0.0.1 only "
            "(see docs/security.md)",
            settings.grpc_host,
        )
    mode = webhook_mode(settings)
    if mode == "signed":
        log.info(
            "webhooks: POST /webhooks/junction verifies Svix signatures (%d secret%s)",
            len(settings.webhook_secrets),
            "" if len(settings.webhook_secrets) == 1 else "s",
        )
    elif mode == "unsigned":
        log.warning(
            "webhooks: UNSIGNED WEBHOOKS ACCEPTED (--webhook-allow-unsigned): anyone who reaches "
            "the HTTP port can write transactions. For local development only."
        )
    else:
        log.warning(
            "webhooks: POST /webhooks/junction is off (answers 503): no webhook secret "
            "configured; set TRANSACTION_SERVICE_WEBHOOK_SECRETS"
        )


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name, IPv6 in brackets or not) is this machine only."""
    bare = host.strip("[]")
    if bare == "localhost":
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False  # a name other than localhost: it may resolve to anything


def log_junction(settings: Settings, junction: JunctionClient | None) -> None:
    """State at start what Junction's API is used for, if anything."""
    if junction is None:
        log.info(
            "junction api: not configured (no TRANSACTION_SERVICE_JUNCTION_API_KEY): no "
            "reconcile, sweep or combined results"
        )
        return
    interval = settings.reconcile_interval_seconds
    sweep = (
        f"sweep every {interval:g} s of transactions silent for "
        f"{settings.reconcile_after_seconds:g} s"
        if interval
        else "no sweep"
    )
    log.info(
        "junction api: %s; combined results fetched on completion; %s", junction.base_url, sweep
    )


def raise_fd_limit() -> None:
    """Raise the soft file descriptor limit to the hard one: the soft one is often 1,024, which a
    modest flood of HTTP connections would use up (the HTTP listener takes at most half of it;
    see `connection_cap` in http/guard.py)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY or soft >= hard:
        return  # macOS reports an unlimited hard limit that setrlimit refuses: keep the soft one
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def log_http_limits(settings: Settings, listener: HttpListener) -> None:
    cap, fd_limit = listener.max_connections, listener.fd_limit
    if fd_limit is None:
        log.info("http: at most %d connections at once", cap)
        return
    log.info(
        "http: at most %d connections at once; file descriptor limit %d, the rest kept for gRPC "
        "and the store",
        cap,
        fd_limit,
    )
    if cap < settings.http_max_connections:
        log.warning(
            "http: --http-max-connections lowered from %d to %d, half the file descriptor limit "
            "(%d); raise the limit (ulimit -n) to allow more",
            settings.http_max_connections,
            cap,
            fd_limit,
        )


async def serve(settings: Settings) -> None:
    raise_fd_limit()
    service = TransactionService(settings)
    signals = asyncio.Queue[signal.Signals]()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    port = await service.start()
    log_junction(settings, service.app.junction)
    log_security(settings)
    log_http_limits(settings, service.http)
    # The HTTP line first: once the gRPC line is there, both ports are known.
    log.info("http listening on %s:%d", settings.http_host, service.http_port)
    log.info(
        "transaction-service listening on %s:%d (%s, db %s)",
        settings.grpc_host,
        port,
        transport_mode(settings),
        service.store.description,
    )
    with contextlib.suppress(asyncio.CancelledError):
        await signals.get()
    await service.begin_shutdown()
    delay = settings.shutdown_delay_seconds
    if delay > 0:
        log.info("not ready; closing the listeners in %.1fs (signal again to skip)", delay)
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(signals.get(), delay)
    log.info("shutting down (grace %.1fs)", settings.shutdown_grace_seconds)
    await service.stop()
    log.info("stopped")
