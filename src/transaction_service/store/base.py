"""The store's contract, implemented alike by SQLite, PostgreSQL and an in-memory double.

Writes are batch-shaped, so that a batch of deliveries costs a constant number of statements (and
network round trips), whatever its size:

1. the use case names the keys a batch touches (`BatchKeys`);
2. the store locks them (PostgreSQL: advisory locks in sorted order; SQLite: its single writer)
   and loads what the batch needs in three queries (`BatchState`: events by id, transactions by
   order id, transactions by id);
3. the use case plans the batch in pure Python (`BatchPlan`: dedupe, merge, legacy fold, change
   kinds, limits);
4. the store applies the plan with a few set statements and commits.

Revisions are a backend-neutral contract: one counter, bumped by the number of changes as the last
step before the commit, so revisions are contiguous and in commit order (a reader that has seen
revision N has seen every revision below it); the compacted revision (the newest trimmed from the
change log) is stored explicitly.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, TypeVar

import msgspec

from transaction_service.domain.diff import ViewDiff
from transaction_service.domain.state import (
    ChangeKind,
    Knowledge,
    TransactionStatus,
    TransactionView,
    view_from_json,
)
from transaction_service.errors import Reason, Unavailable
from transaction_service.store.health import WriteHealth


class StoreUnavailable(Unavailable):
    """The store cannot write (disk full, I/O error, database file gone, server unreachable).
    Nothing of the batch was stored; the caller may retry."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason=Reason.STORE_UNAVAILABLE)


