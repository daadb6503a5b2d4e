"""The store's interface: what the use cases need, and what a PostgreSQL store will implement.

Writes happen in units of work. `Store.run_batch` runs several work functions in one database
transaction (group commit): each gets a `UnitOfWork`, runs in its own savepoint so one failure
does not spoil the others, and nothing is acknowledged until the shared commit succeeds. Work
functions are synchronous and run where the store chooses (a dedicated writer thread for SQLite),
so a whole event costs one hop from the event loop instead of one per statement.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, TypeVar

from transaction_service.domain.state import (
    ChangeKind,
    Knowledge,
    TransactionStatus,
    TransactionView,
)

R = TypeVar("R")


@dataclass(frozen=True)
class StoredTransaction:
    knowledge: Knowledge
    view: TransactionView
    revision: int


@dataclass(frozen=True)
class TransactionSnapshot:
    """A transaction as reads see it: the view and the revision of its last change."""

    view: TransactionView
    revision: int


@dataclass(frozen=True)
class RecordedEvent:
    event_id: str
    digest: str
    transaction_id: str | None
    outcome: str


@dataclass(frozen=True)
class EventRecord:
    event_id: str
    event_type: str
    body_format: str  # "json" or "struct"
    body: bytes
    digest: str
    order_id: str | None
    transaction_id: str | None
    outcome: str
    revision: int | None
    received_at: datetime


@dataclass(frozen=True)
class ChangeRecord:
    """One entry of the change log."""

    revision: int
    transaction_id: str
    event_id: str
    order_id: str | None
    kinds: tuple[ChangeKind, ...]
    view: TransactionView
    recorded_at: datetime


@dataclass(frozen=True)
class ListFilter:
    status: TransactionStatus | None = None
    team_id: str = ""
    user_id: str = ""
    updated_since: datetime | None = None


class UnitOfWork(Protocol):
    """Statements inside one write transaction. Only valid during the work function's call."""

    def find_event(self, event_id: str) -> RecordedEvent | None: ...

    def transaction_id_for_order(self, order_id: str) -> str | None: ...

    def load(self, transaction_id: str) -> StoredTransaction | None: ...

    def save(self, transaction: StoredTransaction) -> None:
        """Insert or replace the transaction and point each of its orders at it."""

    def delete(self, transaction_id: str) -> None: ...

    def append_change(
        self,
        transaction_id: str,
        event_id: str,
        order_id: str | None,
        kinds: Sequence[ChangeKind],
        view: TransactionView,
        recorded_at: datetime,
    ) -> ChangeRecord:
        """Append to the change log; the record carries the new, strictly greater revision."""

    def record_event(self, event: EventRecord) -> None: ...


class Store(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def run_batch(self, work: Sequence[Callable[[UnitOfWork], R]]) -> list[R | Exception]:
        """Run each function in its own savepoint of one transaction, then commit once.

        A function that raises has its writes rolled back and its exception returned in its place.
        If the commit itself fails, the exception propagates and nothing was written.
        """

    # Reads return the store's head revision too, read in the same snapshot as the data, so it is
    # never older than what it is returned with.

    async def get(self, transaction_id: str) -> tuple[TransactionSnapshot | None, int]: ...

    async def get_by_order(self, order_id: str) -> tuple[TransactionSnapshot | None, int]: ...

    async def list(
        self, where: ListFilter, after_revision: int, limit: int
    ) -> tuple[list[TransactionSnapshot], int]:
        """Transactions matching `where` with revision > after_revision, by revision."""

    async def head_revision(self) -> int: ...

    async def changes_after(
        self, after_revision: int, limit: int, transaction_ids: Sequence[str] = ()
    ) -> ChangeLogPage:
        """Up to `limit` changes with revision > after_revision, oldest first; only those of
        `transaction_ids` if given. Read in one snapshot with the log's bounds."""

    async def trim_changes(self, recorded_before: datetime) -> int:
        """Delete changes recorded before the time; return the compacted revision after it."""


@dataclass(frozen=True)
class ChangeLogPage:
    changes: list[ChangeRecord]
    # Changes with revision <= compacted_revision have been trimmed away. The log keeps every
    # change after it: revisions are contiguous and trimming only removes the oldest.
    compacted_revision: int
    head_revision: int
