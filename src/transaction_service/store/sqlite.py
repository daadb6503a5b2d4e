"""The embedded SQLite store.

Threads, not aiosqlite: aiosqlite hops to its thread once per statement (about 100 us each here),
and ingesting one event takes half a dozen statements. Here every write batch runs whole on one
dedicated writer thread (one hop per batch, one commit per batch), and reads run on a small pool of
read-only connections, which WAL lets proceed while the writer writes.

Durability: WAL with `synchronous=FULL` by default, so an acknowledged event survives power loss,
not only a process crash. `NORMAL` is faster and still crash-safe, and can be chosen in settings.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from transaction_service.domain.state import (
    ChangeKind,
    TransactionView,
    knowledge_from_json,
    knowledge_to_json,
    view_from_json,
    view_to_json,
)
from transaction_service.store.base import (
    ChangeLogPage,
    ChangeRecord,
    EventRecord,
    ListFilter,
    RecordedEvent,
    StoredTransaction,
    TransactionSnapshot,
)

log = logging.getLogger(__name__)
R = TypeVar("R")

_READERS = 2
_TRIM_CHUNK = 5000


def iso(value: datetime | None) -> str | None:
    """UTC ISO 8601 with fixed width, so text order is time order."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def _migrations() -> list[tuple[int, str]]:
    folder = resources.files("transaction_service.store") / "migrations"
    found = []
    for item in folder.iterdir():
        if item.name.endswith(".sql"):
            found.append((int(item.name.split("_", 1)[0]), item.read_text()))
    return sorted(found)


