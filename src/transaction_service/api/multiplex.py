"""One `Watch` stream: many watches, their messages out through one bounded buffer.

Each watch is a task that runs the hub's watch (`usecases/watch.py:ChangeHub.watch`, exactly as
WatchTransaction and WatchTransactions run it) and puts its encoded messages into the stream's
buffer; the stream's handler sends what the buffer holds, in the order it was put; a reader task
takes the client's requests (create, cancel) as they come.

Bounds: the buffer holds at most `max_bytes` of messages, and one more (and control messages,
`created` and `canceled`, which do not wait: see `push`). A watch with a message to send while
it is full waits for room before it makes the message (then makes and queues it at once), and
takes no more changes from the hub meanwhile: past its queue of changes it falls behind and
later catches up from the change log, as the slow reader of a stream of its own does (nothing
lost).
So a client that does not read makes the server hold at most the buffer, plus what each waiting
watch holds of its next event (not its encoding: a batch's message is up to half of
max_message_bytes, so a thousand watches each holding one held hundreds of MB). The
reader takes the next request only while the buffer has room, so requests pushing control
messages are bounded the same way; at most `max_watches` are open at once; and creates, each a
read of the store that a cancel does not take back, come at most `creates_per_second` (a
second's worth at once): past it the reader waits before it takes the next request.

Every watch created gets exactly one `canceled`, its last message: pushed by its task when it
ends by itself (an error, shutdown), or by the reader when the client cancels it (the task is
cancelled first, so nothing of it can follow).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

# googleapis-common-protos ships no type information (and typeshed has none for it).
from google.rpc import code_pb2, status_pb2  # type: ignore[import-untyped]

from transaction_service.api.wire import field, varint_field
from transactions.v1 import transactions_pb2 as pb

log = logging.getLogger(__name__)

_RESPONSE = pb.WatchResponse.DESCRIPTOR.fields_by_name
WATCH_ID_FIELD = _RESPONSE["watch_id"].number
CREATED_FIELD = _RESPONSE["created"].number
TRANSACTION_FIELD = _RESPONSE["transaction"].number
TRANSACTIONS_FIELD = _RESPONSE["transactions"].number
CANCELED_FIELD = _RESPONSE["canceled"].number
# The OK status of a watch the client cancelled (a Status with every field at its default).
_OK = field(CANCELED_FIELD, b"")

# Bytes of messages a stream's buffer holds before its watches wait (see the module's doc).
BUFFER_BYTES = 1024 * 1024


def framed(watch_id: int, field_number: int, message: bytes) -> bytes:
    """A WatchResponse about `watch_id` whose field `field_number` holds `message` (bytes)."""
    # watch_id is > 0 for every watch created; a refused create echoes what it was sent.
    head = varint_field(WATCH_ID_FIELD, watch_id & 0xFFFFFFFFFFFFFFFF)
    return head + field(field_number, message)


def canceled(watch_id: int, status: status_pb2.Status | None) -> bytes:
    """A watch's last message: `status`, or OK (the client cancelled it)."""
    if status is None:
        return varint_field(WATCH_ID_FIELD, watch_id & 0xFFFFFFFFFFFFFFFF) + _OK
    return framed(watch_id, CANCELED_FIELD, status.SerializeToString())


