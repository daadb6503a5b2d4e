"""The embedded SQLite store, on aiosqlite.

One writer connection and a small pool of read-only connections (WAL lets reads proceed while the
writer writes). A batch of deliveries is a constant number of statements whatever its size (three
loads, then one statement per table written) and one commit, so aiosqlite's thread hop per
statement is paid per batch, not per event.

One process owns a database: an exclusive OS lock on `<db>.lock`, held for the life of the
process, keeps a second server off the file (two writers would each publish only their own changes
to their watchers, who would silently miss the other's).

Durability: WAL with `synchronous=FULL` by default, so an acknowledged event survives power loss,
not only a process crash. `NORMAL` is faster and still crash-safe, and can be chosen in settings.

Privacy: webhook bodies and combined results hold patient data, and erasing them (the body
retention) must leave no copy in any file of the store. The writer runs with `secure_delete`, so
SQLite zeroes what it frees, in the pages and on the free list; after an erasure the WAL, which
still holds the old page images, is checkpointed and truncated to nothing. The database, its
`-wal`, `-shm` and `.lock` files are readable by their owner only (0600): created so, and
tightened, with a warning, when found wider.

Faults: before each commit the store checks that the file at the path is still the one it opened;
a deleted or replaced file, a full disk or an I/O error fail the batch with StoreUnavailable
(nothing acknowledged), flip `health`, and are logged once per kind with a count.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import stat
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import aiosqlite

from transaction_service.domain.state import TransactionStatus
from transaction_service.store.base import (
    Answer,
    AppliedBatch,
    BatchKeys,
    BatchPlan,
    BatchState,
    ChangeLogPage,
    HistoryEvent,
    ListFilter,
    PendingResults,
    Planner,
    StoreDataRefused,
    StoredEvent,
    StoredEventBody,
    StoredResults,
    StoredTransaction,
    StoreInUse,
    StoreOpenError,
    StoreUnavailable,
    TransactionSnapshot,
)
from transaction_service.store.health import WriteHealth
from transaction_service.store.latest import LatestStates
from transaction_service.store.rows import (
    CHANGE_COLUMNS,
    EVENT_COLUMNS,
    HISTORY_COLUMNS,
    RESULTS_ROW_COLUMNS,
    change_log_page,
    history_event,
    iso,
    list_condition,
    many_found,
    many_index,
    pending_results,
    plan_rows,
    replay_events_from_rows,
    results_row,
    snapshot,
    stored_transaction,
)
from transaction_service.store.schema import migrations

log = logging.getLogger(__name__)

_READERS = 2
_TRIM_CHUNK = 5000
# Every file of a database: its own, and those SQLite and the lock make beside it.
_COMPANIONS = ("", "-wal", "-shm", "-journal", ".lock")
_OWNER_ONLY = 0o600


def sqlite_path(url: str) -> Path:
    """A path, or a `sqlite:///relative` / `sqlite:////absolute` URL."""
    if url.startswith("sqlite://"):
        rest = url.removeprefix("sqlite://")
        if not rest.startswith("/"):
            raise ValueError(f"not a SQLite URL: {url} (use sqlite:///path/to/file.db)")
        return Path(rest[1:])
    return Path(url)


async def _rows(conn: aiosqlite.Connection, sql: str, params: Sequence[Any] = ()) -> list[Any]:
    """All rows of a statement (a list, though aiosqlite declares an Iterable)."""
    return cast(list[Any], await conn.execute_fetchall(sql, params))


async def _begin(conn: aiosqlite.Connection) -> None:
    """BEGIN IMMEDIATE on the writer (under the write lock). A write cancelled while its BEGIN
    waited for aiosqlite's thread left, yet that BEGIN still ran there, and every write after it
    failed: a transaction was open. Such a transaction holds nothing acknowledged (its write
    raised), so it is rolled back. Only once the statements queued before this one have run, as
    when this BEGIN failed, does `in_transaction` say whether one is open."""
    try:
        await conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError:
        if not conn.in_transaction:
            raise
        await conn.execute("ROLLBACK")
        await conn.execute("BEGIN IMMEDIATE")


class _FileGone(Exception):
    pass


def _fault_kind(exc: BaseException) -> str:
    """A short name for what went wrong with a write; no Python text in it."""
    if isinstance(exc, _FileGone):
        return str(exc)
    text = str(exc).lower()
    for needle, kind in (
        ("disk is full", "disk full"),
        ("disk i/o", "I/O error"),
        ("readonly", "database is read-only"),
        ("read-only", "database is read-only"),
        ("locked", "database is locked"),
        ("unable to open", "cannot open the database file"),
        ("malformed", "database file is corrupt"),
        ("not a database", "database file is corrupt"),
    ):
        if needle in text:
            return kind
    if isinstance(exc, OSError):
        return exc.strerror or "I/O error"
    return "database error"


_EVENTS = (
    "SELECT e.event_id, e.digest, e.order_id, t.view, t.revision FROM events e"
    " LEFT JOIN order_transactions o ON o.order_id = e.order_id"
    " LEFT JOIN transactions t ON t.id = o.transaction_id"
    " WHERE e.event_id IN (SELECT value FROM json_each(?))"
)
_BY_ORDER = (
    "SELECT o.order_id, t.id, t.knowledge, t.view, t.revision FROM order_transactions o"
    " JOIN transactions t ON t.id = o.transaction_id"
    " WHERE o.order_id IN (SELECT value FROM json_each(?))"
)
_BY_ID = (
    "SELECT id, knowledge, view, revision FROM transactions"
    " WHERE id IN (SELECT value FROM json_each(?))"
)
_REPLAY = (
    "SELECT o.transaction_id, e.event_id, e.event_type, e.source, e.body_format, e.body,"
    " e.digest, e.order_id FROM order_transactions o JOIN events e ON e.order_id = o.order_id"
    " WHERE o.transaction_id IN (SELECT value FROM json_each(?)) ORDER BY e.seq"
)
_BUMP = "UPDATE meta SET value = value + ? WHERE key = 'head_revision' RETURNING value"
_INSERT_CHANGE = f"INSERT INTO changes ({CHANGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_UPSERT_TRANSACTION = (
    "INSERT INTO transactions (id, revision, status, team_id, user_id, updated_at, knowledge,"
    " view) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
    " revision = excluded.revision, status = excluded.status, team_id = excluded.team_id,"
    " user_id = excluded.user_id, updated_at = excluded.updated_at,"
    " knowledge = excluded.knowledge, view = excluded.view"
)
_UPSERT_ORDER = (
    "INSERT INTO order_transactions (order_id, transaction_id) VALUES (?, ?)"
    " ON CONFLICT (order_id) DO UPDATE SET transaction_id = excluded.transaction_id"
)
_INSERT_EVENT = (
    f"INSERT INTO events ({EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_COUNT_DUPLICATES = (
    "UPDATE events SET duplicates = duplicates + ?, last_duplicate_at = ? WHERE event_id = ?"
)
_UPSERT_HISTORY = (
    f"{_INSERT_EVENT} ON CONFLICT (event_id) DO UPDATE SET duplicates = duplicates + 1,"
    " last_duplicate_at = excluded.received_at"
)
# A transaction's history: the events of its orders, and the rows the service recorded for it.
_HISTORY = (
    f"SELECT {HISTORY_COLUMNS}, {{body}} FROM events e"
    " LEFT JOIN changes c ON c.revision = e.revision"
    " WHERE e.seq IN (SELECT seq FROM events WHERE order_id IN"
    " (SELECT order_id FROM order_transactions WHERE transaction_id = ?) AND seq > ?"
    " UNION ALL SELECT seq FROM events WHERE order_id IS NULL AND transaction_id = ? AND seq > ?)"
    " ORDER BY e.seq LIMIT ?"
)
_UPSERT_RESULTS = (
    "INSERT INTO transaction_results (transaction_id, status, digest, body, fetched_at, revision)"
    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (transaction_id) DO UPDATE SET"
    " status = excluded.status, digest = excluded.digest, body = excluded.body,"
    " fetched_at = excluded.fetched_at, revision = excluded.revision"
)
_UPSERT_PENDING = (
    "INSERT INTO results_pending (transaction_id, requested_revision, requested_at, attempts,"
    " due_at, last_failure) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (transaction_id) DO UPDATE SET"
    " requested_revision = excluded.requested_revision, requested_at = excluded.requested_at,"
    " attempts = excluded.attempts, due_at = excluded.due_at,"
    " last_failure = excluded.last_failure"
)
_PENDING_COLUMNS = (
    "transaction_id, requested_revision, requested_at, attempts, due_at, last_failure"
)
_RESULTS_KEPT = (
    "SELECT transaction_id, digest FROM transaction_results"
    " WHERE body IS NOT NULL AND transaction_id IN (SELECT value FROM json_each(?))"
)
_RESULTS_PENDING = (
    f"SELECT {_PENDING_COLUMNS} FROM results_pending"
    " WHERE transaction_id IN (SELECT value FROM json_each(?))"
)
_HEAD = "(SELECT value FROM meta WHERE key = 'head_revision')"
_COMPACTED = "(SELECT value FROM meta WHERE key = 'compacted_revision')"


class SqliteStore:
    """SQLite behind the `Store` interface. Open before use; always close (an open connection
    keeps the process from exiting)."""

    def __init__(
        self, path: Path | str, *, synchronous: str = "FULL", lock_timeout: float = 2.0
    ) -> None:
        self.path = sqlite_path(os.fspath(path))
        self.description = str(self.path)
        self.health = WriteHealth(self.description)
        self.shared = False
        self._synchronous = synchronous
        # How long the writer waits for a lock another connection to the file holds.
        self._lock_timeout_ms = int(lock_timeout * 1000)
        self._writer: aiosqlite.Connection | None = None
        self._readers: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
        self._all_readers: list[aiosqlite.Connection] = []
        # Point reads (one row by key) run on the event loop's thread: a primary-key lookup takes
        # SQLite a few microseconds, less than the thread hop aiosqlite pays for it.
        self._point: sqlite3.Connection | None = None
        self._write_lock = asyncio.Lock()
        self._identity: tuple[int, int] | None = None
        self._lock_fd: int | None = None
        # Bodies were erased but the WAL could not be emptied yet (a reader was in the way).
        self._scrub_pending = False
        # GetTransaction's states, kept between writes (store/latest.py says why it is right).
        self._latest = LatestStates()

    # -- lifecycle --------------------------------------------------------------------------------

    async def open(self) -> None:
        if self.path.name in ("", ".", ".."):
            # `.`, `..`, `/` or `sqlite:///`: a folder, never a file; the lock file beside it
            # could not even be named.
            raise StoreOpenError(
                f"--db {str(self.path)!r} names a folder, not a file: give a file path, "
                "such as var/transactions.db"
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StoreOpenError(
                f"cannot create the folder of {self.path}: {exc.strerror or exc}"
            ) from None
        self._take_lock()
        try:
            self._create_owner_only()
            await self._open_writer()
            self._identity = self._stat()
            for _ in range(_READERS):
                reader = await aiosqlite.connect(
                    f"{self.path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None
                )
                self._all_readers.append(reader)
                await reader.execute("PRAGMA busy_timeout = 5000")
                self._readers.put_nowait(reader)
            self._point = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None
            )
            # Never wait on the loop's thread: a busy database sends the read to the pool.
            self._point.execute("PRAGMA busy_timeout = 0")
            self._latest = LatestStates()
        except BaseException:
            await self.close()
            raise

    def _take_lock(self) -> None:
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, _OWNER_ONLY)
        except OSError as exc:
            raise StoreOpenError(f"cannot create {lock_path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreInUse(
                f"{self.path} is in use by another transaction-service process (pid {holder}); "
                "one process owns a SQLite database: stop it, or use another --db"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _create_owner_only(self) -> None:
        """Create the database file readable by its owner only: it holds patient data, and
        SQLite gives its `-wal` and `-shm` the database's mode."""
        try:
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _OWNER_ONLY))
        except FileExistsError:
            pass
        except OSError as exc:
            raise StoreOpenError(f"cannot create {self.path}: {exc.strerror or exc}") from None

    def _tighten(self) -> None:
        """Make the files of an existing database (known to be this service's) readable by their
        owner only where they are wider. Tightened rather than refused, so that an upgrade keeps
        running; a warning names each file, since whoever read it through a group or as another
        user (a backup job, say) no longer can."""
        tightened: list[str] = []
        stuck: list[str] = []
        for suffix in _COMPANIONS:
            path = self.path.with_name(self.path.name + suffix)
            try:
                mode = stat.S_IMODE(os.stat(path).st_mode)
                if mode & 0o077:
                    os.chmod(path, mode & 0o700)
                    tightened.append(f"{path.name} (was {mode:04o})")
            except FileNotFoundError:
                continue
            except OSError as exc:  # not its owner, say
                stuck.append(f"{path.name} ({exc.strerror or exc})")
        if tightened:
            log.warning(
                "files of %s were readable by others and hold patient data: made readable by "
                "their owner only: %s; whoever read them as another user or through a group no "
                "longer can",
                self.path,
                ", ".join(tightened),
            )
        if stuck:
            log.warning(
                "files of %s may be readable by others and hold patient data, and could not be "
                "made readable by their owner only: %s; chmod 600 them",
                self.path,
                ", ".join(stuck),
            )

    async def _open_writer(self) -> None:
        try:
            conn = await aiosqlite.connect(self.path, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreOpenError(f"cannot open {self.path}: {_fault_kind(exc)}") from None
        self._writer = conn
        try:
            await self._check_file(conn)
            self._tighten()
            await conn.execute("PRAGMA journal_mode = WAL")
            await conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            await conn.execute(f"PRAGMA busy_timeout = {self._lock_timeout_ms}")
            # Zero what is deleted, so that erased bodies leave nothing behind in the file.
            await conn.execute("PRAGMA secure_delete = ON")
            fresh = (await _rows(conn, "PRAGMA user_version"))[0][0] == 0
            await self._migrate(conn)
            await self._zero_free_space(conn, fresh=fresh)
            # A WAL left by a process that stopped between an erasure and its checkpoint. Not
            # worth refusing to start over (a full disk, say): the next erasure pass tries again.
            try:
                await conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                self._scrub_pending = True
        except sqlite3.Error as exc:
            raise StoreOpenError(f"cannot use {self.path}: {_fault_kind(exc)}") from None

    async def _zero_free_space(self, conn: aiosqlite.Connection, *, fresh: bool) -> None:
        """Once per database: one written before `secure_delete` may hold erased bodies in its
        free space, which only a VACUUM (a fresh copy of what is live) clears. Recorded in
        `meta`, so it runs once; a failure (a full disk, say) is retried at the next start."""
        if await _rows(conn, "SELECT 1 FROM meta WHERE key = 'secure_delete'"):
            return
        if not fresh:
            log.warning(
                "zeroing the free space of %s once (VACUUM): it was written before erased "
                "content was zeroed, so bodies erased before may remain in it; this rewrites "
                "the whole file and takes a while on a large database",
                self.path,
            )
            started = time.monotonic()
            try:
                await conn.execute("VACUUM")
                await conn.execute("INSERT INTO meta (key, value) VALUES ('secure_delete', 1)")
            except sqlite3.Error as exc:
                log.warning(
                    "could not zero the free space of %s (%s); tried again at the next start",
                    self.path,
                    _fault_kind(exc),
                )
                return
            log.info("zeroed the free space of %s in %.1f s", self.path, time.monotonic() - started)
        else:
            await conn.execute("INSERT INTO meta (key, value) VALUES ('secure_delete', 1)")

    async def _check_file(self, conn: aiosqlite.Connection) -> None:
        """The file is a healthy SQLite database of this service, of a schema it knows."""
        try:
            rows = await conn.execute_fetchall("PRAGMA quick_check")
        except sqlite3.DatabaseError as exc:
            if "not a database" in str(exc) or "encrypted" in str(exc):
                raise StoreOpenError(f"{self.path} is not a SQLite database") from None
            raise StoreOpenError(
                f"{self.path} is corrupt and cannot be used; restore it from a backup"
            ) from None
        problems = [row[0] for row in rows if row[0] != "ok"]
        if problems:
            raise StoreOpenError(
                f"{self.path} failed its integrity check ({len(problems)} problem(s), first: "
                f"{problems[0][:100]}); restore it from a backup"
            )
        version = (await _rows(conn, "PRAGMA user_version"))[0][0]
        known = migrations("sqlite")[-1][0]
        if version > known:
            raise StoreOpenError(
                f"{self.path} has schema version {version}, newer than this service knows "
                f"({known}); run a newer transaction-service"
            )
        if version == 0:
            tables = (await _rows(conn, "SELECT count(*) FROM sqlite_master"))[0][0]
            if tables:
                raise StoreOpenError(
                    f"{self.path} is a SQLite database of something else (it has tables but no "
                    "schema version of this service); use another --db"
                )

    async def _migrate(self, conn: aiosqlite.Connection) -> None:
        current = (await _rows(conn, "PRAGMA user_version"))[0][0]
        for version, name, script in migrations("sqlite"):
            if version <= current:
                continue
            log.info("applying migration %s to %s", name, self.path)
            # executescript commits first; the script and the version bump then commit together.
            await conn.executescript(
                f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {version};\nCOMMIT;"
            )

    async def close(self) -> None:
        # The readers first: the last connection to close checkpoints the WAL and deletes it,
        # and a read-only one cannot, which would leave the WAL (old page images) behind.
        for reader in self._all_readers:
            with contextlib.suppress(sqlite3.Error):
                await reader.close()
        self._all_readers.clear()
        self._readers = asyncio.Queue()
        if self._point is not None:
            self._point.close()
            self._point = None
        self._latest.unsure()
        async with self._write_lock:
            if self._writer is not None:
                with contextlib.suppress(sqlite3.Error):
                    await self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                with contextlib.suppress(sqlite3.Error):
                    await self._writer.close()
                self._writer = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    # -- writes -----------------------------------------------------------------------------------

    def _stat(self) -> tuple[int, int]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise _FileGone("database file deleted") from None
        return st.st_dev, st.st_ino

    def _check_identity(self) -> None:
        """Never acknowledge into a file that is no longer the one at the path: after a restart
        the service would open the file at the path, and what was written here would be gone."""
        if self._stat() != self._identity:
            raise _FileGone("database file replaced")

    async def write(self, keys: BatchKeys, plan: Planner[Answer]) -> tuple[AppliedBatch, Answer]:
        async with self._write_lock:
            conn = self._writer
            if conn is None:
                raise StoreUnavailable("the store is closed")
            try:
                self._check_identity()
                await _begin(conn)
                try:
                    state = await self._load(conn, keys)
                    batch, answer = plan(state)
                    applied = await self._apply(conn, batch)
                    self._check_identity()
                    # From here until `committed`, SQLite may show the new rows: the kept states
                    # answer nothing meanwhile, so no reader sees the commit and then what was
                    # before it.
                    self._latest.committing()
                    await conn.execute("COMMIT")
                except BaseException:
                    # Whether it committed is not always known (cancelled while SQLite
                    # committed, an I/O error from COMMIT): the kept states may be stale.
                    self._latest.unsure()
                    if conn.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            await conn.execute("ROLLBACK")
                    raise
                self._latest.committed(
                    applied.base_revision + len(batch.changes) if batch.changes else None,
                    (*batch.transactions, *batch.deleted),
                    batch.order_index,
                )
            except (sqlite3.DataError, UnicodeEncodeError) as exc:
                # The data written is to blame (a value SQLite cannot bind or hold), not the
                # store: health stays as it is, and the commit path finds the delivery.
                raise StoreDataRefused(f"SQLite: {type(exc).__name__}") from None
            except (sqlite3.Error, OSError, _FileGone) as exc:
                kind = _fault_kind(exc)
                self.health.failed(kind)
                raise StoreUnavailable(
                    f"the event was not stored: the database cannot write ({kind}). Retry later."
                ) from None
        self.health.succeeded()
        return applied, answer

    async def _load(self, conn: aiosqlite.Connection, keys: BatchKeys) -> BatchState:
        state = BatchState()
        for event_id, digest, order_id, view, revision in await conn.execute_fetchall(
            _EVENTS, (json.dumps(list(keys.event_ids)),)
        ):
            current = snapshot(view, revision) if view is not None else None
            state.events[event_id] = StoredEvent(event_id, digest, order_id, current)
        decoded: dict[str, StoredTransaction] = {}
        for order_id, txn_id, knowledge, view, revision in await conn.execute_fetchall(
            _BY_ORDER, (json.dumps(list(keys.order_ids)),)
        ):
            state.order_index[order_id] = txn_id
            if txn_id not in decoded:
                decoded[txn_id] = stored_transaction(knowledge, view, revision)
        wanted = [t for t in keys.transaction_ids if t not in decoded]
        if wanted:
            for txn_id, knowledge, view, revision in await conn.execute_fetchall(
                _BY_ID, (json.dumps(wanted),)
            ):
                decoded[txn_id] = stored_transaction(knowledge, view, revision)
        state.transactions = decoded
        if keys.replay:
            rows = await _rows(conn, _REPLAY, (json.dumps(list(keys.replay)),))
            state.replay_events = replay_events_from_rows(rows)
        if keys.results_of:
            wanted_json = json.dumps(sorted(keys.results_of))
            for txn_id, digest in await conn.execute_fetchall(_RESULTS_KEPT, (wanted_json,)):
                state.results_kept[txn_id] = digest
            for row in await conn.execute_fetchall(_RESULTS_PENDING, (wanted_json,)):
                state.results_pending[row[0]] = pending_results(*row)
        return state

    async def _apply(self, conn: aiosqlite.Connection, batch: BatchPlan) -> AppliedBatch:
        base = 0
        if batch.changes:
            (head,) = (await _rows(conn, _BUMP, (len(batch.changes),)))[0]
            base = head - len(batch.changes)
        rows = plan_rows(batch, base, iso)
        for statement, key in (
            (_INSERT_CHANGE, "changes"),
            (_UPSERT_TRANSACTION, "transactions"),
            ("DELETE FROM transactions WHERE id = ?", "deleted"),
            (_UPSERT_ORDER, "orders"),
            (_INSERT_EVENT, "events"),
            (_COUNT_DUPLICATES, "duplicates"),
            (_UPSERT_HISTORY, "history"),
            (_UPSERT_RESULTS, "results"),
            ("DELETE FROM results_pending WHERE transaction_id = ?", "results_done"),
            (_UPSERT_PENDING, "results_pending"),
        ):
            if rows[key]:
                await conn.executemany(statement, rows[key])
        records = [c.record(base + i + 1) for i, c in enumerate(batch.changes)]
        return AppliedBatch(batch, base, records)

    async def probe(self) -> None:
        try:
            await self.write(
                BatchKeys(frozenset(), frozenset(), frozenset()), lambda state: (BatchPlan(), None)
            )
        except StoreUnavailable:
            return

    # -- reads ------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _reader(self) -> AsyncIterator[aiosqlite.Connection]:
        if not self._all_readers:
            # Closed (or never opened): the queue would wait forever.
            raise StoreUnavailable("the store is closed")
        conn = await self._readers.get()
        try:
            yield conn
        finally:
            self._readers.put_nowait(conn)

    async def _fetch_point(self, sql: str, params: Sequence[Any]) -> list[Any]:
        """A read of a row or two by key: on the loop's thread (see `_point`), or through the
        pool if the database is busy just now."""
        if self._point is not None:
            try:
                return self._point.execute(sql, params).fetchall()
            except sqlite3.OperationalError:
                pass
        return await self._fetch(sql, params)

    async def _fetch(self, sql: str, params: Sequence[Any]) -> list[Any]:
        # One statement is one snapshot: every read below asks for the data and the revisions it
        # reports in a single statement, so they always agree.
        async with self._reader() as conn:
            return list(await _rows(conn, sql, params))

    async def get(self, transaction_id: str) -> tuple[TransactionSnapshot | None, int]:
        kept = self._latest.get(transaction_id)
        if kept is not None:
            return kept
        writes_ended = self._latest.writes_ended
        rows = await self._fetch_point(
            f"SELECT {_HEAD}, t.view, t.revision FROM (SELECT 1)"
            " LEFT JOIN transactions t ON t.id = ?",
            (transaction_id,),
        )
        head, view, revision = rows[0]
        self._latest.learn(
            writes_ended, head, transaction_id, view, revision, writing=self._write_lock.locked()
        )
        return (snapshot(view, revision) if view is not None else None), head

    async def get_by_order(self, order_id: str) -> tuple[TransactionSnapshot | None, int]:
        kept = self._latest.get_by_order(order_id)
        if kept is not None:
            return kept
        writes_ended = self._latest.writes_ended
        rows = await self._fetch_point(
            f"SELECT {_HEAD}, t.view, t.revision, t.id FROM (SELECT 1)"
            " LEFT JOIN order_transactions o ON o.order_id = ?"
            " LEFT JOIN transactions t ON t.id = o.transaction_id",
            (order_id,),
        )
        head, view, revision, transaction_id = rows[0]
        self._latest.learn(
            writes_ended,
            head,
            transaction_id,
            view,
            revision,
            order_id=order_id,
            writing=self._write_lock.locked(),
        )
        return (snapshot(view, revision) if view is not None else None), head

    async def list_transactions(
        self, where: ListFilter, after_revision: int, limit: int
    ) -> tuple[list[TransactionSnapshot], int]:
        condition, params = list_condition(where, after_revision, iso, lambda _: "?")
        rows = await self._fetch(
            f"SELECT {_HEAD}, t.view, t.revision FROM (SELECT 1) LEFT JOIN"
            f" (SELECT view, revision FROM transactions WHERE {condition}"
            " ORDER BY revision LIMIT ?) t ON 1 ORDER BY t.revision",
            (*params, limit),
        )
        head = rows[0][0]
        return [snapshot(view, revision) for _, view, revision in rows if view is not None], head

    async def head_revision(self) -> int:
        return int((await self._fetch_point(f"SELECT {_HEAD}", ()))[0][0])

    async def get_many(
        self,
        transaction_ids: Sequence[str],
        order_ids: Sequence[str],
        *,
        chunk_bytes: int | None = None,
        on_chunk: Callable[[Sequence[TransactionSnapshot]], None] | None = None,
    ) -> tuple[dict[str, TransactionSnapshot], dict[str, TransactionSnapshot], int]:
        # One read transaction, so one snapshot (WAL): first which transaction each id finds,
        # with the size of its stored state (not the state), then the states in chunks.
        async with self._reader() as conn:
            await conn.execute("BEGIN")
            try:
                index = await _rows(
                    conn,
                    f"SELECT {_HEAD}, 't', id, id, length(view) FROM transactions"
                    " WHERE id IN (SELECT value FROM json_each(?))"
                    f" UNION ALL SELECT {_HEAD}, 'o', o.order_id, t.id, length(t.view)"
                    " FROM order_transactions o JOIN transactions t ON t.id = o.transaction_id"
                    " WHERE o.order_id IN (SELECT value FROM json_each(?))"
                    f" UNION ALL SELECT {_HEAD}, NULL, NULL, NULL, NULL",
                    (json.dumps(list(set(transaction_ids))), json.dumps(list(set(order_ids)))),
                )
                chunks, head = many_index(index, chunk_bytes)
                snapshots: dict[str, TransactionSnapshot] = {}
                for chunk in chunks:
                    rows = await _rows(
                        conn,
                        "SELECT id, view, revision FROM transactions"
                        " WHERE id IN (SELECT value FROM json_each(?))",
                        (json.dumps(chunk),),
                    )
                    read = [snapshot(view, revision) for _, view, revision in rows]
                    if on_chunk is not None:
                        on_chunk(read)
                    snapshots.update(zip((row[0] for row in rows), read, strict=True))
                    del rows, read
            finally:
                # Shielded: a connection must never go back to the pool inside a read
                # transaction (it would read an old snapshot, and hold back checkpoints), and
                # statements on one connection run in order, so the next user runs after this.
                await asyncio.shield(conn.execute("ROLLBACK"))
        return many_found(index, snapshots, head)

    async def transaction_ids(self, after_id: str, limit: int) -> list[str]:
        rows = await self._fetch(
            "SELECT id FROM transactions WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)
        )
        return [row[0] for row in rows]

    async def count_transactions(self) -> int:
        return int((await self._fetch("SELECT count(*) FROM transactions", ()))[0][0])

    async def replay_events(
        self, transaction_ids: Sequence[str]
    ) -> dict[str, list[StoredEventBody]]:
        return replay_events_from_rows(
            await self._fetch(_REPLAY, (json.dumps(list(transaction_ids)),))
        )

    async def changes_after(
        self, after_revision: int, limit: int, transaction_ids: Sequence[str] = ()
    ) -> ChangeLogPage:
        where = "revision > ?"
        params: list[object] = [after_revision]
        if transaction_ids:
            where += " AND transaction_id IN (SELECT value FROM json_each(?))"
            params.append(json.dumps(list(transaction_ids)))
        rows = await self._fetch(
            f"SELECT {_COMPACTED}, {_HEAD}, c.* FROM (SELECT 1) LEFT JOIN"
            f" (SELECT {CHANGE_COLUMNS} FROM changes WHERE {where} ORDER BY revision LIMIT ?) c"
            " ON 1 ORDER BY c.revision",
            (*params, limit),
        )
        return change_log_page(rows)

    async def changes_through(
        self, revision: int, limit: int, transaction_ids: Sequence[str]
    ) -> ChangeLogPage:
        rows = await self._fetch(
            f"SELECT {_COMPACTED}, {_HEAD}, c.* FROM (SELECT 1) LEFT JOIN"
            f" (SELECT {CHANGE_COLUMNS} FROM changes WHERE revision <= ? AND transaction_id IN"
            " (SELECT value FROM json_each(?)) ORDER BY revision DESC LIMIT ?) c"
            " ON 1 ORDER BY c.revision DESC",
            (revision, json.dumps(list(transaction_ids)), limit),
        )
        return change_log_page(rows)

    async def transaction_events(
        self, transaction_id: str, after_seq: int, limit: int, *, bodies: bool
    ) -> Sequence[HistoryEvent]:
        rows = await self._fetch(
            _HISTORY.format(body="e.body" if bodies else "NULL"),
            (transaction_id, after_seq, transaction_id, after_seq, limit),
        )
        return [history_event(row[:-1], row[-1]) for row in rows]

    # -- housekeeping -----------------------------------------------------------------------------

    async def trim_changes(self, recorded_before: datetime) -> int:
        cutoff = iso(recorded_before)
        # Trim up to the newest change older than the cutoff, so the log stays contiguous even if
        # the clock stepped back; in chunks, each its own short write, so ingest is never held up
        # for long.
        through = (
            await self._fetch("SELECT max(revision) FROM changes WHERE recorded_at < ?", (cutoff,))
        )[0][0]
        while through is not None:
            async with self._write_lock:
                conn = self._writer
                if conn is None:
                    break
                await _begin(conn)
                try:
                    cursor = await conn.execute(
                        "DELETE FROM changes WHERE revision IN (SELECT revision FROM changes"
                        f" WHERE revision <= ? ORDER BY revision LIMIT {_TRIM_CHUNK})",
                        (through,),
                    )
                    deleted = cursor.rowcount
                    await conn.execute(
                        "UPDATE meta SET value = coalesce((SELECT min(revision) - 1 FROM changes),"
                        f" {_HEAD}) WHERE key = 'compacted_revision'"
                    )
                    await conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        await conn.execute("ROLLBACK")
                    raise
            if deleted < _TRIM_CHUNK:
                break
        return int((await self._fetch(f"SELECT {_COMPACTED}", ()))[0][0])

    async def erase_bodies(self, received_before: datetime) -> int:
        """Erase the bodies of events received before the time; id, digest, outcome and revision
        stay. Returns how many were erased."""
        cutoff = iso(received_before)
        erased = 0
        while True:
            async with self._write_lock:
                conn = self._writer
                if conn is None:
                    raise StoreUnavailable("the store is closed")
                cursor = await conn.execute(
                    "UPDATE events SET body = NULL WHERE seq IN (SELECT seq FROM events"
                    f" WHERE body IS NOT NULL AND received_at < ? LIMIT {_TRIM_CHUNK})",
                    (cutoff,),
                )
                count = cursor.rowcount
            erased += count
            if count < _TRIM_CHUNK:
                break
        await self._scrub(erased)
        return erased

    async def _scrub(self, erased: int) -> None:
        """After an erasure, empty the WAL: its frames still hold the pages as they were before
        (`secure_delete` zeroes only the pages written from now on). A TRUNCATE checkpoint copies
        the newest frames into the database and truncates the WAL to nothing; a reader in the
        way makes it give up, and it is tried again after the next erasure pass."""
        if not erased and not self._scrub_pending:
            return
        async with self._write_lock:
            conn = self._writer
            if conn is None:
                raise StoreUnavailable("the store is closed")
            try:
                busy = (await _rows(conn, "PRAGMA wal_checkpoint(TRUNCATE)"))[0][0]
            except sqlite3.Error as exc:
                busy, fault = 1, _fault_kind(exc)
            else:
                fault = "a reader kept it busy"
        if busy:
            if not self._scrub_pending:
                log.warning(
                    "erased bodies may stay in %s and its -wal until the next erasure pass: "
                    "its checkpoint did not complete (%s)",
                    self.path,
                    fault,
                )
            self._scrub_pending = True
        else:
            self._scrub_pending = False

    async def change_notifications(self) -> AsyncGenerator[None]:
        # One process owns the file: every change is committed, and published, by this process.
        await asyncio.Event().wait()
        yield

    # -- combined results and reconciliation ------------------------------------------------------

    async def get_results(
        self, transaction_id: str
    ) -> tuple[StoredResults | None, PendingResults | None]:
        rows = await self._fetch(
            f"SELECT {RESULTS_ROW_COLUMNS}"
            " FROM (SELECT 1) LEFT JOIN transaction_results r ON r.transaction_id = ?"
            " LEFT JOIN results_pending p ON p.transaction_id = ?",
            (transaction_id, transaction_id),
        )
        return results_row(transaction_id, rows[0])

    async def results_due(self, now: datetime, limit: int) -> list[PendingResults]:
        rows = await self._fetch(
            f"SELECT {_PENDING_COLUMNS} FROM results_pending WHERE due_at <= ?"
            " ORDER BY due_at LIMIT ?",
            (iso(now), limit),
        )
        return [pending_results(*row) for row in rows]

    async def erase_results(self, fetched_before: datetime) -> int:
        erased = await self._write_simple(
            "UPDATE transaction_results SET body = NULL WHERE body IS NOT NULL AND fetched_at < ?",
            [(iso(fetched_before),)],
        )
        await self._scrub(erased)
        return erased

    async def reconcile_candidates(self, silent_before: datetime, limit: int) -> list[str]:
        cutoff = iso(silent_before)
        rows = await self._fetch(
            "SELECT t.id FROM transactions t"
            " LEFT JOIN reconcile_checks c ON c.transaction_id = t.id"
            " WHERE t.status = ? AND (t.updated_at IS NULL OR t.updated_at < ?)"
            " AND (c.checked_at IS NULL OR c.checked_at < ?)"
            " ORDER BY t.updated_at NULLS FIRST, t.id LIMIT ?",
            (TransactionStatus.ACTIVE.value, cutoff, cutoff, limit),
        )
        return [row[0] for row in rows]

    async def record_reconcile_checks(
        self, transaction_ids: Sequence[str], checked_at: datetime
    ) -> None:
        await self._write_simple(
            "INSERT INTO reconcile_checks (transaction_id, checked_at) VALUES (?, ?)"
            " ON CONFLICT (transaction_id) DO UPDATE SET checked_at = excluded.checked_at",
            [(t, iso(checked_at)) for t in transaction_ids],
        )

    @contextlib.asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[bool]:
        if self._writer is None:
            raise StoreUnavailable("the store is closed")
        # One process owns the database file (see `_take_lock`): it is always the only runner.
        yield True

    async def _write_simple(self, sql: str, rows: list[tuple[Any, ...]]) -> int:
        """One statement over `rows` in a short write transaction of its own; rows changed."""
        if not rows:
            return 0
        async with self._write_lock:
            conn = self._writer
            if conn is None:
                raise StoreUnavailable("the store is closed")
            try:
                await _begin(conn)
                try:
                    cursor = await conn.executemany(sql, rows)
                    changed = cursor.rowcount
                    await conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            await conn.execute("ROLLBACK")
                    raise
            except (sqlite3.Error, OSError) as exc:
                kind = _fault_kind(exc)
                self.health.failed(kind)
                raise StoreUnavailable(
                    f"the database cannot write ({kind}). Retry later."
                ) from None
        return changed
