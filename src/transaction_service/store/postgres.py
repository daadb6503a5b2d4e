"""The PostgreSQL store, on asyncpg: several replicas share one database.

Correct with concurrent writers (every replica ingests):
- **Keys are locked, in one global order.** A batch takes a transaction-scoped advisory lock on
  every key it touches (event ids, order ids, transaction ids; `lock_names`), sorted,
  before it reads anything. Sorted order means two writers can never wait on each other in a
  cycle; locking event ids means a duplicate delivered to two replicas at once is applied once (the
  second waits, then sees the first's event). If the loaded state points at a transaction the keys
  did not name (an order indexed to it), the batch try-locks it; if another writer holds it, the
  batch rolls back and starts again with the larger key set, locked in order. The merge is a join,
  so planning again is always safe.
- **Revisions in commit order.** One counter row, bumped by the number of changes as the last
  step before COMMIT: the row lock orders commits, so revisions are contiguous and a reader that
  sees revision N has seen every revision below it.
- **Watchers on every replica.** Each commit sends NOTIFY (a wake-up only: payloads are small and
  notifications sent while a listener is disconnected are lost); every replica tails the change
  log on each wake-up, after each reconnect and on a timer (`watch.ChangeFeed`).
- **One trimmer at a time**, by a try-lock: the others skip their turn.

Under faults (another session holding locks, a stuck database):
- every connection has a `lock_timeout` and a `statement_timeout`, well inside a caller's
  deadline: a write that cannot get a lock fails in seconds, as UNAVAILABLE, instead of hanging
  until every caller gave up;
- rows of the batch's transactions and orders locked by another session (not by a writer of
  this service, which takes the advisory locks first) are found without waiting (`FOR UPDATE
  SKIP LOCKED`) and reported as KeysBusy: the commit path commits the batch without the
  deliveries that touch them;
- a data error (SQLSTATE class 22, or a program limit such as an index entry too large) is
  StoreDataRefused: one delivery's data is to blame, and the commit path finds it;
- `health` names the cause of a fault ("lock wait" is not "database unreachable").
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from transaction_service.domain.state import TransactionStatus
from transaction_service.store.base import (
    Answer,
    AppliedBatch,
    BatchKeys,
    BatchPlan,
    BatchState,
    ChangeLogPage,
    HistoryEvent,
    KeysBusy,
    ListFilter,
    PendingResults,
    Planner,
    StoreDataRefused,
    StoredEvent,
    StoredEventBody,
    StoredResults,
    StoredTransaction,
    StoreOpenError,
    StoreUnavailable,
    TransactionSnapshot,
)
from transaction_service.store.health import WriteHealth
from transaction_service.store.rows import (
    CHANGE_COLUMNS,
    EVENT_COLUMNS,
    HISTORY_COLUMNS,
    RESULTS_ROW_COLUMNS,
    change_log_page,
    history_event,
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

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    # A connection of the pool, as `pool.acquire()` hands it out.
    _Connection = PoolConnectionProxy[asyncpg.Record]

log = logging.getLogger(__name__)

CHANNEL = "transaction_changes"
# Session advisory lock held while migrating, so replicas starting together do not race.
_MIGRATION_LOCK = 0x7478_6D69_6772_6174  # "txmigrat"
_TRIM_LOCK = 0x7478_7472_696D_0000  # "txtrim"
_TRIM_CHUNK = 5000
_WRITE_ATTEMPTS = 5
_RECONNECT_SECONDS = (0.2, 0.5, 1.0, 2.0, 5.0)
LOCK_TIMEOUT_SECONDS = 2.0
STATEMENT_TIMEOUT_SECONDS = 10.0
# asyncpg's own limit on a statement, past the server's: a server that stops answering.
_CLIENT_GRACE_SECONDS = 5.0

_CONNECTION_ERRORS = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    # The server stopping or restarting ends each session with an error of its own (57P01
    # admin_shutdown, 57P02 crash_shutdown), and asyncpg may then report a connection it was
    # using in an unexpected state as an InternalClientError: all of them "unreachable".
    asyncpg.OperatorInterventionError,
    asyncpg.InternalClientError,
)


def redact(url: str) -> str:
    """The URL without its password, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory lock key for a namespaced name."""
    return int.from_bytes(
        hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True
    )


def lock_names(keys: BatchKeys) -> list[str]:
    """Sorted, namespaced: taking locks in one global order is what prevents deadlocks."""
    return sorted(
        [f"e:{k}" for k in keys.event_ids]
        + [f"o:{k}" for k in keys.order_ids]
        + [f"t:{k}" for k in keys.transaction_ids]
    )


def _fault_kind(exc: BaseException) -> str:
    if isinstance(exc, asyncpg.LockNotAvailableError):
        return "lock wait timed out (another database session holds a lock on the service's tables)"
    if isinstance(exc, asyncpg.QueryCanceledError):
        return "statement timed out (the database is too slow, or waits on something)"
    if isinstance(exc, asyncio.TimeoutError):
        return "no answer from the database in time"
    if isinstance(exc, asyncpg.DiskFullError):
        return "disk full"
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return "permission denied"
    if isinstance(exc, asyncpg.ReadOnlySQLTransactionError):
        return "database is read-only"
    if isinstance(exc, _CONNECTION_ERRORS):
        return "database unreachable"
    if isinstance(exc, asyncpg.PostgresError):
        return f"database error {exc.sqlstate}"
    return "database error"


def _data_fault(exc: BaseException) -> str | None:
    """The SQLSTATE of an error caused by the data written rather than by the store, if so."""
    if isinstance(exc, asyncpg.DataError | asyncpg.ProgramLimitExceededError):
        return f"PostgreSQL error {exc.sqlstate}"
    if isinstance(exc, UnicodeEncodeError):
        return "text that is not UTF-8"
    return None


class _ProbeDone(Exception):
    """Rolls the probe's transaction back."""


