"""Draining on shutdown, so calls racing a stop are answered UNAVAILABLE, not CANCELLED.

gRPC cancels the calls its core has received but the application has not picked up yet when the
server stops. So the service first stops taking work while still listening (ingest and watches
answer UNAVAILABLE), keeps picking up calls until none has arrived for a short quiet period, and
only then stops the server; calls after that are refused by the transport (GOAWAY), which
clients also see as UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

QUIET_SECONDS = 0.2
Request = TypeVar("Request")
Response = TypeVar("Response")


class CallArrivals(grpc.aio.ServerInterceptor):
    """Remembers when the last call was picked up."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Request, Response] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Request, Response] | None:
        self.last = time.monotonic()
        return await continuation(handler_call_details)

    async def quiet(self, limit: float) -> None:
        """Return once no call arrived for QUIET_SECONDS, or after `limit` seconds."""
        deadline = time.monotonic() + limit
        while True:
            now = time.monotonic()
            waited = now - self.last
            if waited >= QUIET_SECONDS or now >= deadline:
                return
            await asyncio.sleep(min(QUIET_SECONDS - waited, deadline - now))