class WatchStream:
    """The watches of one Watch stream and the buffer their messages go out through."""

    def __init__(
        self,
        *,
        max_watches: int,
        max_bytes: int = BUFFER_BYTES,
        creates_per_second: float = 1000.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_watches = max_watches
        self._max_bytes = max_bytes
        # Creates: a budget of `creates_per_second`, a second's worth at once (at least one).
        self._create_rate = creates_per_second
        self._create_burst = max(1.0, creates_per_second)
        self._create_tokens = self._create_burst
        self._clock = clock
        self._refilled = clock()
        # How often the reader waited for the create budget (for tests and curiosity).
        self.create_waits = 0
        # Open watches: their tasks by watch id.
        self.watches: dict[int, asyncio.Task[None]] = {}
        self._out: collections.deque[bytes] = collections.deque()
        self.buffered = 0  # bytes in _out
        # Watches (and the reader) waiting for room, woken in turn when there is some.
        self._room: collections.deque[asyncio.Future[None]] = collections.deque()
        # How often a watch (or the reader) waited for room (for tests and curiosity).
        self.room_waits = 0
        # The writer, while it waits for a message or the end.
        self._writer: asyncio.Future[None] | None = None
        self._half_closed = False
        self._shutting_down = False
        # What ends the stream: a ServiceError (its status), or a fault (INTERNAL, logged).
        self._error: Exception | None = None
        # The task reading the client's requests (stopped when the server shuts down).
        self.reader: asyncio.Task[None] | None = None

    # -- what the watches and the reader do ------------------------------------------------------

    def push(self, data: bytes) -> None:
        """Queue a message at once (control messages: `created`, `canceled`)."""
        self._out.append(data)
        self.buffered += len(data)
        self._wake_writer()

    async def put(self, data: bytes) -> None:
        """Queue a message of a watch, once the buffer has room."""
        await self.room()
        self.push(data)

    async def room(self) -> None:
        """Until the buffer has room (at once if it has). Those waiting go in turn: each, let
        in, lets the next look (see `_let_next_in`)."""
        while self.buffered >= self._max_bytes:
            waiter = asyncio.get_running_loop().create_future()
            self._room.append(waiter)
            self.room_waits += 1
            try:
                await waiter
            except asyncio.CancelledError:
                if not waiter.cancelled():  # let in, but cancelled before it looked: pass it on
                    self._let_next_in()
                raise
        self._let_next_in()

    async def create_budget(self) -> None:
        """Until the stream may create one more watch (at once, within its budget)."""
        while True:
            now = self._clock()
            self._create_tokens = min(
                self._create_burst,
                self._create_tokens + (now - self._refilled) * self._create_rate,
            )
            self._refilled = now
            if self._create_tokens >= 1:
                self._create_tokens -= 1
                return
            self.create_waits += 1
            await asyncio.sleep((1 - self._create_tokens) / self._create_rate)

    def start(self, watch_id: int, run: Coroutine[Any, Any, None]) -> None:
        """Open watch `watch_id`: its `created` goes out now, then what `run` puts."""
        self.push(framed(watch_id, CREATED_FIELD, b""))
        # No name: a string per watch, a thousand watches a stream.
        self.watches[watch_id] = asyncio.get_running_loop().create_task(run)

    def ended(self, watch_id: int, status: status_pb2.Status | None) -> None:
        """Watch `watch_id` ended by itself with `status` (None: OK): its last message (called
        by its task, which then returns)."""
        self.watches.pop(watch_id, None)
        self.push(canceled(watch_id, status))

    def cancel(self, watch_id: int) -> None:
        """The client cancels `watch_id`: it ends, and its `canceled` (OK) follows what it put
        before. A watch not open is ignored."""
        task = self.watches.pop(watch_id, None)
        if task is None:
            return
        task.cancel()
        self.push(canceled(watch_id, None))

    def half_closed(self) -> None:
        """The client sends no more requests: the stream ends once no watch is open."""
        self._half_closed = True
        self._wake_writer()

    def fail(self, error: Exception) -> None:
        """End the stream with `error` (after what is queued), its watches with it: at once,
        so that they queue nothing more (else the error waited until the buffer was empty,
        which a busy watch may put off for as long as it has changes to send)."""
        if self._error is None:
            self._error = error
        self.close()
        self._wake_writer()

    def shut_down(self) -> None:
        """The server stops: the hub ends every watch (each with its `canceled`), then the
        stream ends UNAVAILABLE."""
        self._shutting_down = True
        if self.reader is not None:
            self.reader.cancel()
        self._wake_writer()

    def close(self) -> None:
        """The stream is over: end every watch still open, without messages."""
        for task in self.watches.values():
            task.cancel()
        self.watches.clear()
        for waiter in self._room:
            if not waiter.done():
                waiter.cancel()

    # -- what the stream's handler does ----------------------------------------------------------

    def _wake_writer(self) -> None:
        writer = self._writer
        if writer is not None and not writer.done():
            writer.set_result(None)

    def _let_next_in(self) -> None:
        """While the buffer has room, wake the first still waiting for it: it looks again, puts
        its message if there is room (so the buffer goes past its bound by one message at most;
        control messages aside), and lets the next in; else it waits again. One at a time:
        waking all of them at each message sent cost a thousand watches waiting on a busy
        stream a thousand task switches a message."""
        room = self._room
        while room and self.buffered < self._max_bytes:
            waiter = room.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def messages(self, shutting_down: Callable[[], Exception]) -> AsyncIterator[bytes]:
        """The stream's responses, in the order they were queued, until its end: raises the
        error that ends it (`shutting_down()` when the server stops), returns for OK."""
        out = self._out
        while True:
            if out:
                data = out.popleft()
                self.buffered -= len(data)
                self._let_next_in()
                yield data
                del data
                continue
            if self._error is not None:
                raise self._error
            if not self.watches and (self._shutting_down or self._half_closed):
                if self._shutting_down:
                    raise shutting_down()
                return
            self._writer = writer = asyncio.get_running_loop().create_future()
            try:
                await writer
            finally:
                self._writer = None


def internal_status() -> status_pb2.Status:
    """The `canceled` of a watch that ended on a fault of the server (logged by the caller)."""
    return status_pb2.Status(
        code=code_pb2.INTERNAL,
        message="internal error; it was logged on the server. Create the watch again.",
    )
