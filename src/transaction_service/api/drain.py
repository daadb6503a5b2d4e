"""Draining on shutdown, so calls racing a stop are answered UNAVAILABLE, not CANCELLED.

gRPC's `server.stop(grace)` cancels (CANCELLED) every call its core has received but the
application has not picked up yet, every call that arrives while it waits for the calls in
progress, and, when the grace runs out, the calls still in progress. So the service stops the
server only once nothing is left for it to cancel. First it stops taking work while still
listening (ingest and watches answer UNAVAILABLE `SHUTTING_DOWN`, watch streams end with the
revision to resume from); then it keeps picking up calls (and refusing new work) until no call is
in progress or waiting in gRPC's core, and none has arrived for a short quiet period; only then
does it stop the server. Calls after that are refused by the transport (GOAWAY), which clients
also see as UNAVAILABLE. Waiting is bounded by the shutdown grace.

"In progress or waiting" is read from gRPC core's own call counters (channelz: calls started
less calls ended), so calls that reached the core but not yet the event loop (a busy machine) are
counted too. Health `Watch` streams, which only the server's stop ends, are left out.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

log = logging.getLogger(__name__)

QUIET_SECONDS = 0.2
# How often the drain looks at the counters.
POLL_SECONDS = 0.02
# Streams that end only when the server stops: not waited for.
ENDLESS_METHODS = frozenset({"/grpc.health.v1.Health/Watch"})
Request = TypeVar("Request")
Response = TypeVar("Response")


def _channelz_servers() -> dict[int, dict[str, Any]] | None:
    """Every gRPC server of this process by channelz id, with its call counters; None if
    channelz cannot say (turned off, or an API this grpcio lacks)."""
    try:
        # grpcio's own channelz service reads the same; private, so looked up where a failure
        # is caught.
        cygrpc: Any = importlib.import_module("grpc._cython.cygrpc")

        servers: dict[int, dict[str, Any]] = {}
        start = 0
        while True:
            page = json.loads(cygrpc.channelz_get_servers(start))
            for server in page.get("server", []):
                servers[int(server["ref"]["serverId"])] = server.get("data", {})
            if page.get("end", True) or not page.get("server"):
                return servers
            start = max(servers) + 1
    except Exception:  # without the counters the drain waits for a quiet period only
        return None


class CallArrivals:
    """Remembers when the last call was picked up (`arrived`, called by `api/gateway.py` for
    every call), counts the endless streams open (their handlers `wrap`ped), and tells (from
    channelz) how many calls the server's core has that have not ended."""

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.endless = 0
        self._server_id: int | None = None

    def track(self, make_server: Callable[[], grpc.aio.Server]) -> grpc.aio.Server:
        """`make_server()`, remembering its channelz id (the one server it added)."""
        before = _channelz_servers()
        server = make_server()
        after = _channelz_servers()
        if before is not None and after is not None:
            new = set(after) - set(before)
            if len(new) == 1:
                self._server_id = new.pop()
        return server

    def unfinished(self) -> int | None:
        """Calls the server's core received and has not ended (waiting to be picked up, or in
        progress), endless streams left out; None if that cannot be told."""
        if self._server_id is None:
            return None
        servers = _channelz_servers()
        if servers is None or self._server_id not in servers:
            return None
        data = servers[self._server_id]
        started = int(data.get("callsStarted", 0))
        ended = int(data.get("callsSucceeded", 0)) + int(data.get("callsFailed", 0))
        return started - ended - self.endless

    def arrived(self) -> None:
        self.last = time.monotonic()

    def wrap(
        self, method: str, handler: grpc.RpcMethodHandler[Request, Response]
    ) -> grpc.RpcMethodHandler[Request, Response]:
        """`handler` of `method` (its full name), counted in `endless` while it runs if the
        method is one of ENDLESS_METHODS."""
        if method not in ENDLESS_METHODS or handler.unary_stream is None:
            return handler
        return grpc.unary_stream_rpc_method_handler(
            self._counted(handler.unary_stream),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _counted(self, behavior: Any) -> Any:
        """`behavior` (a coroutine or async generator function), counted in `endless` while it
        runs."""
        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                self.endless += 1
                try:
                    async for response in behavior(request, context):
                        yield response
                finally:
                    self.endless -= 1

            return stream

        async def call(request: Any, context: Any) -> Any:
            self.endless += 1
            try:
                return await behavior(request, context)
            finally:
                self.endless -= 1

        return call

    async def drained(self, limit: float) -> bool:
        """Return once no call is in progress or waiting (as far as channelz tells) and none
        arrived for QUIET_SECONDS: True; or after `limit` seconds: False."""
        deadline = time.monotonic() + limit
        while True:
            now = time.monotonic()
            busy = self.unfinished()
            if (busy is None or busy <= 0) and now - self.last >= QUIET_SECONDS:
                return True
            if now >= deadline:
                return False
            await asyncio.sleep(min(POLL_SECONDS, deadline - now))
