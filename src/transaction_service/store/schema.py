"""The schema of each SQL dialect: its migrations, numbered files under `migrations/<dialect>/`.

Each store applies its own dialect's in order and records the version it reached (SQLite in
`PRAGMA user_version`, PostgreSQL in a `schema_migrations` table).
"""

from __future__ import annotations

from importlib import resources


def migrations(dialect: str) -> list[tuple[int, str, str]]:
    """(version, file name, script) of each migration of a dialect, in order."""
    folder = resources.files("transaction_service.store") / "migrations" / dialect
    found = []
    for item in folder.iterdir():
        if item.name.endswith(".sql"):
            found.append((int(item.name.split("_", 1)[0]), item.name, item.read_text()))
    return sorted(found)