class _MoreKeys(Exception):
    def __init__(self, transaction_ids: set[str]) -> None:
        self.transaction_ids = transaction_ids


_EVENTS = (
    "SELECT e.event_id, e.digest, e.order_id, t.view, t.revision FROM events e"
    " LEFT JOIN order_transactions o ON o.order_id = e.order_id"
    " LEFT JOIN transactions t ON t.id = o.transaction_id"
    " WHERE e.event_id = ANY($1::text[])"
)
_BY_ORDER = (
    "SELECT o.order_id, t.id, t.knowledge, t.view, t.revision FROM order_transactions o"
    " JOIN transactions t ON t.id = o.transaction_id WHERE o.order_id = ANY($1::text[])"
)
_BY_ID = "SELECT id, knowledge, view, revision FROM transactions WHERE id = ANY($1::text[])"
_REPLAY = (
    "SELECT o.transaction_id, e.event_id, e.event_type, e.source, e.body_format, e.body,"
    " e.digest, e.order_id FROM order_transactions o JOIN events e ON e.order_id = o.order_id"
    " WHERE o.transaction_id = ANY($1::text[]) ORDER BY e.seq"
)
_LOCK = (
    "SELECT count(pg_advisory_xact_lock(k)) FROM unnest($1::bigint[]) WITH ORDINALITY AS u(k, n)"
)
_TRY_LOCK = "SELECT bool_and(pg_try_advisory_xact_lock(k)) FROM unnest($1::bigint[]) AS k"
# The rows the batch may write, locked without waiting: what another session holds is skipped.
_ROW_LOCKS = (
    "WITH t AS (SELECT id FROM transactions WHERE id = ANY($1::text[]) FOR UPDATE SKIP LOCKED),"
    " o AS (SELECT order_id FROM order_transactions WHERE order_id = ANY($2::text[])"
    " FOR UPDATE SKIP LOCKED)"
    " SELECT (SELECT coalesce(array_agg(id), '{}') FROM t),"
    " (SELECT coalesce(array_agg(order_id), '{}') FROM o)"
)
# Every table a batch writes, in the mode a write takes: blocked by any lock that blocks writes.
_WRITE_TABLES = (
    "events, transactions, order_transactions, changes, meta, transaction_results, results_pending"
)
_BUMP = "UPDATE meta SET value = value + $1 WHERE key = 'head_revision' RETURNING value"
_INSERT_CHANGE = (
    f"INSERT INTO changes ({CHANGE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
)
_UPSERT_TRANSACTION = (
    "INSERT INTO transactions (id, revision, status, team_id, user_id, updated_at, knowledge,"
    " view) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO UPDATE SET"
    " revision = excluded.revision, status = excluded.status, team_id = excluded.team_id,"
    " user_id = excluded.user_id, updated_at = excluded.updated_at,"
    " knowledge = excluded.knowledge, view = excluded.view"
)
_UPSERT_ORDER = (
    "INSERT INTO order_transactions (order_id, transaction_id) VALUES ($1, $2)"
    " ON CONFLICT (order_id) DO UPDATE SET transaction_id = excluded.transaction_id"
)
_INSERT_EVENT = (
    f"INSERT INTO events ({EVENT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11,"
    " $12, $13, $14, $15)"
)
_COUNT_DUPLICATES = (
    "UPDATE events SET duplicates = duplicates + $1, last_duplicate_at = $2 WHERE event_id = $3"
)
_UPSERT_HISTORY = (
    f"{_INSERT_EVENT} ON CONFLICT (event_id) DO UPDATE SET duplicates = events.duplicates + 1,"
    " last_duplicate_at = excluded.received_at"
)
# A transaction's history: the events of its orders, and the rows the service recorded for it.
_HISTORY = (
    f"SELECT {HISTORY_COLUMNS}, {{body}} FROM events e"
    " LEFT JOIN changes c ON c.revision = e.revision"
    " WHERE e.seq IN (SELECT seq FROM events WHERE order_id IN"
    " (SELECT order_id FROM order_transactions WHERE transaction_id = $1) AND seq > $2"
    " UNION ALL SELECT seq FROM events WHERE order_id IS NULL AND transaction_id = $1"
    " AND seq > $2) ORDER BY e.seq LIMIT $3"
)
_UPSERT_RESULTS = (
    "INSERT INTO transaction_results (transaction_id, status, digest, body, fetched_at, revision)"
    " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (transaction_id) DO UPDATE SET"
    " status = excluded.status, digest = excluded.digest, body = excluded.body,"
    " fetched_at = excluded.fetched_at, revision = excluded.revision"
)
_UPSERT_PENDING = (
    "INSERT INTO results_pending (transaction_id, requested_revision, requested_at, attempts,"
    " due_at, last_failure) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (transaction_id) DO"
    " UPDATE SET requested_revision = excluded.requested_revision,"
    " requested_at = excluded.requested_at, attempts = excluded.attempts,"
    " due_at = excluded.due_at, last_failure = excluded.last_failure"
)
_PENDING_COLUMNS = (
    "transaction_id, requested_revision, requested_at, attempts, due_at, last_failure"
)
_RESULTS_KEPT = (
    "SELECT transaction_id, digest FROM transaction_results"
    " WHERE body IS NOT NULL AND transaction_id = ANY($1::text[])"
)
_RESULTS_PENDING = (
    f"SELECT {_PENDING_COLUMNS} FROM results_pending WHERE transaction_id = ANY($1::text[])"
)
_HEAD = "(SELECT value FROM meta WHERE key = 'head_revision')"
_COMPACTED = "(SELECT value FROM meta WHERE key = 'compacted_revision')"


