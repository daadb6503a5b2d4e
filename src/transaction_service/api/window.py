"""Answering a stream of requests in order, with a bounded window of requests read ahead.

The bulk ingest stream (`IngestEvents`) reads requests, hands each to the use case at once (so
the requests of one stream share group commits), and answers them in request order. What keeps a
fast producer from filling the server's memory is that reading stops while the window is full:
gRPC then reads nothing more from the connection, and HTTP/2 flow control makes the client's
writes wait. A consumer that stops taking answers stops the reading the same way, because a
request leaves the window only once its answer has been taken.

No gRPC here: the servicer adapts this to a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Generic, TypeVar

Request = TypeVar("Request")
Answer = TypeVar("Answer")


class OrderedWindow(Generic[Request, Answer]):
    """`answers()` yields `answer(request)` for each request, in request order.

    At most `max_requests` requests (each counted as `weight` of them: a request carrying
    several deliveries counts as that many) and about `max_bytes` of them, by `size`, are read
    and not yet answered-and-taken; while the window is full no further request is read (one
    request read into a window with room may overshoot it by its own weight and size).
    `keep_reading` is asked before every read: once it says no, reading stops, the requests
    already read are still answered, and `stopped_early` is set (the servicer uses it for
    shutdown).
    """

    def __init__(
        self,
        requests: AsyncIterable[Request],
        answer: Callable[[Request], Awaitable[Answer]],
        *,
        max_requests: int,
        max_bytes: int,
        size: Callable[[Request], int] = lambda _: 0,
        weight: Callable[[Request], int] = lambda _: 1,
        keep_reading: Callable[[], bool] = lambda: True,
        on_read: Callable[[int], None] = lambda _: None,
    ) -> None:
        self._requests = requests
        self._answer = answer
        self._max_requests = max_requests
        self._max_bytes = max_bytes
        self._size = size
        self._weight = weight
        self._keep_reading = keep_reading
        # Told +weight when a request is read and -weight when its answer is taken (a gauge).
        self._on_read = on_read
        self.in_flight = 0
        self.in_flight_bytes = 0
        # The most requests ever read ahead at once; never above max_requests.
        self.peak_in_flight = 0
        self.read_count = 0
        self.stopped_early = False
        # The reader task, and whether it waits for the next request (it may be cancelled then).
        self._reader: asyncio.Task[None] | None = None
        self._waiting_for_request = False
        self._room = asyncio.Event()
        self._queue: asyncio.Queue[tuple[asyncio.Future[Answer], int, int] | None] = asyncio.Queue()

    def stop_reading(self) -> None:
        """Stop reading now, even while waiting for a request that may never come (shutdown):
        what was read is still answered, and `stopped_early` is set."""
        self._keep_reading = lambda: False
        if self._waiting_for_request and self._reader is not None:
            self._reader.cancel()

    def _full(self) -> bool:
        return self.in_flight >= self._max_requests or self.in_flight_bytes >= self._max_bytes

    async def _read(self) -> None:
        iterator = aiter(self._requests)
        try:
            while True:
                while self._full():
                    self._room.clear()
                    await self._room.wait()
                if not self._keep_reading():
                    self.stopped_early = True
                    return
                self._waiting_for_request = True
                try:
                    request = await anext(iterator)
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if self._keep_reading():  # not stop_reading: the stream itself is cancelled
                        raise
                    self.stopped_early = True
                    return
                finally:
                    self._waiting_for_request = False
                size = self._size(request)
                weight = self._weight(request)
                self.read_count += 1
                self.in_flight += weight
                self.in_flight_bytes += size
                self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
                self._on_read(weight)
                self._queue.put_nowait((asyncio.ensure_future(self._answer(request)), size, weight))
        finally:
            self._queue.put_nowait(None)

    async def answers(self) -> AsyncIterator[Answer]:
        reader = self._reader = asyncio.create_task(self._read(), name="ordered-window-reader")
        pending: list[asyncio.Future[Answer]] = []
        try:
            while (item := await self._queue.get()) is not None:
                future, size, weight = item
                pending.append(future)
                answer = await future
                pending.pop()
                yield answer
                # Taken: its place in the window is free.
                self.in_flight -= weight
                self.in_flight_bytes -= size
                self._on_read(-weight)
                self._room.set()
            # The request stream ended, or failed: a failure is raised here, after every answer
            # to the requests read before it.
            await reader
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            # Answers nobody will take any more: the use case's own work goes on regardless (an
            # ingest is shielded), only the waiting stops.
            while not self._queue.empty():
                if (item := self._queue.get_nowait()) is not None:
                    pending.append(item[0])
            for future in pending:
                future.cancel()
            if self.in_flight:
                self._on_read(-self.in_flight)
                self.in_flight = 0
