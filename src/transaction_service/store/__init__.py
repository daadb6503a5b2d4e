"""Where the service keeps its state: the contract (`base.py`), its SQLite, PostgreSQL and
in-memory implementations, and `open_store`, which picks one from the `--db` setting."""

from __future__ import annotations

from typing import Protocol

from transaction_service.store.base import Store, StoreOpenError


class StoreSettings(Protocol):
    """What `open_store` reads of the settings (`config.Settings` has it)."""

    @property
    def db(self) -> str: ...
    @property
    def db_pool_size(self) -> int: ...
    @property
    def db_lock_timeout_seconds(self) -> float: ...
    @property
    def db_statement_timeout_seconds(self) -> float: ...
    @property
    def sqlite_synchronous(self) -> str: ...
    @property
    def store_stall_seconds(self) -> float: ...
    @property
    def store_recovery_seconds(self) -> float: ...


def open_store(settings: StoreSettings) -> Store:
    """The store `--db` names: a PostgreSQL URL, or a SQLite file path or URL. Not opened yet.

    Raises StoreOpenError for a URL of neither kind."""
    # Imported here: a module that needs only the contract does not load either driver.
    store: Store
    if settings.db.startswith(("postgresql://", "postgres://")):
        from transaction_service.store.postgres import PostgresStore

        store = PostgresStore(
            settings.db,
            pool_size=settings.db_pool_size,
            lock_timeout=settings.db_lock_timeout_seconds,
            statement_timeout=settings.db_statement_timeout_seconds,
        )
    else:
        from transaction_service.store.sqlite import SqliteStore

        try:
            store = SqliteStore(
                settings.db,
                synchronous=settings.sqlite_synchronous,
                lock_timeout=settings.db_lock_timeout_seconds,
            )
        except ValueError as exc:
            raise StoreOpenError(str(exc)) from None
    store.health.configure(
        stall_seconds=settings.store_stall_seconds,
        recovery_seconds=settings.store_recovery_seconds,
    )
    return store
