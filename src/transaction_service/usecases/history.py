"""Why is this transaction in this state? Its delivery history, and its state at a revision.

The history is what the commit path recorded, each row in the commit that decided it: every
delivery of the transaction's orders with its outcome and the reason in words (`plan.py`,
`domain/explain.py`), retries counted on the delivery they repeat, and the rows the service
writes itself for results fetches and rebuilds. Nothing is reconstructed here; this module only
finds the transaction and pages.

As-of reads come from the change log, in which every change holds the full state after it: the
state at revision R is the one of the transaction's last change at or below R. The log keeps
the changes of the change retention; an older state is OUT_OF_RANGE (REVISION_COMPACTED, as for
watches), unless the transaction has not changed since (then it is the current state).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from transaction_service.domain.state import ChangeKind
from transaction_service.errors import NotFound, echo
from transaction_service.store.base import (
    ChangeLog,
    ChangeRecord,
    DeliveryHistory,
    HistoryEvent,
    TransactionReads,
    TransactionSnapshot,
)
from transaction_service.usecases.watch import Compacted, RevisionInFuture, WatchFilter

# Changes read per query while looking for the one at or below a revision.
_PAGE = 100


class HistoryStore(TransactionReads, ChangeLog, DeliveryHistory, Protocol):
    """The roles of the store these reads take: the transactions (to find one by an id), the
    change log (as-of reads) and the delivery history."""


@dataclass(frozen=True)
class Lookup:
    """A transaction named by its own id, or by the id of one of its orders."""

    key: str
    by_order: bool

    @property
    def field(self) -> str:
        return "order_id" if self.by_order else "transaction_id"

    async def current(self, store: HistoryStore) -> tuple[TransactionSnapshot | None, int]:
        """The transaction's current state (None if not known) and the head revision."""
        if self.by_order:
            return await store.get_by_order(self.key)
        return await store.get(self.key)

    def not_found(self, revision: int | None = None) -> NotFound:
        at = f" at revision {revision}" if revision is not None else ""
        return NotFound(f"no transaction known for {self.field} {echo(self.key)}{at}")


@dataclass(frozen=True)
class HistoryPage:
    transaction_id: str
    events: Sequence[HistoryEvent]
    # More entries follow the last of `events`.
    more: bool
    head_revision: int


async def transaction_history(
    store: HistoryStore, lookup: Lookup, *, after_seq: int, limit: int, bodies: bool
) -> HistoryPage:
    """Up to `limit` entries of the transaction's history after `after_seq`, in arrival order."""
    snapshot, head = await lookup.current(store)
    if snapshot is None:
        raise lookup.not_found()
    transaction_id = snapshot.view.id
    # One more tells whether another page follows.
    found = await store.transaction_events(transaction_id, after_seq, limit + 1, bodies=bodies)
    return HistoryPage(transaction_id, found[:limit], len(found) > limit, head)


async def state_at(store: HistoryStore, lookup: Lookup, revision: int) -> TransactionSnapshot:
    """The transaction's state at `revision`: after every change up to it, none after it."""
    current, head = await lookup.current(store)
    if revision > head:
        raise RevisionInFuture(revision, head, field="revision")
    if current is not None and current.revision <= revision:
        return current  # unchanged since
    key = lookup.key
    # Whose changes may hold it, as a watch of the key replays them: the key's own (a
    # transaction's, or an order's legacy stand-in's) and those of the transaction the key's
    # order belongs to now.
    holder = current if lookup.by_order else (await store.get_by_order(key))[0]
    ids = sorted({key} | ({holder.view.id} if holder is not None else set()))
    where = WatchFilter(order_id=key) if lookup.by_order else WatchFilter(transaction_id=key)

    def holds(change: ChangeRecord) -> bool:
        if lookup.by_order:
            return where.matches(change)
        if key in dict(change.merged) and change.transaction_id != key:
            # A legacy stand-in, looked up by its id, ended when it was folded in.
            raise NotFound(
                f"transaction {echo(key)} (a legacy stand-in) was folded into transaction "
                f"{echo(change.transaction_id)} at revision {change.revision}, before revision "
                f"{revision}; read that transaction"
            )
        return change.transaction_id == key

    through = revision
    while True:
        page = await store.changes_through(through, _PAGE, ids)
        for change in page.changes:
            if holds(change):
                return TransactionSnapshot(change.view, change.revision)
        if len(page.changes) < _PAGE:
            break
        through = page.changes[-1].revision - 1
    if page.compacted_revision:
        # Its changes up to the revision may have been trimmed, unless it was created after it.
        later = await store.changes_after(revision, _PAGE, ids)
        first = next((c for c in later.changes if _matches(c, lookup, where)), None)
        created = (
            first is not None and ChangeKind.TRANSACTION_CREATED in first.kinds and not first.merged
        )
        if not created:
            raise Compacted(page.compacted_revision, None, revision=revision)
    raise lookup.not_found(revision)


def _matches(change: ChangeRecord, lookup: Lookup, where: WatchFilter) -> bool:
    return where.matches(change) if lookup.by_order else change.transaction_id == lookup.key
