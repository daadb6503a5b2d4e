"""Watch messages built from bytes: each change is serialized once, however many watchers get it.

Protobuf's wire format lets a message be assembled from already-serialized parts: a field is its
tag, its length and its bytes, and a repeated field is that, once per element. So a change's
`TransactionChange` is serialized once (and cached), and each watcher's `change` message, or
`changes` batch, is a few bytes of framing around those shared bytes. The servicer yields these
bytes; `passthrough_serializer` hands them to gRPC unchanged.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence

from google.protobuf.message import Message

from transaction_service.api.convert import change_to_pb, transaction_to_pb
from transaction_service.domain.state import ChangeKind
from transaction_service.store.base import ChangeRecord, TransactionSnapshot

_LENGTH_DELIMITED = 2


# One-byte varints, made once: most tags, small numbers and short lengths.
_SMALL = [bytes((n,)) for n in range(0x80)]


def _varint(value: int) -> bytes:
    # Every response frames each answer and its transaction: lengths under 16 KiB take no loop.
    if 0 <= value < 0x80:
        return _SMALL[value]
    if value < 0x4000:
        return bytes((value & 0x7F | 0x80, value >> 7))
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (a message, bytes or string) on the wire."""
    return _varint(number << 3 | _LENGTH_DELIMITED) + _varint(len(payload)) + payload


def varint_field(number: int, value: int) -> bytes:
    """A non-negative integer or enum field; empty for 0, as proto3 leaves defaults out."""
    return _varint(number << 3) + _varint(value) if value else b""


def string_field(number: int, value: str) -> bytes:
    return field(number, value.encode()) if value else b""


class Once:
    """A message's pre-built bytes that are let go of once serialized.

    gRPC's server loop keeps the last message a stream's handler yielded until the handler
    yields the next (so does every `async for` between them, in the interceptors): for a watch
    that waits, that is its opening `current` state or its last batch, held for as long as it
    waits. Yielded in a `Once`, what stays held is this empty shell (measured with 1,100 watches:
    about 380 bytes a watch for the opening state; a feed's last batch can be far larger)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


def passthrough_serializer(message: Message | bytes | Once) -> bytes:
    """gRPC response serializer that sends pre-built bytes as they are (a `Once`'s only once)."""
    if isinstance(message, bytes):
        return message
    if isinstance(message, Once):
        data, message.data = message.data, b""
        return data
    return message.SerializeToString()


class ChangeEncoder:
    """Serialized `TransactionChange`s, shared by every watcher of a change (a bounded cache:
    watchers read the same recent changes at nearly the same time). Each entry also keeps the
    change framed as a whole response (its `change` field, number `single_field`), and as an
    element of `ChangeBatch.changes`, so that a batch for one of thousands of feeds is one join
    of shared bytes, not a framing per change per feed, and an unbatched watcher's message is
    the same bytes object for every watcher (each stream holds on to the last message it sent)."""

    def __init__(self, single_field: int, size: int = 4096) -> None:
        self._single_field = single_field
        self._size = size
        self._cache: collections.OrderedDict[
            tuple[int, tuple[ChangeKind, ...]], tuple[bytes, bytes, bytes]
        ] = collections.OrderedDict()

    def _entry(self, change: ChangeRecord) -> tuple[bytes, bytes, bytes]:
        """(the change serialized, as a ChangeBatch.changes element, as a response)."""
        # Keyed by kinds too: a watcher of a folded stand-in sees fewer kinds than others.
        key = (change.revision, change.kinds)
        entry = self._cache.get(key)
        if entry is None:
            encoded = change_to_pb(change).SerializeToString()
            entry = (encoded, field(1, encoded), field(self._single_field, encoded))
            self._cache[key] = entry
            if len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return entry

    def encode(self, change: ChangeRecord) -> bytes:
        return self._entry(change)[0]

    def single(self, change: ChangeRecord) -> bytes:
        """A response whose `change` field holds the change."""
        return self._entry(change)[2]

    def batches(
        self, changes: Sequence[ChangeRecord], field_number: int, max_bytes: int
    ) -> Iterator[bytes]:
        """Responses whose ChangeBatch field (`field_number`) holds the changes in order, each
        response kept under `max_bytes`."""
        entry = self._entry
        elements = [entry(change)[1] for change in changes]
        if sum(map(len, elements)) <= max_bytes:  # the usual case: one message
            yield field(field_number, b"".join(elements))
            return
        parts: list[bytes] = []
        size = 0
        for element in elements:
            if parts and size + len(element) > max_bytes:
                yield field(field_number, b"".join(parts))
                parts, size = [], 0
            parts.append(element)
            size += len(element)
        if parts:
            yield field(field_number, b"".join(parts))


class TransactionEncoder:
    """Serialized `Transaction`s by revision. A revision names one state of one transaction (it is
    the revision of that transaction's last change), so a cached entry never goes stale: a read
    of an unchanged transaction skips decoding the stored view and converting it to protobuf.

    Bounded by count and by bytes (`max_bytes`): a transaction may be up to about 1 MiB, and
    reads of many large ones must not make the cache hold gigabytes."""

    def __init__(self, size: int = 16384, max_bytes: int = 64 * 1024 * 1024) -> None:
        self._size = size
        self._max_bytes = max_bytes
        self._bytes = 0
        self._cache: collections.OrderedDict[int, bytes] = collections.OrderedDict()

    @property
    def cached_bytes(self) -> int:
        return self._bytes

    def encode(self, snapshot: TransactionSnapshot) -> bytes:
        encoded = self._cache.get(snapshot.revision)
        if encoded is None:
            encoded = transaction_to_pb(snapshot.view_once(), snapshot.revision).SerializeToString()
            self._cache[snapshot.revision] = encoded
            self._bytes += len(encoded)
            while len(self._cache) > self._size or (
                self._bytes > self._max_bytes and len(self._cache) > 1
            ):
                _, dropped = self._cache.popitem(last=False)
                self._bytes -= len(dropped)
        else:
            self._cache.move_to_end(snapshot.revision)
        return encoded
