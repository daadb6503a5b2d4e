"""A client's watches on shared `Watch` streams (many watches a stream), for `Watch` to resume.

`TransactionClient(..., watches_per_stream=N)` opens its watches here instead of a stream each:
each watch is a create on a `Watch` stream with room (at most N watches a stream; a stream is
opened when none has room), and what `Watch` (watch.py) reads from it looks like the call of a
stream of its own (`WatchCall`): `read()` returns the watch's own messages, and raises the
`canceled` status, or the stream's, as the `grpc.aio.AioRpcError` that stream would have ended
with. So every behaviour of watch.py (resume from the last revision, silence, resync after
compaction, checkpoints) holds unchanged. `cancel()` sends the watch's cancel.

A stream that breaks (a restart, shutdown, a lost connection) ends every watch on it with its
error; each then resumes from its own position on a stream with room, as after any break.

Reading: each stream's messages are handed to its watches' buffers (`buffer_size` messages
each). A watch whose consumer does not keep up fills its buffer; the stream's reader then waits,
so the other watches of that stream wait too, until it reads or is cancelled (the server
parks them and later catches them up from its change log; nothing is lost). Consumers of very
different speed are better on streams of their own (watches_per_stream=0, the default).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import TYPE_CHECKING, Any

import grpc

# googleapis-common-protos ships no type information (and typeshed has none for it).
from google.rpc import status_pb2  # type: ignore[import-untyped]

from transactions.v1 import transactions_pb2 as pb

if TYPE_CHECKING:
    from transaction_client.client import TransactionClient

_DETAILS_KEY = "grpc-status-details-bin"
_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _rpc_error(status: Any) -> grpc.aio.AioRpcError:
    """The error a stream of the watch's own would have ended with, for `status`."""
    code = _CODES.get(status.code, grpc.StatusCode.UNKNOWN)
    return grpc.aio.AioRpcError(
        code,
        grpc.aio.Metadata(),
        grpc.aio.Metadata((_DETAILS_KEY, status.SerializeToString())),
        details=status.message,
    )


class WatchCall:
    """One watch on a shared stream, read like a watch stream call of its own."""

    def __init__(self, stream: _Stream, watch_id: int, buffer_size: int) -> None:
        self._stream = stream
        self.watch_id = watch_id
        # Its messages, then its end (an error, or EOF).
        self.messages: asyncio.Queue[Any] = asyncio.Queue(maxsize=buffer_size)

    async def read(self) -> Any:
        item = await self.messages.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self._stream.cancel(self.watch_id)
        # Nobody reads it any more: emptied, so that the stream's reader, if it waits to hand it
        # a message (its buffer was full), goes on to the other watches instead of for ever.
        while not self.messages.empty():
            self.messages.get_nowait()


class _Stream:
    """A `Watch` stream and its watches."""

    def __init__(self, owner: WatchStreams) -> None:
        self._owner = owner
        self.watches: dict[int, WatchCall] = {}
        self._ids = itertools.count(1)
        # The requests to send; None once the stream is over (its sender then ends).
        self._requests: asyncio.Queue[pb.WatchRequest | None] = asyncio.Queue()
        client = owner.client
        self._call = client.stub.Watch(self._writes(), metadata=client.metadata)
        self._reader = asyncio.get_running_loop().create_task(self._read())
        self.closed = False
        # Set once a watch of it ended UNAVAILABLE (the server is stopping): no new watch is
        # created on it, so that those resuming go to a new stream.
        self.draining = False
        # The server refused a watch on it for holding too many: none more go on it.
        self.full = False

    async def _writes(self) -> Any:
        while (request := await self._requests.get()) is not None:
            yield request

    def create(self, create: pb.WatchCreateRequest, buffer_size: int) -> WatchCall:
        create.watch_id = next(self._ids)
        watch = WatchCall(self, create.watch_id, buffer_size)
        self.watches[create.watch_id] = watch
        self._requests.put_nowait(pb.WatchRequest(create=create))
        return watch

    def cancel(self, watch_id: int) -> None:
        if self.watches.pop(watch_id, None) is not None and not self.closed:
            self._requests.put_nowait(
                pb.WatchRequest(cancel=pb.WatchCancelRequest(watch_id=watch_id))
            )
        if not self.watches:
            self.close()  # a stream without watches is not kept open

    async def _read(self) -> None:
        end: BaseException
        try:
            async for response in self._call:
                watch = self.watches.get(response.watch_id)
                if watch is None:
                    continue  # cancelled: what was on its way is dropped
                event = response.WhichOneof("event")
                if event == "transaction":
                    await watch.messages.put(response.transaction)
                elif event == "transactions":
                    await watch.messages.put(response.transactions)
                elif event == "canceled":
                    del self.watches[response.watch_id]
                    ended = response.canceled
                    if ended.code == grpc.StatusCode.UNAVAILABLE.value[0]:
                        self.draining = True
                    elif ended.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]:
                        # The server allows fewer watches a stream (TOO_MANY_WATCHES) than
                        # watches_per_stream: no more go on this one, and the watch resumes on
                        # another (UNAVAILABLE is what a watch retries).
                        self.full = True
                        ended = status_pb2.Status(
                            code=14, message=f"moved to another stream: {ended.message}"
                        )
                    if ended.code == 0:  # a cancel not of this client's: as a stream's end
                        ended = status_pb2.Status(code=14, message="the watch was cancelled")
                    await watch.messages.put(_rpc_error(ended))
            end = grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                details="the stream ended",
            )
        except grpc.aio.AioRpcError as exc:
            end = exc
        except asyncio.CancelledError:
            return
        self._end(end)

    def _end(self, error: BaseException) -> None:
        self.closed = True
        self._owner.forget(self)
        # gRPC's task sending the requests would otherwise wait for the next for ever.
        self._requests.put_nowait(None)
        watches, self.watches = self.watches, {}
        for watch in watches.values():
            # Its consumer reads what it was sent, then the end.
            try:
                watch.messages.put_nowait(error)
            except asyncio.QueueFull:
                asyncio.get_running_loop().create_task(watch.messages.put(error))

    def close(self) -> None:
        """End the stream; watches still on it end CANCELLED (the client is closing)."""
        if not self.closed:
            self._call.cancel()
            self._reader.cancel()
            self._end(
                grpc.aio.AioRpcError(
                    grpc.StatusCode.CANCELLED,
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    details="the client closed the stream",
                )
            )


class WatchStreams:
    """The `Watch` streams of one client, at most `per_stream` watches each."""

    def __init__(self, client: TransactionClient, per_stream: int, buffer_size: int = 16) -> None:
        self.client = client
        self.per_stream = per_stream
        self._buffer_size = buffer_size
        self._streams: list[_Stream] = []

    @property
    def streams(self) -> int:
        return len(self._streams)

    def open(self, create: pb.WatchCreateRequest) -> WatchCall:
        """A watch of `create`'s target, on a stream with room (a new one if none has)."""
        stream = next(
            (
                s
                for s in self._streams
                if len(s.watches) < self.per_stream and not s.draining and not s.full
            ),
            None,
        )
        if stream is None:
            stream = _Stream(self)
            self._streams.append(stream)
        return stream.create(create, self._buffer_size)

    def forget(self, stream: _Stream) -> None:
        with contextlib.suppress(ValueError):
            self._streams.remove(stream)

    def close(self) -> None:
        for stream in list(self._streams):
            stream.close()