def _same_time(value: datetime) -> datetime:
    return value


class PostgresStore:
    """PostgreSQL behind the `Store` interface. Open before use; always close."""

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        lock_timeout: float = LOCK_TIMEOUT_SECONDS,
        statement_timeout: float = STATEMENT_TIMEOUT_SECONDS,
    ) -> None:
        self.url = url
        self.description = redact(url)
        self.health = WriteHealth(self.description)
        self.shared = True
        self._pool_size = pool_size
        self._lock_timeout = lock_timeout
        self._statement_timeout = statement_timeout
        self._pool: asyncpg.Pool | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=1,
                max_size=self._pool_size,
                command_timeout=self._statement_timeout + _CLIENT_GRACE_SECONDS,
                # Each connection's defaults (a pooled connection is reset to them on release).
                server_settings={
                    "lock_timeout": f"{int(self._lock_timeout * 1000)}ms",
                    "statement_timeout": f"{int(self._statement_timeout * 1000)}ms",
                },
            )
        except _CONNECTION_ERRORS as exc:
            raise StoreOpenError(f"cannot connect to {self.description}: {_reason(exc)}") from None
        except asyncpg.PostgresError as exc:
            raise StoreOpenError(f"cannot use {self.description}: {_reason(exc)}") from None
        try:
            await self._migrate()
        except BaseException:
            await self.close()
            raise

    async def _migrate(self) -> None:
        assert self._pool is not None
        known = migrations("postgres")
        async with self._pool.acquire() as conn:
            # A migration may rightly wait for locks and run long; the pool resets these.
            await conn.execute("SET lock_timeout = 0; SET statement_timeout = 0")
            await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
            try:
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY,"
                    " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
                )
                current = await conn.fetchval(
                    "SELECT coalesce(max(version), 0) FROM schema_migrations"
                )
                if current > known[-1][0]:
                    raise StoreOpenError(
                        f"{self.description} has schema version {current}, newer than this "
                        f"service knows ({known[-1][0]}); run a newer transaction-service"
                    )
                if current == 0:
                    foreign = await conn.fetchval(
                        "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()"
                        " AND tablename IN ('events', 'transactions', 'changes')"
                    )
                    if foreign:
                        raise StoreOpenError(
                            f"{self.description} already has tables named like this service's "
                            "but no schema version of it; use another database or schema"
                        )
                for version, name, script in known:
                    if version <= current:
                        continue
                    log.info("applying migration %s to %s", name, self.description)
                    async with conn.transaction():
                        await conn.execute(script)
                        await conn.execute(
                            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                            version,
                            name,
                        )
            except asyncpg.PostgresError as exc:
                raise StoreOpenError(f"cannot set up {self.description}: {_reason(exc)}") from None
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 10)
            except (TimeoutError, *_CONNECTION_ERRORS):
                pool.terminate()

    def _pool_or_fail(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreUnavailable("the store is closed")
        return self._pool

    # -- writes -----------------------------------------------------------------------------------

    async def write(self, keys: BatchKeys, plan: Planner[Answer]) -> tuple[AppliedBatch, Answer]:
        pool = self._pool_or_fail()
        try:
            async with pool.acquire() as conn:
                for attempt in range(_WRITE_ATTEMPTS):
                    try:
                        async with conn.transaction():
                            applied, answer = await self._write_once(conn, keys, plan)
                        break
                    except _MoreKeys as more:
                        keys = dataclasses.replace(
                            keys, transaction_ids=keys.transaction_ids | more.transaction_ids
                        )
                    except (
                        asyncpg.DeadlockDetectedError,
                        asyncpg.SerializationError,
                    ):
                        if attempt == _WRITE_ATTEMPTS - 1:
                            raise
                else:
                    raise StoreUnavailable("the batch could not lock its keys; retry later")
        except (asyncpg.PostgresError, UnicodeEncodeError, *_CONNECTION_ERRORS) as exc:
            if (what := _data_fault(exc)) is not None:
                # Not a fault of the store: health stays as it is.
                raise StoreDataRefused(what) from None
            kind = _fault_kind(exc)
            self.health.failed(kind)
            raise StoreUnavailable(
                f"the event was not stored: the database cannot write ({kind}). Retry later."
            ) from None
        self.health.succeeded()
        return applied, answer

    async def _write_once(
        self, conn: _Connection, keys: BatchKeys, plan: Planner[Answer]
    ) -> tuple[AppliedBatch, Answer]:
        locked = {lock_key(name) for name in lock_names(keys)}
        await conn.fetchval(_LOCK, sorted(locked))
        state = await self._load(conn, keys)
        needed = state.transaction_ids_needed() - keys.transaction_ids
        if needed:
            extra = sorted({lock_key(f"t:{t}") for t in needed} - locked)
            if extra and not await conn.fetchval(_TRY_LOCK, extra):
                # Another writer holds one of them: start again, locking everything in order.
                raise _MoreKeys(needed)
            # Locked now: read them again, as they are under the lock.
            keys = dataclasses.replace(keys, transaction_ids=keys.transaction_ids | needed)
            state = await self._load(conn, keys)
        await self._lock_rows(conn, state)
        batch, answer = plan(state)
        return await self._apply(conn, batch), answer

    async def _lock_rows(self, conn: _Connection, state: BatchState) -> None:
        """Lock the stored rows the batch may write; KeysBusy naming those another session
        holds (the keys' advisory locks keep this service's own writers off them)."""
        transactions, orders = set(state.transactions), set(state.order_index)
        if not transactions and not orders:
            return
        row = await conn.fetchrow(_ROW_LOCKS, list(transactions), list(orders))
        assert row is not None  # two aggregates: always one row
        got_transactions, got_orders = row
        busy_transactions = transactions - set(got_transactions)
        busy_orders = orders - set(got_orders)
        if busy_transactions or busy_orders:
            busy_orders |= {o for o, t in state.order_index.items() if t in busy_transactions}
            raise KeysBusy(frozenset(busy_orders), frozenset(busy_transactions))

    async def _load(self, conn: _Connection, keys: BatchKeys) -> BatchState:
        state = BatchState()
        for event_id, digest, order_id, view, revision in await conn.fetch(
            _EVENTS, list(keys.event_ids)
        ):
            current = snapshot(view, revision) if view is not None else None
            state.events[event_id] = StoredEvent(event_id, digest, order_id, current)
        decoded: dict[str, StoredTransaction] = {}
        for order_id, txn_id, knowledge, view, revision in await conn.fetch(
            _BY_ORDER, list(keys.order_ids)
        ):
            state.order_index[order_id] = txn_id
            if txn_id not in decoded:
                decoded[txn_id] = stored_transaction(knowledge, view, revision)
        wanted = [t for t in keys.transaction_ids if t not in decoded]
        if wanted:
            for txn_id, knowledge, view, revision in await conn.fetch(_BY_ID, wanted):
                decoded[txn_id] = stored_transaction(knowledge, view, revision)
        state.transactions = decoded
        if keys.replay:
            rows = await conn.fetch(_REPLAY, list(keys.replay))
            state.replay_events = replay_events_from_rows(rows)
        if keys.results_of:
            wanted = sorted(keys.results_of)
            for txn_id, digest in await conn.fetch(_RESULTS_KEPT, wanted):
                state.results_kept[txn_id] = digest
            for row in await conn.fetch(_RESULTS_PENDING, wanted):
                state.results_pending[row[0]] = pending_results(*row)
        return state

    async def _apply(self, conn: _Connection, batch: BatchPlan) -> AppliedBatch:
        rows = plan_rows(batch, 0, _same_time)
        for statement, key in (
            (_UPSERT_ORDER, "orders"),
            ("DELETE FROM transactions WHERE id = $1", "deleted"),
        ):
            if rows[key]:
                await conn.executemany(statement, rows[key])
        base = 0
        if batch.changes:
            # The counter last: its row lock is held only for the few statements that need the
            # revisions, and it orders commits.
            head = await conn.fetchval(_BUMP, len(batch.changes))
            base = head - len(batch.changes)
            rows = plan_rows(batch, base, _same_time)
        for statement, key in (
            (_INSERT_CHANGE, "changes"),
            (_UPSERT_TRANSACTION, "transactions"),
            (_INSERT_EVENT, "events"),
            (_COUNT_DUPLICATES, "duplicates"),
            (_UPSERT_HISTORY, "history"),
            (_UPSERT_RESULTS, "results"),
            ("DELETE FROM results_pending WHERE transaction_id = $1", "results_done"),
            (_UPSERT_PENDING, "results_pending"),
        ):
            if rows[key]:
                await conn.executemany(statement, rows[key])
        if batch.changes:
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, str(base + len(batch.changes)))
        records = [c.record(base + i + 1) for i, c in enumerate(batch.changes)]
        return AppliedBatch(batch, base, records)

    async def probe(self) -> None:
        """What every batch needs, without writing: each table in the mode a write takes it
        (any lock from another session that would block writes blocks this) and the revision
        counter's row, within the lock timeout; then roll back."""
        try:
            async with self._pool_or_fail().acquire() as conn, conn.transaction():
                await conn.execute(f"LOCK TABLE {_WRITE_TABLES} IN ROW EXCLUSIVE MODE")
                await conn.execute("SELECT value FROM meta WHERE key = 'head_revision' FOR UPDATE")
                raise _ProbeDone
        except _ProbeDone:
            self.health.succeeded()
        except (asyncpg.PostgresError, *_CONNECTION_ERRORS) as exc:
            self.health.failed(_fault_kind(exc))
        except StoreUnavailable:
            pass

    # -- reads ------------------------------------------------------------------------------------

    async def _fetch(self, sql: str, *params: Any) -> list[Any]:
        # One statement is one snapshot (READ COMMITTED): each read asks for the data and the
        # revisions it reports in a single statement, so they always agree.
        try:
            return list(await self._pool_or_fail().fetch(sql, *params))
        except (asyncpg.PostgresError, *_CONNECTION_ERRORS) as exc:
            raise StoreUnavailable(
                f"the database cannot be read ({_fault_kind(exc)}). Retry later."
            ) from None

    async def get(self, transaction_id: str) -> tuple[TransactionSnapshot | None, int]:
        rows = await self._fetch(
            f"SELECT {_HEAD}, t.view, t.revision FROM (SELECT 1) AS one"
            " LEFT JOIN transactions t ON t.id = $1",
            transaction_id,
        )
        head, view, revision = rows[0]
        return (snapshot(view, revision) if view is not None else None), head

    async def get_by_order(self, order_id: str) -> tuple[TransactionSnapshot | None, int]:
        rows = await self._fetch(
            f"SELECT {_HEAD}, t.view, t.revision FROM (SELECT 1) AS one"
            " LEFT JOIN order_transactions o ON o.order_id = $1"
            " LEFT JOIN transactions t ON t.id = o.transaction_id",
            order_id,
        )
        head, view, revision = rows[0]
        return (snapshot(view, revision) if view is not None else None), head

    async def list_transactions(
        self, where: ListFilter, after_revision: int, limit: int
    ) -> tuple[list[TransactionSnapshot], int]:
        condition, params = list_condition(where, after_revision, _same_time, lambda n: f"${n}")
        params.append(limit)
        rows = await self._fetch(
            f"SELECT {_HEAD}, t.view, t.revision FROM (SELECT 1) AS one LEFT JOIN"
            f" (SELECT view, revision FROM transactions WHERE {condition}"
            f" ORDER BY revision LIMIT ${len(params)}) t ON true ORDER BY t.revision",
            *params,
        )
        head = rows[0][0]
        return [snapshot(view, revision) for _, view, revision in rows if view is not None], head

    async def head_revision(self) -> int:
        return int((await self._fetch(f"SELECT {_HEAD}"))[0][0])

    async def get_many(
        self,
        transaction_ids: Sequence[str],
        order_ids: Sequence[str],
        *,
        chunk_bytes: int | None = None,
        on_chunk: Callable[[Sequence[TransactionSnapshot]], None] | None = None,
    ) -> tuple[dict[str, TransactionSnapshot], dict[str, TransactionSnapshot], int]:
        # One REPEATABLE READ transaction, so one snapshot: first which transaction each id
        # finds, with the size of its stored state (not the state), then the states in chunks.
        try:
            async with (
                self._pool_or_fail().acquire() as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                index: list[Any] = await conn.fetch(
                    f"SELECT {_HEAD}, 't', id, id, octet_length(view) FROM transactions"
                    " WHERE id = ANY($1::text[])"
                    f" UNION ALL SELECT {_HEAD}, 'o', o.order_id, t.id, octet_length(t.view)"
                    " FROM order_transactions o JOIN transactions t ON t.id = o.transaction_id"
                    " WHERE o.order_id = ANY($2::text[])"
                    f" UNION ALL SELECT {_HEAD}, NULL, NULL, NULL, NULL",
                    list(set(transaction_ids)),
                    list(set(order_ids)),
                )
                chunks, head = many_index(index, chunk_bytes)
                snapshots: dict[str, TransactionSnapshot] = {}
                for chunk in chunks:
                    rows = await conn.fetch(
                        "SELECT id, view, revision FROM transactions WHERE id = ANY($1::text[])",
                        chunk,
                    )
                    read = [snapshot(view, revision) for _, view, revision in rows]
                    if on_chunk is not None:
                        on_chunk(read)
                    snapshots.update(zip((row[0] for row in rows), read, strict=True))
                    del rows, read
        except (asyncpg.PostgresError, *_CONNECTION_ERRORS) as exc:
            raise StoreUnavailable(
                f"the database cannot be read ({_fault_kind(exc)}). Retry later."
            ) from None
        return many_found(index, snapshots, head)

    async def transaction_ids(self, after_id: str, limit: int) -> list[str]:
        rows = await self._fetch(
            "SELECT id FROM transactions WHERE id > $1 ORDER BY id LIMIT $2", after_id, limit
        )
        return [row[0] for row in rows]

    async def count_transactions(self) -> int:
        return int((await self._fetch("SELECT count(*) FROM transactions"))[0][0])

    async def replay_events(
        self, transaction_ids: Sequence[str]
    ) -> dict[str, list[StoredEventBody]]:
        return replay_events_from_rows(await self._fetch(_REPLAY, list(transaction_ids)))

    async def changes_after(
        self, after_revision: int, limit: int, transaction_ids: Sequence[str] = ()
    ) -> ChangeLogPage:
        where = "revision > $1"
        params: list[object] = [after_revision]
        if transaction_ids:
            params.append(list(transaction_ids))
            where += f" AND transaction_id = ANY(${len(params)}::text[])"
        params.append(limit)
        rows = await self._fetch(
            f"SELECT {_COMPACTED}, {_HEAD}, c.* FROM (SELECT 1) AS one LEFT JOIN"
            f" (SELECT {CHANGE_COLUMNS} FROM changes WHERE {where} ORDER BY revision"
            f" LIMIT ${len(params)}) c ON true ORDER BY c.revision",
            *params,
        )
        return change_log_page(rows)

    async def changes_through(
        self, revision: int, limit: int, transaction_ids: Sequence[str]
    ) -> ChangeLogPage:
        rows = await self._fetch(
            f"SELECT {_COMPACTED}, {_HEAD}, c.* FROM (SELECT 1) AS one LEFT JOIN"
            f" (SELECT {CHANGE_COLUMNS} FROM changes WHERE revision <= $1"
            " AND transaction_id = ANY($2::text[]) ORDER BY revision DESC LIMIT $3) c"
            " ON true ORDER BY c.revision DESC",
            revision,
            list(transaction_ids),
            limit,
        )
        return change_log_page(rows)

    async def transaction_events(
        self, transaction_id: str, after_seq: int, limit: int, *, bodies: bool
    ) -> Sequence[HistoryEvent]:
        rows = await self._fetch(
            _HISTORY.format(body="e.body" if bodies else "NULL::bytea"),
            transaction_id,
            after_seq,
            limit,
        )
        return [history_event(tuple(row)[:-1], row[-1]) for row in rows]

    # -- housekeeping -----------------------------------------------------------------------------

    async def trim_changes(self, recorded_before: datetime) -> int:
        pool = self._pool_or_fail()
        through = await pool.fetchval(
            "SELECT max(revision) FROM changes WHERE recorded_at < $1", recorded_before
        )
        while through is not None:
            async with pool.acquire() as conn, conn.transaction():
                if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _TRIM_LOCK):
                    break  # another replica is trimming
                status = await conn.execute(
                    "DELETE FROM changes WHERE revision IN (SELECT revision FROM changes"
                    f" WHERE revision <= $1 ORDER BY revision LIMIT {_TRIM_CHUNK})",
                    through,
                )
                await conn.execute(
                    "UPDATE meta SET value = greatest(value, coalesce("
                    f"(SELECT min(revision) - 1 FROM changes), {_HEAD}))"
                    " WHERE key = 'compacted_revision'"
                )
            if int(status.split()[-1]) < _TRIM_CHUNK:
                break
        return int(await pool.fetchval(f"SELECT {_COMPACTED}"))

    async def erase_bodies(self, received_before: datetime) -> int:
        pool = self._pool_or_fail()
        erased = 0
        while True:
            status = await pool.execute(
                "UPDATE events SET body = NULL WHERE seq IN (SELECT seq FROM events"
                f" WHERE body IS NOT NULL AND received_at < $1 LIMIT {_TRIM_CHUNK})",
                received_before,
            )
            count = int(status.split()[-1])
            erased += count
            if count < _TRIM_CHUNK:
                return erased

    # -- combined results and reconciliation ------------------------------------------------------

    async def get_results(
        self, transaction_id: str
    ) -> tuple[StoredResults | None, PendingResults | None]:
        rows = await self._fetch(
            f"SELECT {RESULTS_ROW_COLUMNS}"
            " FROM (SELECT 1) AS one"
            " LEFT JOIN transaction_results r ON r.transaction_id = $1"
            " LEFT JOIN results_pending p ON p.transaction_id = $1",
            transaction_id,
        )
        return results_row(transaction_id, tuple(rows[0]))

    async def results_due(self, now: datetime, limit: int) -> list[PendingResults]:
        rows = await self._fetch(
            f"SELECT {_PENDING_COLUMNS} FROM results_pending WHERE due_at <= $1"
            " ORDER BY due_at LIMIT $2",
            now,
            limit,
        )
        return [pending_results(*row) for row in rows]

    async def erase_results(self, fetched_before: datetime) -> int:
        status = await self._execute(
            "UPDATE transaction_results SET body = NULL WHERE body IS NOT NULL AND fetched_at < $1",
            fetched_before,
        )
        return int(status.split()[-1])

    async def reconcile_candidates(self, silent_before: datetime, limit: int) -> list[str]:
        rows = await self._fetch(
            "SELECT t.id FROM transactions t"
            " LEFT JOIN reconcile_checks c ON c.transaction_id = t.id"
            " WHERE t.status = $1 AND (t.updated_at IS NULL OR t.updated_at < $2)"
            " AND (c.checked_at IS NULL OR c.checked_at < $2)"
            " ORDER BY t.updated_at NULLS FIRST, t.id LIMIT $3",
            TransactionStatus.ACTIVE.value,
            silent_before,
            limit,
        )
        return [row[0] for row in rows]

    async def record_reconcile_checks(
        self, transaction_ids: Sequence[str], checked_at: datetime
    ) -> None:
        if not transaction_ids:
            return
        await self._execute(
            "INSERT INTO reconcile_checks (transaction_id, checked_at)"
            " SELECT t, $2 FROM unnest($1::text[]) AS t"
            " ON CONFLICT (transaction_id) DO UPDATE SET checked_at = excluded.checked_at",
            sorted(set(transaction_ids)),
            checked_at,
        )

    @contextlib.asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[bool]:
        """A session advisory lock on a connection of its own, held until exit: replicas that do
        not get it skip the job. If the connection dies the lock goes with it, and another
        replica takes the job over at its next turn."""
        pool = self._pool_or_fail()
        key = lock_key(f"job:{name}")
        try:
            conn = await pool.acquire()
        except (asyncpg.PostgresError, *_CONNECTION_ERRORS) as exc:
            raise StoreUnavailable(
                f"the database cannot be reached ({_fault_kind(exc)}). Retry later."
            ) from None
        try:
            try:
                got = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", key))
            except (asyncpg.PostgresError, *_CONNECTION_ERRORS) as exc:
                raise StoreUnavailable(
                    f"the database cannot be reached ({_fault_kind(exc)}). Retry later."
                ) from None
            try:
                yield got
            finally:
                if got:
                    with contextlib.suppress(asyncpg.PostgresError, *_CONNECTION_ERRORS):
                        await conn.execute("SELECT pg_advisory_unlock($1)", key)
        finally:
            await pool.release(conn)

    async def _execute(self, sql: str, *params: Any) -> str:
        try:
            return await self._pool_or_fail().execute(sql, *params)
        except (asyncpg.PostgresError, *_CONNECTION_ERRORS) as exc:
            kind = _fault_kind(exc)
            self.health.failed(kind)
            raise StoreUnavailable(f"the database cannot write ({kind}). Retry later.") from None

    async def change_notifications(self) -> AsyncGenerator[None]:
        """Yields after every (re)connect of a LISTEN connection and on every notification.
        A lost connection is logged once, and once more when it is back."""
        failures = 0
        lost = False
        while True:
            try:
                conn = await asyncpg.connect(self.url)
            except (asyncpg.PostgresError, *_CONNECTION_ERRORS):
                await asyncio.sleep(_RECONNECT_SECONDS[min(failures, len(_RECONNECT_SECONDS) - 1)])
                failures += 1
                continue
            if lost:
                log.warning(
                    "change notifications from %s again, after %d failed attempt%s to reconnect",
                    self.description,
                    failures,
                    "" if failures == 1 else "s",
                )
            failures = 0
            lost = True
            try:
                async for _ in _notifications(conn):
                    yield
            except (asyncpg.PostgresError, *_CONNECTION_ERRORS):
                pass
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 5)
            log.warning(
                "lost the change notification connection to %s; reconnecting", self.description
            )


async def _notifications(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """Once on start (anything may have been missed before), then once per notification, until
    the connection is lost."""
    woken = asyncio.Event()
    lost = asyncio.Event()

    def on_lost(_: object) -> None:
        lost.set()
        woken.set()

    await conn.add_listener(CHANNEL, lambda *_: woken.set())
    conn.add_termination_listener(on_lost)
    yield
    while not lost.is_set():
        await woken.wait()
        woken.clear()
        if not lost.is_set():
            yield


def _reason(exc: BaseException) -> str:
    """A short reason for an open failure: PostgreSQL's own message, or the OS error."""
    if isinstance(exc, asyncpg.PostgresError):
        return str(exc).splitlines()[0][:200]
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, TimeoutError):
        return "timed out"
    return "connection failed"
