"""The latest state of recently read transactions, kept in memory by the SQLite store, so that
`GetTransaction` does not ask SQLite again for a state it read before and nothing has changed
since.

It is right because one process owns a SQLite file (`SqliteStore._take_lock`) and every write
to transactions and orders goes through `SqliteStore.write`, which tells this cache the outcome
before it returns, on the event loop's thread:

- a committed write drops what it wrote (its transactions, folded stand-ins and orders) and
  sets the head revision the commit reached (`committed`); the next read of those asks SQLite;
- a write that failed, or whose outcome is not known (cancelled while SQLite committed), drops
  everything and forgets the head (`unsure`): reads go to SQLite until a write commits again.
  Until then a read cannot tell the head: a cancelled write leaves the write lock while its
  COMMIT may still wait for, or run on, aiosqlite's thread (SQLite reports no transaction as soon
  as its COMMIT begins), so a read then may see the head from before a commit that lands after
  it. The next write's statements run on that thread after that COMMIT: once it has committed,
  the head is the one it reached, or (if it made no changes) the one a read sees.

While a write's COMMIT runs (from just before it is sent to aiosqlite's thread until the event
loop learns its outcome: `committing`), SQLite may show the new rows already, and this cache
answers nothing: every read goes to SQLite, as without a cache, so no reader sees a commit and
then, from here, what was before it (reads stay monotonic, across transactions too). A miss
keeps what it read only if the head it read with it is the head this cache knows and no write
ended while it read (`learn`): a state from a commit not yet told is never kept, so a hit never
pairs it with an older head. Every answer is a state and the head of one moment: its revision is
at most that head.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from transaction_service.store.base import TransactionSnapshot

# What the kept states may hold: their view JSON and their ids, as Python holds them (a
# character of some text takes 4 bytes, an id up to `max_string_length` characters), and about
# this much more each.
MAX_BYTES = 16 * 1024 * 1024
_PER_ENTRY = 100
# The orders kept by id (their ids, and about `_PER_ENTRY` more each) hold at most
# MAX_BYTES / _ORDERS_SHARE more; past it, all are forgotten.
_ORDERS_SHARE = 4


def _cost(*held: str | bytes) -> int:
    """Kept with its entry: a string's size grows once its UTF-8 form is asked for."""
    return sum(map(sys.getsizeof, held)) + _PER_ENTRY


class LatestStates:
    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self._max_bytes = max_bytes
        # (view JSON, revision, cost) by transaction id, oldest kept first. A hit answers a
        # snapshot of its own: one that a caller decodes (`view`) must not grow what is kept here.
        self._by_id: dict[str, tuple[str | bytes, int, int]] = {}
        self._bytes = 0
        # (transaction id, cost) by order id.
        self._order_ids: dict[str, tuple[str, int]] = {}
        self._order_bytes = 0
        # The head revision as of the last commit told; None: not known (reads go to SQLite).
        self.head: int | None = None
        # Counts the writes that ended (committed or not): a read that spans one keeps nothing.
        self.writes_ended = 0
        # Whether a read may tell the head (while none is known): not after `unsure`, until a
        # write commits.
        self._reads_tell_head = True
        # A COMMIT is under way: answer nothing until its outcome is told.
        self._committing = False

    def get(self, transaction_id: str) -> tuple[TransactionSnapshot, int] | None:
        head = self.head
        if head is None or self._committing:
            return None
        found = self._by_id.get(transaction_id)
        if found is None:
            return None
        return TransactionSnapshot(revision=found[1], view_json=found[0]), head

    def get_by_order(self, order_id: str) -> tuple[TransactionSnapshot, int] | None:
        found = self._order_ids.get(order_id)
        return None if found is None else self.get(found[0])

    def learn(
        self,
        writes_ended: int,
        head: int,
        transaction_id: str | None,
        view_json: str | bytes | None,
        revision: int,
        *,
        order_id: str | None = None,
        writing: bool,
    ) -> None:
        """Keep what a read from SQLite found, if it is the state of the moment this cache
        stands for. `writes_ended` is `self.writes_ended` as it was before the read; `writing`
        says whether a write is under way now (its commit may have ended in SQLite already)."""
        if writes_ended != self.writes_ended:
            return
        if self.head is None:
            if writing or not self._reads_tell_head:
                return
            # No write under way, none ended since the read, none whose COMMIT may land later:
            # SQLite's head.
            self.head = head
        if head != self.head or view_json is None or transaction_id is None:
            return
        if order_id is not None and order_id not in self._order_ids:
            cost = _cost(order_id, transaction_id)
            if self._order_bytes + cost > self._max_bytes // _ORDERS_SHARE:
                self._order_ids.clear()
                self._order_bytes = 0
            self._order_ids[order_id] = (transaction_id, cost)
            self._order_bytes += cost
        if transaction_id not in self._by_id:
            cost = _cost(transaction_id, view_json)
            self._by_id[transaction_id] = (view_json, revision, cost)
            self._bytes += cost
            while self._bytes > self._max_bytes and self._by_id:
                self._bytes -= self._by_id.pop(next(iter(self._by_id)))[2]

    def committing(self) -> None:
        """A write's COMMIT is about to run: until `committed` or `unsure`, SQLite may show
        what it wrote, so nothing is answered from here."""
        self._committing = True

    def committed(
        self, head: int | None, transaction_ids: Iterable[str], order_ids: Iterable[str]
    ) -> None:
        """A write committed: what it wrote is dropped, and `head` (if it made changes) is the
        head revision now."""
        self._committing = False
        self.writes_ended += 1
        for transaction_id in transaction_ids:
            dropped = self._by_id.pop(transaction_id, None)
            if dropped is not None:
                self._bytes -= dropped[2]
        for order_id in order_ids:
            forgotten = self._order_ids.pop(order_id, None)
            if forgotten is not None:
                self._order_bytes -= forgotten[1]
        self._reads_tell_head = True
        if head is not None:
            self.head = head

    def unsure(self) -> None:
        """A write failed or its outcome is unknown: keep nothing, know no head until a write
        commits (its COMMIT may land after a read)."""
        self._committing = False
        self.writes_ended += 1
        self._reads_tell_head = False
        self._by_id.clear()
        self._order_ids.clear()
        self._bytes = self._order_bytes = 0
        self.head = None
