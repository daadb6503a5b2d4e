"""PostgreSQL for the tests: a fresh schema per test on the server the setting names.

`TRANSACTION_SERVICE_TEST_POSTGRES_URL` points at a database the tests may create schemas in
(default: the local server CI machines run). Under pytest-xdist (`make test`) each worker makes
its schemas in a database of its own beside that one, named after it and the worker (`test_gw0`),
which the setting's user must be allowed to create. Without a reachable server the PostgreSQL
tests are skipped, and the run's summary says so loudly (see conftest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
import uuid
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import urlencode, urlsplit, urlunsplit

import asyncpg
import pytest

SETTING = "TRANSACTION_SERVICE_TEST_POSTGRES_URL"
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
T = TypeVar("T")


def server_url() -> str:
    return os.environ.get(SETTING, DEFAULT_URL)


def base_url() -> str:
    """The database the tests' schemas are made in: the setting's; under pytest-xdist, one of
    each worker's own beside it (made on first use, kept for later runs), because advisory locks
    (the jobs' leader locks) and NOTIFY reach every schema of a database."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker:
        return server_url()
    return worker_database(worker)


@functools.cache
def worker_database(worker: str) -> str:
    parts = urlsplit(server_url())
    name = f"{parts.path.lstrip('/') or 'postgres'}_{worker}"

    async def create() -> None:
        conn = await asyncpg.connect(server_url(), timeout=10)
        try:
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
                with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                    await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    run_sync(create())
    return urlunsplit(parts._replace(path=f"/{name}"))


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, even inside a running event loop."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coroutine))
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


@functools.cache
def unavailable_reason() -> str | None:
    """None if the server answers; else why not."""

    async def probe() -> None:
        conn = await asyncpg.connect(server_url(), timeout=3)
        await conn.close()

    try:
        run_sync(probe())
        base_url()
    except Exception as exc:
        return f"no PostgreSQL at {server_url()} ({type(exc).__name__}: {exc})"
    return None


def require_postgres() -> None:
    if (reason := unavailable_reason()) is not None:
        pytest.skip(f"PostgreSQL suite skipped: {reason}; set {SETTING} to a server's URL")


def with_schema(url: str, schema: str) -> str:
    parts = urlsplit(url)
    query = "&".join(q for q in (parts.query, urlencode({"search_path": schema})) if q)
    return urlunsplit(parts._replace(query=query))


async def _execute(sql: str) -> None:
    conn = await asyncpg.connect(base_url())
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextmanager
def fresh_database() -> Iterator[str]:
    """A URL whose tables live in a new, empty schema; the schema is dropped afterwards."""
    require_postgres()
    schema = f"ts_{uuid.uuid4().hex[:16]}"
    run_sync(_execute(f"CREATE SCHEMA {schema}"))
    try:
        yield with_schema(base_url(), schema)
    finally:
        run_sync(_execute(f"DROP SCHEMA {schema} CASCADE"))


def table_counts(url: str, tables: tuple[str, ...]) -> dict[str, int]:
    async def count() -> dict[str, int]:
        conn = await asyncpg.connect(url)
        try:
            return {t: await conn.fetchval(f"SELECT count(*) FROM {t}") for t in tables}
        finally:
            await conn.close()

    return run_sync(count())


def table_rows(url: str, sql: str) -> list[dict[str, Any]]:
    async def fetch() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(url)
        try:
            return [dict(row) for row in await conn.fetch(sql)]
        finally:
            await conn.close()

    return run_sync(fetch())