class SqliteUnitOfWork:
    """The statements of one write transaction, on the writer thread's connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        # A change's view is written twice (change log and current state); serialise it once.
        self._last_view: tuple[TransactionView, str] | None = None

    def _view_json(self, view: TransactionView) -> str:
        if self._last_view is None or self._last_view[0] is not view:
            self._last_view = (view, view_to_json(view))
        return self._last_view[1]

    def find_event(self, event_id: str) -> RecordedEvent | None:
        row = self._conn.execute(
            "SELECT event_id, digest, transaction_id, outcome FROM events WHERE event_id = ?",
            (event_id,),
        ).fetchone()
        return RecordedEvent(*row) if row else None

    def transaction_id_for_order(self, order_id: str) -> str | None:
        row = self._conn.execute(
            "SELECT transaction_id FROM order_transactions WHERE order_id = ?", (order_id,)
        ).fetchone()
        return row[0] if row else None

    def load(self, transaction_id: str) -> StoredTransaction | None:
        row = self._conn.execute(
            "SELECT knowledge, view, revision FROM transactions WHERE id = ?", (transaction_id,)
        ).fetchone()
        if row is None:
            return None
        return StoredTransaction(
            knowledge=knowledge_from_json(row[0]),
            view=view_from_json(row[1]),
            revision=row[2],
        )

    def save(self, transaction: StoredTransaction) -> None:
        view = transaction.view
        self._conn.execute(
            "INSERT INTO transactions (id, revision, status, team_id, user_id, updated_at,"
            " knowledge, view) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET revision = excluded.revision,"
            " status = excluded.status, team_id = excluded.team_id, user_id = excluded.user_id,"
            " updated_at = excluded.updated_at, knowledge = excluded.knowledge,"
            " view = excluded.view",
            (
                view.id,
                transaction.revision,
                view.status.value,
                view.team_id,
                view.user_id,
                iso(view.updated_at),
                knowledge_to_json(transaction.knowledge),
                self._view_json(view),
            ),
        )
        self._conn.executemany(
            "INSERT INTO order_transactions (order_id, transaction_id) VALUES (?, ?)"
            " ON CONFLICT (order_id) DO UPDATE SET transaction_id = excluded.transaction_id"
            " WHERE transaction_id != excluded.transaction_id",
            [(order_id, view.id) for order_id in transaction.knowledge.orders],
        )

    def delete(self, transaction_id: str) -> None:
        self._conn.execute("DELETE FROM transactions WHERE id = ?", (transaction_id,))

    def append_change(
        self,
        transaction_id: str,
        event_id: str,
        order_id: str | None,
        kinds: Sequence[ChangeKind],
        view: TransactionView,
        recorded_at: datetime,
    ) -> ChangeRecord:
        cursor = self._conn.execute(
            "INSERT INTO changes (transaction_id, event_id, order_id, kinds, view, recorded_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                transaction_id,
                event_id,
                order_id,
                ",".join(kinds),
                self._view_json(view),
                iso(recorded_at),
            ),
        )
        assert cursor.lastrowid is not None
        return ChangeRecord(
            revision=cursor.lastrowid,
            transaction_id=transaction_id,
            event_id=event_id,
            order_id=order_id,
            kinds=tuple(kinds),
            view=view,
            recorded_at=recorded_at,
        )

    def record_event(self, event: EventRecord) -> None:
        self._conn.execute(
            "INSERT INTO events (event_id, event_type, body_format, body, digest, order_id,"
            " transaction_id, outcome, revision, received_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                event.event_id,
                event.event_type,
                event.body_format,
                event.body,
                event.digest,
                event.order_id,
                event.transaction_id,
                event.outcome,
                event.revision,
                iso(event.received_at),
            ),
        )


class SqliteStore:
    """SQLite behind the `Store` interface. Open before use; always close (an open connection
    keeps the process from exiting)."""

    def __init__(self, path: Path | str, *, synchronous: str = "FULL") -> None:
        self.path = Path(path)
        self._synchronous = synchronous
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer")
        self._readers = ThreadPoolExecutor(max_workers=_READERS, thread_name_prefix="sqlite-read")
        self._write_conn: sqlite3.Connection | None = None
        self._read_conns: list[sqlite3.Connection] = []
        self._local = threading.local()
        self._lock = threading.Lock()

    # -- lifecycle --------------------------------------------------------------------------------

    async def open(self) -> None:
        await self._on_writer(self._open_writer)

    def _open_writer(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves.
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        conn.execute("PRAGMA busy_timeout = 5000")
        self._write_conn = conn
        self._migrate(conn)

    def _migrate(self, conn: sqlite3.Connection) -> None:
        current = conn.execute("PRAGMA user_version").fetchone()[0]
        for version, script in _migrations():
            if version <= current:
                continue
            log.info("applying migration %04d to %s", version, self.path)
            # executescript commits first; the script and the version bump then commit together.
            conn.executescript(
                f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {version};\nCOMMIT;"
            )

    async def close(self) -> None:
        if self._write_conn is not None:
            await self._on_writer(self._write_conn.close)
            self._write_conn = None
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        with self._lock:
            for conn in self._read_conns:
                conn.close()
            self._read_conns.clear()

    # -- writes -----------------------------------------------------------------------------------

    async def run_batch(
        self, work: Sequence[Callable[[SqliteUnitOfWork], R]]
    ) -> list[R | Exception]:
        return await self._on_writer(self._run_batch, work)

    def _run_batch(self, work: Sequence[Callable[[SqliteUnitOfWork], R]]) -> list[R | Exception]:
        conn = self._write_conn
        if conn is None:
            raise RuntimeError("store is not open")
        uow = SqliteUnitOfWork(conn)
        results: list[R | Exception] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for fn in work:
                conn.execute("SAVEPOINT unit")
                try:
                    results.append(fn(uow))
                except Exception as exc:
                    conn.execute("ROLLBACK TO unit")
                    results.append(exc)
                conn.execute("RELEASE unit")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return results

    async def _on_writer(self, fn: Callable[..., R], *args: Any) -> R:
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)

    # -- reads ------------------------------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode=ro",
                uri=True,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.execute("PRAGMA busy_timeout = 5000")
            self._local.conn = conn
            with self._lock:
                self._read_conns.append(conn)
        return conn

    async def _read(self, fn: Callable[[sqlite3.Connection], R]) -> R:
        def run() -> R:
            conn = self._reader()
            # One read transaction, so the data and the head revision come from one snapshot.
            conn.execute("BEGIN")
            try:
                return fn(conn)
            finally:
                conn.execute("COMMIT")

        return await asyncio.get_running_loop().run_in_executor(self._readers, run)

    @staticmethod
    def _head(conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
        return row[0] if row else 0

    @classmethod
    def _compacted(cls, conn: sqlite3.Connection) -> int:
        """The newest revision trimmed from the change log: just before the oldest kept, or the
        head if none is kept (revisions are contiguous; trimming removes only the oldest)."""
        oldest = conn.execute("SELECT min(revision) FROM changes").fetchone()[0]
        return cls._head(conn) if oldest is None else oldest - 1

    @staticmethod
    def _snapshot(row: tuple[str, int]) -> TransactionSnapshot:
        return TransactionSnapshot(view=view_from_json(row[0]), revision=row[1])

    async def get(self, transaction_id: str) -> tuple[TransactionSnapshot | None, int]:
        def query(conn: sqlite3.Connection) -> tuple[TransactionSnapshot | None, int]:
            row = conn.execute(
                "SELECT view, revision FROM transactions WHERE id = ?", (transaction_id,)
            ).fetchone()
            return (self._snapshot(row) if row else None), self._head(conn)

        return await self._read(query)

    async def get_by_order(self, order_id: str) -> tuple[TransactionSnapshot | None, int]:
        def query(conn: sqlite3.Connection) -> tuple[TransactionSnapshot | None, int]:
            row = conn.execute(
                "SELECT t.view, t.revision FROM order_transactions o"
                " JOIN transactions t ON t.id = o.transaction_id WHERE o.order_id = ?",
                (order_id,),
            ).fetchone()
            return (self._snapshot(row) if row else None), self._head(conn)

        return await self._read(query)

    async def list(
        self, where: ListFilter, after_revision: int, limit: int
    ) -> tuple[list[TransactionSnapshot], int]:
        clauses: list[str] = ["revision > ?"]
        params: list[object] = [after_revision]
        if where.status is not None:
            clauses.append("status = ?")
            params.append(where.status.value)
        if where.team_id:
            clauses.append("team_id = ?")
            params.append(where.team_id)
        if where.user_id:
            clauses.append("user_id = ?")
            params.append(where.user_id)
        if where.updated_since is not None:
            clauses.append("updated_at >= ?")
            params.append(iso(where.updated_since))
        sql = (
            f"SELECT view, revision FROM transactions WHERE {' AND '.join(clauses)}"
            " ORDER BY revision LIMIT ?"
        )

        def query(conn: sqlite3.Connection) -> tuple[list[TransactionSnapshot], int]:
            rows = conn.execute(sql, (*params, limit)).fetchall()
            return [self._snapshot(r) for r in rows], self._head(conn)

        return await self._read(query)

    async def head_revision(self) -> int:
        return await self._read(self._head)

    async def changes_after(
        self, after_revision: int, limit: int, transaction_ids: Sequence[str] = ()
    ) -> ChangeLogPage:
        sql = (
            "SELECT revision, transaction_id, event_id, order_id, kinds, view, recorded_at"
            " FROM changes WHERE revision > ?"
        )
        params: list[object] = [after_revision]
        if transaction_ids:
            sql += f" AND transaction_id IN ({', '.join('?' * len(transaction_ids))})"
            params += transaction_ids
        sql += " ORDER BY revision LIMIT ?"
        params.append(limit)

        def query(conn: sqlite3.Connection) -> ChangeLogPage:
            rows = conn.execute(sql, params).fetchall()
            return ChangeLogPage(
                changes=[_change(row) for row in rows],
                compacted_revision=self._compacted(conn),
                head_revision=self._head(conn),
            )

        return await self._read(query)

    async def trim_changes(self, recorded_before: datetime) -> int:
        return await self._on_writer(self._trim_changes, iso(recorded_before))

    def _trim_changes(self, cutoff: str | None) -> int:
        conn = self._write_conn
        if conn is None:
            raise RuntimeError("store is not open")
        # Trim up to the newest change older than the cutoff, so the log stays contiguous even if
        # the clock stepped back; in chunks, so writers are never held up for long.
        (through,) = conn.execute(
            "SELECT max(revision) FROM changes WHERE recorded_at < ?", (cutoff,)
        ).fetchone()
        while through is not None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                deleted = conn.execute(
                    "DELETE FROM changes WHERE revision IN (SELECT revision FROM changes"
                    f" WHERE revision <= ? ORDER BY revision LIMIT {_TRIM_CHUNK})",
                    (through,),
                ).rowcount
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            if deleted < _TRIM_CHUNK:
                break
        return self._compacted(conn)


# Change rows never change, and watchers replaying the log read the same rows; decoding the
# stored view is most of the cost of a replay, so decoded changes are shared.
@functools.lru_cache(maxsize=4096)
def _change(row: tuple[int, str, str, str | None, str, str, str]) -> ChangeRecord:
    revision, transaction_id, event_id, order_id, kinds, view, recorded_at = row
    return ChangeRecord(
        revision=revision,
        transaction_id=transaction_id,
        event_id=event_id,
        order_id=order_id,
        kinds=tuple(ChangeKind(k) for k in kinds.split(",") if k),
        view=view_from_json(view),
        recorded_at=datetime.fromisoformat(recorded_at),
    )
