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
    def sqlite_synchronous(self) -> str: ...


def open_store(settings: StoreSettings) -> Store:
    """The store `--db` names: a PostgreSQL URL, or a SQLite file path or URL. Not opened yet.

    Raises StoreOpenError for a URL of neither kind."""
    # Imported here: a module that needs only the contract does not load either driver.
    if settings.db.startswith(("postgresql://", "postgres://")):
        from transaction_service.store.postgres import PostgresStore

        return PostgresStore(settings.db, pool_size=settings.db_pool_size)
    from transaction_service.store.sqlite import SqliteStore

    try:
        return SqliteStore(settings.db, synchronous=settings.sqlite_synchronous)
    except ValueError as exc:
        raise StoreOpenError(str(exc)) from None
