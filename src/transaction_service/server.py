"""The running process: the `App` and its listeners, started and stopped together.

Start: open the app (store, ingest, watch, background tasks), then bind and serve gRPC. Stop
(SIGTERM/SIGINT): health and readiness flip to NOT_SERVING so balancers drain, watch streams end
with the revision to resume from, calls in flight get `shutdown_grace_seconds`, queued deliveries
are committed, and the store is closed last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from transaction_service.api.reflection import enable_reflection
from transaction_service.api.servicer import TransactionServicer, add_to_server
from transaction_service.app import App, StartupError
from transaction_service.config import Settings
from transaction_service.ingest import Ingestor
from transaction_service.store.base import Store
from transaction_service.watch import ChangeHub
from transactions.v1 import transactions_pb2 as pb

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TransactionService"].full_name
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # A second process must not share the port: gRPC sets SO_REUSEPORT by default, and two
        # servers on one port (and one database) would each take part of the traffic.
        ("grpc.so_reuseport", 0),
        # Ping idle clients every 30 s and drop them if no answer within 10 s, so dead peers of
        # long-lived calls are noticed (the default is every 2 hours).
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # Let clients ping as often as every 10 s without being sent GOAWAY.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
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
        self.server = grpc.aio.server(options=grpc_options(settings))
        self.port = 0
        self._health_updates: set[asyncio.Task[None]] = set()

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
        settings = self.settings
        _check_port_free(settings.grpc_host, settings.grpc_port)
        await self.app.start()
        try:
            add_to_server(TransactionServicer(self.app), self.server)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
            enable_reflection(self.server, [SERVICE_NAME, HEALTH_SERVICE_NAME])
            address = f"{settings.grpc_host}:{settings.grpc_port}"
            try:
                self.port = self.server.add_insecure_port(address)
            except RuntimeError:
                raise StartupError(f"cannot listen on {address}") from None
            await self.server.start()
            await self._set_health(self.app.store.health.healthy)
            self.app.store.health.subscribe(self._store_health_changed)
        except BaseException:
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

    async def stop(self) -> None:
        # Health first, so load balancers stop sending new calls while in-flight ones finish.
        await self.health.enter_graceful_shutdown()
        # Watch streams never end by themselves: end them now, each with the revision to resume
        # from, rather than have them cut off when the grace period runs out.
        self.app.begin_shutdown()
        await self.server.stop(self.settings.shutdown_grace_seconds)
        await self.app.stop()


async def serve(settings: Settings) -> None:
    service = TransactionService(settings)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    port = await service.start()
    log.info(
        "transaction-service listening on %s:%d (db %s)", settings.grpc_host, port, settings.db
    )
    with contextlib.suppress(asyncio.CancelledError):
        await stopping.wait()
    log.info("shutting down (grace %.1fs)", settings.shutdown_grace_seconds)
    await service.stop()
    log.info("stopped")