class StoreDataRefused(Exception):
    """The store refused the data of a batch, not for a fault of its own (PostgreSQL: a data
    exception or a program limit; SQLite: a value it cannot bind). One delivery's data is to
    blame; nothing was written. `what` is a short cause for the log (an SQLSTATE, no data)."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class KeysBusy(Exception):
    """Rows of some of the batch's orders or transactions are locked by another database
    session (not by a writer of this service: those take the keys' advisory locks first).
    Nothing was written; the batch can commit without the deliveries that touch them."""

    def __init__(self, order_ids: frozenset[str], transaction_ids: frozenset[str]) -> None:
        super().__init__(f"{len(order_ids)} orders, {len(transaction_ids)} transactions locked")
        self.order_ids = order_ids
        self.transaction_ids = transaction_ids

    def touches(self, keys: BatchKeys) -> bool:
        return bool(keys.order_ids & self.order_ids or keys.transaction_ids & self.transaction_ids)


class StoreOpenError(Exception):
    """The store cannot be opened; the message is one line naming the database and the problem."""


class StoreInUse(StoreOpenError):
    """Another process owns the database (SQLite: one process writes a file)."""


# -- what is stored ---------------------------------------------------------------------------


class StoredTransaction(msgspec.Struct, frozen=True):
    knowledge: Knowledge
    view: TransactionView
    revision: int


class TransactionSnapshot:
    """A transaction as reads see it: the view and the revision of its last change.

    A snapshot read from a store may hold the view's JSON and decode it only when `view` is
    first used: a read answered from a cache of serialized responses (keyed by revision, which
    names one state of one transaction) never needs it.
    """

    __slots__ = ("_view", "_view_json", "revision")

    def __init__(
        self,
        view: TransactionView | None = None,
        revision: int = 0,
        *,
        view_json: str | bytes | None = None,
    ) -> None:
        if (view is None) == (view_json is None):
            raise ValueError("give either the view or its JSON")
        self._view = view
        self._view_json = view_json
        self.revision = revision

    @property
    def view(self) -> TransactionView:
        if self._view is None:
            assert self._view_json is not None
            self._view = view_from_json(self._view_json)
        return self._view

    def view_once(self) -> TransactionView:
        """The view, without keeping it decoded: for a reader that only serializes it once
        (a decoded view takes several times the memory of its JSON)."""
        if self._view is not None:
            return self._view
        assert self._view_json is not None
        return view_from_json(self._view_json)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TransactionSnapshot):
            return NotImplemented
        return (self.revision, self.view) == (other.revision, other.view)

    def __hash__(self) -> int:
        return hash(self.revision)

    def __repr__(self) -> str:
        return f"TransactionSnapshot(revision={self.revision}, view={self.view!r})"


class StoredEvent(msgspec.Struct, frozen=True):
    """What dedupe needs of an event recorded before, and the current state of the transaction
    its order belongs to now (None for events of other types, or an order not indexed)."""

    event_id: str
    digest: str
    order_id: str | None
    current: TransactionSnapshot | None


class ChangeRecord(msgspec.Struct, frozen=True):
    """One entry of the change log."""

    revision: int
    transaction_id: str
    event_id: str
    order_id: str | None
    kinds: tuple[ChangeKind, ...]
    view: TransactionView
    recorded_at: datetime
    # Legacy stand-in transactions folded into this one by this change, each with the
    # "reported once" kinds it had already reported (so a watcher of the stand-in's order is not
    # told them twice).
    merged: tuple[tuple[str, frozenset[ChangeKind]], ...] = ()
    # The trace and span (W3C ids in hex) of the delivery that caused the change, when it was
    # traced (see tracing.py); empty otherwise.
    trace_id: str = ""
    span_id: str = ""
    # What changed, field by field; None for changes recorded before diffs were kept.
    diff: ViewDiff | None = None


@dataclass(frozen=True)
class HistoryEvent:
    """One row of a transaction's delivery history: a delivery as recorded in the commit that
    took it in (or a results fetch or rebuild, which the service records likewise)."""

    # Arrival order (the events table's sequence), also the paging key.
    seq: int
    event_id: str
    event_type: str
    # "webhook", "grpc", "api" (reconcile), "results" (a results fetch), "rebuild".
    source: str
    order_id: str | None
    received_at: datetime
    # What the delivery itself says: the order's newest status ("HIGH.METHOD.LOW") and the time
    # of the update, and the status of its transaction block; empty for rows recorded before
    # they were kept, and for other event types.
    provider_time: datetime | None
    claimed_status: str
    claimed_transaction_status: str
    outcome: str
    # Why, in words; empty for rows recorded before reasons were kept.
    reason: str
    revision: int | None
    # Retries of the same event id since (DUPLICATE), and when the last came.
    duplicates: int
    last_duplicate_at: datetime | None
    digest: str
    # The body was erased by the body retention (deliveries only; the service's own rows never
    # had one).
    body_erased: bool
    # Only when asked for (and still kept).
    body: bytes | None
    # The change it made, while the change log keeps it: its kinds and diff.
    kinds: tuple[ChangeKind, ...] | None
    diff: ViewDiff | None


@dataclass(frozen=True)
class StoredEventBody:
    """An event as stored, for replaying it (`transaction-service rebuild`). `body` is None once
    the body retention erased it: such an event can no longer be replayed."""

    event_id: str
    event_type: str
    source: str
    body_format: str  # "json": raw bytes as sent; "struct": canonical JSON
    body: bytes | None
    digest: str
    order_id: str | None


@dataclass(frozen=True)
class PendingResults:
    """A transaction whose combined results are still to be fetched from Junction. Written in the
    commit of the change that asked for them, so a restart picks the fetch up again."""

    transaction_id: str
    # The revision of the change that asked (completed, results corrected). A newer request
    # replaces the marker, so a fetch that began before it cannot clear it.
    requested_revision: int
    requested_at: datetime
    # Failed (or partial) fetches so far, and when to try next.
    attempts: int
    due_at: datetime
    # Why the last attempt failed: a status line, never a body.
    last_failure: str = ""


@dataclass(frozen=True)
class StoredResults:
    """A transaction's combined results, as Junction answered them. Health data."""

    transaction_id: str
    # `metadata.status`: "partial" or "final".
    status: str
    # sha256 of the body, kept after the body is erased.
    digest: str
    # The provider's JSON byte for byte; None once erased by the body retention.
    body: bytes | None
    fetched_at: datetime
    # The revision of the RESULTS_READY change that reported them.
    revision: int


@dataclass(frozen=True)
class ListFilter:
    """Which transactions `list_transactions` returns: those matching every field given."""

    status: TransactionStatus | None = None
    team_id: str = ""
    user_id: str = ""
    updated_since: datetime | None = None

    def matches(self, view: TransactionView) -> bool:
        """The filter in Python (the in-memory store); the SQL stores share `rows.list_condition`,
        and the store contract tests hold the two equal."""
        return (
            (self.status is None or view.status == self.status)
            and (not self.team_id or view.team_id == self.team_id)
            and (not self.user_id or view.user_id == self.user_id)
            and (
                self.updated_since is None
                or (view.updated_at is not None and view.updated_at >= self.updated_since)
            )
        )


@dataclass(frozen=True)
class ChangeLogPage:
    changes: list[ChangeRecord]
    # Changes with revision <= compacted_revision have been trimmed away. The log keeps every
    # change after it: revisions are contiguous and trimming only removes the oldest.
    compacted_revision: int
    head_revision: int


# -- batch writes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchKeys:
    """Everything a batch reads and may write, known before anything is loaded."""

    event_ids: frozenset[str]
    # Orders whose transaction must be known (each order named by a delivery).
    order_ids: frozenset[str]
    # Transactions loaded by id: those named by transaction blocks, and legacy stand-ins (whose
    # id is their order's id).
    transaction_ids: frozenset[str]
    # Transactions whose stored events the batch replays (a rebuild): their events are loaded
    # under the batch's locks into `BatchState.replay_events`. Each is in transaction_ids too.
    replay: frozenset[str] = frozenset()
    # Transactions whose combined results and results marker the plan reads (they must be among
    # `transaction_ids`, whose locks cover them). Ingest reads none.
    results_of: frozenset[str] = frozenset()


@dataclass
class BatchState:
    """What the store loaded for a batch, read under the batch's locks."""

    events: dict[str, StoredEvent] = field(default_factory=dict)
    # Order id -> the transaction it belongs to now.
    order_index: dict[str, str] = field(default_factory=dict)
    transactions: dict[str, StoredTransaction] = field(default_factory=dict)
    # For each transaction of `BatchKeys.replay`: the events of its orders, oldest first.
    replay_events: dict[str, list[StoredEventBody]] = field(default_factory=dict)
    # For `BatchKeys.results_of`: the digest of stored results whose body is still kept, and the
    # results markers.
    results_kept: dict[str, str] = field(default_factory=dict)
    results_pending: dict[str, PendingResults] = field(default_factory=dict)

    def transaction_ids_needed(self) -> set[str]:
        """Transactions the plan will read that the keys did not name: those the order index
        points to. A store that locks by key must lock these too (and reload them) first."""
        return set(self.order_index.values())


class EventWrite(msgspec.Struct, frozen=True):
    event_id: str
    event_type: str
    source: str
    body_format: str  # "json": raw bytes as sent; "struct": canonical JSON
    # None for the rows the service records itself (results fetches, rebuilds).
    body: bytes | None
    digest: str
    order_id: str | None
    transaction_id: str | None
    outcome: str
    # Index into BatchPlan.changes of the change this event made, if any.
    change: int | None
    received_at: datetime
    # Why, in words (see domain/explain.py), and what the delivery claimed (see HistoryEvent).
    reason: str = ""
    provider_time: datetime | None = None
    claimed_status: str = ""
    claimed_transaction_status: str = ""


class DuplicateWrite(msgspec.Struct, frozen=True):
    """Retries of an event id recorded before (or earlier in the batch): counted on its row."""

    event_id: str
    count: int
    seen_at: datetime


class ChangeWrite(msgspec.Struct, frozen=True):
    transaction_id: str
    event_id: str
    order_id: str | None
    kinds: tuple[ChangeKind, ...]
    view: TransactionView
    recorded_at: datetime
    merged: tuple[tuple[str, frozenset[ChangeKind]], ...] = ()
    # The view serialised once by the planner, for the change log and the current state alike.
    view_json: str = ""
    # The trace of the delivery that caused the change (see ChangeRecord).
    trace_id: str = ""
    span_id: str = ""
    # What changed, and its JSON for the change log (see domain/diff.py).
    diff: ViewDiff | None = None
    diff_json: str | None = None

    def record(self, revision: int) -> ChangeRecord:
        return ChangeRecord(
            revision=revision,
            transaction_id=self.transaction_id,
            event_id=self.event_id,
            order_id=self.order_id,
            kinds=self.kinds,
            view=self.view,
            recorded_at=self.recorded_at,
            merged=self.merged,
            trace_id=self.trace_id,
            span_id=self.span_id,
            diff=self.diff,
        )


class TransactionWrite(msgspec.Struct, frozen=True):
    knowledge: Knowledge
    view: TransactionView
    # Index into BatchPlan.changes of its last change in this batch; None when only the knowledge
    # grew (nothing visible changed), in which case `revision` is kept as it was.
    change: int | None
    revision: int
    knowledge_json: str
    view_json: str


@dataclass(frozen=True)
class ResultsWrite:
    """Combined results to store (replacing earlier ones), with the change reporting them."""

    transaction_id: str
    status: str
    digest: str
    body: bytes
    fetched_at: datetime
    # Index into BatchPlan.changes of its RESULTS_READY change.
    change: int


@dataclass(frozen=True)
class PendingResultsWrite:
    """A results marker to write (or overwrite)."""

    transaction_id: str
    # Index into BatchPlan.changes of the change asking for results; None: `requested_revision`.
    change: int | None
    requested_revision: int
    requested_at: datetime
    attempts: int
    due_at: datetime
    last_failure: str = ""


@dataclass
class BatchPlan:
    """The writes of one batch. Revisions are not known until the store applies it: a change's
    revision is `base + index + 1`, where `base` is the head revision just before the commit."""

    events: list[EventWrite] = field(default_factory=list)
    # Retries of known event ids, by event id: counted on the original's row.
    duplicates: dict[str, DuplicateWrite] = field(default_factory=dict)
    # Rows of the delivery history the service writes itself (a results fetch, a rebuild): like
    # `events`, but one whose event id is recorded already is counted again instead.
    history: list[EventWrite] = field(default_factory=list)
    changes: list[ChangeWrite] = field(default_factory=list)
    # Final state of each transaction the batch changed, by id.
    transactions: dict[str, TransactionWrite] = field(default_factory=dict)
    # Legacy stand-ins folded into real transactions.
    deleted: set[str] = field(default_factory=set)
    # Orders whose transaction is new or changed.
    order_index: dict[str, str] = field(default_factory=dict)
    # Combined results fetched, results markers written, and markers cleared (fetch done).
    results: list[ResultsWrite] = field(default_factory=list)
    results_pending: dict[str, PendingResultsWrite] = field(default_factory=dict)
    results_done: set[str] = field(default_factory=set)

    @property
    def empty(self) -> bool:
        return not (
            self.events
            or self.duplicates
            or self.history
            or self.transactions
            or self.deleted
            or self.order_index
            or self.results
            or self.results_pending
            or self.results_done
        )


# What a planner decides besides the writes (each delivery's answer, say), handed back by `write`.
Answer = TypeVar("Answer")
# A pure function of the loaded state: the writes, and its answer. The store may call it more than
# once (a retry); the last call's plan is applied and its answer returned.
Planner = Callable[[BatchState], tuple[BatchPlan, Answer]]


@dataclass(frozen=True)
class AppliedBatch:
    """A committed plan: its changes with their revisions."""

    plan: BatchPlan
    # The head revision just before the batch's changes; 0 if it made none (then the store read
    # no revision).
    base_revision: int
    changes: list[ChangeRecord]

    def revision_of(self, change: int | None, otherwise: int = 0) -> int:
        return self.base_revision + change + 1 if change is not None else otherwise


# -- the store, role by role ---------------------------------------------------------------------
#
# Each consumer asks for the roles it uses (the commit path a BatchWriter, the watch hub the
# change log and reads, the results fetcher Results and Jobs, ...); one store class implements
# them all (`Store`), and tests/test_store_contract.py runs every method of every role against the
# in-memory, SQLite and PostgreSQL stores alike. Every method of a closed store raises
# StoreUnavailable, as does a batch the database cannot commit.


class StoreLifecycle(Protocol):
    """Opening and closing. Open before use; always close."""

    # A short description for logs: the path or the URL without a password.
    description: str

    async def open(self) -> None:
        """Raises StoreOpenError, with one line naming the database and the problem."""

    async def close(self) -> None: ...


class BatchWriter(Protocol):
    """The one way to write what callers see, and whether writes succeed. Only the commit path
    (`usecases/commit.py`) calls `write`: it publishes what was committed."""

    # Whether writes succeed; listeners hear of every flip (health checks, readiness).
    health: WriteHealth

    async def probe(self) -> None:
        """Try a tiny write; updates `health`. Used to notice recovery when no traffic comes."""

    async def write(self, keys: BatchKeys, plan: Planner[Answer]) -> tuple[AppliedBatch, Answer]:
        """Lock `keys`, load their state, call `plan` on it (pure, maybe more than once: it is
        repeated if the store had to retry), apply the plan and commit; the committed batch and
        the answer of the plan applied.

        Raises StoreUnavailable if the batch could not be committed, StoreDataRefused if the
        store refused its data, KeysBusy if rows it must write are locked by another session;
        in each case nothing was written. An exception the planner raises passes through; then
        nothing was written either.
        """


class TransactionReads(Protocol):
    """The current state of transactions.

    Reads return the store's head revision too, read in the same snapshot as the data, so it is
    never older than what it is returned with."""

    async def get(self, transaction_id: str) -> tuple[TransactionSnapshot | None, int]: ...

    async def get_by_order(self, order_id: str) -> tuple[TransactionSnapshot | None, int]: ...

    async def list_transactions(
        self, where: ListFilter, after_revision: int, limit: int
    ) -> tuple[list[TransactionSnapshot], int]:
        """Transactions matching `where` with revision > after_revision, by revision."""

    async def get_many(
        self,
        transaction_ids: Sequence[str],
        order_ids: Sequence[str],
        *,
        chunk_bytes: int | None = None,
        on_chunk: Callable[[Sequence[TransactionSnapshot]], None] | None = None,
    ) -> tuple[dict[str, TransactionSnapshot], dict[str, TransactionSnapshot], int]:
        """Transactions by id and by order id, all read in one snapshot: (found by transaction
        id, found by order id, head revision). Ids not known are absent from the dicts. Each
        transaction is read once, however many of the ids find it (the same snapshot object
        answers them all). The stored states are read in chunks of about `chunk_bytes` (their
        JSON; all at once without it), each handed to `on_chunk` as it is read: an exception it
        raises ends the read, so what a caller cannot use is never loaded."""

    async def transaction_ids(self, after_id: str, limit: int) -> list[str]:
        """Up to `limit` transaction ids greater than `after_id`, in id order: a stable walk over
        every transaction, however their revisions change meanwhile."""

    async def count_transactions(self) -> int: ...

    async def replay_events(
        self, transaction_ids: Sequence[str]
    ) -> dict[str, list[StoredEventBody]]:
        """The stored events of each transaction's orders, oldest first. `write` loads the same
        under its locks for the transactions of `BatchKeys.replay`."""


class ChangeLog(Protocol):
    """The numbered changes, for watchers: contiguous revisions, the oldest trimmed away."""

    # Whether other processes may write to it too (replicas): then watchers must tail the shared
    # change log instead of relying on this process's commits alone.
    shared: bool

    async def head_revision(self) -> int: ...

    async def changes_after(
        self, after_revision: int, limit: int, transaction_ids: Sequence[str] = ()
    ) -> ChangeLogPage:
        """Up to `limit` changes with revision > after_revision, oldest first; only those of
        `transaction_ids` if given. Read in one snapshot with the log's bounds."""

    async def changes_through(
        self, revision: int, limit: int, transaction_ids: Sequence[str]
    ) -> ChangeLogPage:
        """Up to `limit` changes of `transaction_ids` with revision <= `revision`, newest
        first (as-of reads). Read in one snapshot with the log's bounds."""

    def change_notifications(self) -> AsyncGenerator[None]:
        """Yields whenever changes may have been committed by another process (and after every
        reconnect, when notifications may have been lost). A store that is not `shared` never
        yields."""
        ...


class DeliveryHistory(Protocol):
    """Each transaction's deliveries as committed, for ListTransactionEvents."""

    async def transaction_events(
        self, transaction_id: str, after_seq: int, limit: int, *, bodies: bool
    ) -> Sequence[HistoryEvent]:
        """Up to `limit` rows of a transaction's delivery history after `after_seq`, in arrival
        order: the events of its orders (whichever transaction they were merged into then), and
        the rows the service recorded for it (results fetches, rebuilds). Each with the kinds and
        diff of its change while the change log keeps it; with its body if `bodies`."""


class Results(Protocol):
    """Combined results and their fetch markers (written by `write`, read here)."""

    async def get_results(
        self, transaction_id: str
    ) -> tuple[StoredResults | None, PendingResults | None]:
        """A transaction's stored combined results, and its results marker, if any."""

    async def results_due(self, now: datetime, limit: int) -> list[PendingResults]:
        """Up to `limit` results markers due at `now`, the longest due first."""


class ReconcileChecks(Protocol):
    """Which transactions reconciliation should ask Junction about."""

    async def reconcile_candidates(self, silent_before: datetime, limit: int) -> list[str]:
        """Up to `limit` ids of ACTIVE transactions with no provider time and no reconcile check
        after `silent_before`, the longest silent first."""

    async def record_reconcile_checks(
        self, transaction_ids: Sequence[str], checked_at: datetime
    ) -> None:
        """Remember that these transactions were reconciled at `checked_at`."""


class Housekeeping(Protocol):
    """Compaction and erasure, run by the housekeeping loop."""

    async def trim_changes(self, recorded_before: datetime) -> int:
        """Delete changes recorded before the time (and any older revision, so the log stays
        contiguous); return the compacted revision after it. With several replicas, one trims
        at a time; the others return at once."""

    async def erase_bodies(self, received_before: datetime) -> int:
        """Erase the bodies of events received before the time (privacy); their id, digest,
        outcome and revision stay, for dedupe and audit. Returns how many were erased."""

    async def erase_results(self, fetched_before: datetime) -> int:
        """Erase the bodies of combined results fetched before the time (privacy); status,
        digest, time and revision stay. Returns how many were erased."""


class Jobs(Protocol):
    """Background jobs that one replica runs at a time."""

    def exclusive(self, name: str) -> AbstractAsyncContextManager[bool]:
        """Enter to take the job lock `name` if no other process holds it: yields whether this
        process got it (then it holds it until exit). A store that is not `shared` always gets
        it."""
        ...


class Store(
    StoreLifecycle,
    BatchWriter,
    TransactionReads,
    ChangeLog,
    DeliveryHistory,
    Results,
    ReconcileChecks,
    Housekeeping,
    Jobs,
    Protocol,
):
    """Every role: what a store class implements, and what the composition root (`App`) and the
    commands that open a store hold."""
