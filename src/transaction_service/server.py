"""Wires the service together and runs it: store, ingestor, gRPC server, health, reflection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from datetime import UTC, datetime, timedelta

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from transaction_service.api.reflection import enable_reflection
from transaction_service.api.servicer import TransactionServicer, add_to_server
from transaction_service.config import Settings
from transaction_service.ingest import Ingestor
from transaction_service.store.sqlite import SqliteStore
from transaction_service.watch import ChangeHub
from transactions.v1 import transactions_pb2 as pb

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TransactionService"].full_name


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Ping idle clients every 30 s and drop them if no answer within 10 s, so dead peers of
        # long-lived calls are noticed (the default is every 2 hours).
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # Let clients ping as often as every 10 s without being sent GOAWAY.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
    ]


class TransactionService:
    """The running service. `start()` binds and serves; `stop()` drains and closes everything."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = SqliteStore(settings.db, synchronous=settings.sqlite_synchronous)
        self.hub = ChangeHub(
            self.store,
            queue_size=settings.watch_queue_size,
            progress_interval=settings.watch_progress_seconds,
        )
        self.ingestor = Ingestor(
            self.store, max_batch=settings.max_batch, on_changes=self.hub.publish
        )
        self.health = HealthServicer()
        self.server = grpc.aio.server(options=grpc_options(settings))
        self.port = 0
        self._trimmer: asyncio.Task[None] | None = None

    async def start(self) -> int:
        await self.store.open()
        self.ingestor.start()
        add_to_server(
            TransactionServicer(
                self.ingestor,
                self.store,
                self.hub,
                max_body_bytes=self.settings.max_body_bytes,
            ),
            self.server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        enable_reflection(
            self.server, [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        )
        address = f"{self.settings.grpc_host}:{self.settings.grpc_port}"
        self.port = self.server.add_insecure_port(address)
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._trimmer = asyncio.create_task(self._trim_changes(), name="change-log-trimmer")
        return self.port

    async def stop(self) -> None:
        # Health first, so load balancers stop sending new calls while in-flight ones finish.
        await self.health.enter_graceful_shutdown()
        # Watch streams never end by themselves: end them now, each with the revision to resume
        # from, rather than have them cut off when the grace period runs out.
        self.hub.close()
        if self._trimmer is not None:
            self._trimmer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._trimmer
        await self.server.stop(self.settings.shutdown_grace_seconds)
        await self.ingestor.stop()
        await self.store.close()

    async def _trim_changes(self) -> None:
        retention = timedelta(seconds=self.settings.change_retention_seconds)
        while True:
            try:
                compacted = await self.store.trim_changes(datetime.now(UTC) - retention)
                log.debug("change log compacted through revision %d", compacted)
            except Exception:
                log.exception("trimming the change log failed; will retry")
            await asyncio.sleep(self.settings.change_trim_interval_seconds)


async def serve(settings: Settings) -> None:
    service = TransactionService(settings)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        port = await service.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await service.stop()
        raise
    log.info(
        "transaction-service listening on %s:%d (db %s)",
        settings.grpc_host,
        port,
        settings.db,
    )
    await stopping.wait()
    log.info("shutting down (grace %.1fs)", settings.shutdown_grace_seconds)
    await service.stop()
    log.info("stopped")
