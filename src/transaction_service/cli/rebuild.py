"""`transaction-service rebuild`: re-derive every transaction from its stored events.

Opens the store itself (`--db`, or the TRANSACTION_SERVICE_DB the service uses) and runs
`rebuild.rebuild` with a progress bar (tqdm, on stderr when it is a terminal), then prints how
many transactions changed and how many could not be fully re-derived. Online on PostgreSQL (the
replicas keep serving; see rebuild.py); on SQLite the service must be stopped first, since one
process owns the file, and this says so if it is not.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from pydantic import ValidationError
from tqdm import tqdm

from transaction_service.app import StartupError
from transaction_service.config import Settings, describe_errors
from transaction_service.domain.limits import StateLimits
from transaction_service.store import open_store
from transaction_service.store.base import StoreInUse, StoreOpenError, StoreUnavailable
from transaction_service.usecases.commit import CommitPath
from transaction_service.usecases.plan import RebuildOutcome
from transaction_service.usecases.rebuild import DEFAULT_BATCH_SIZE, RebuildReport, rebuild


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        help="the store, as for serve (default: $TRANSACTION_SERVICE_DB, else var/transactions.db)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"transactions re-derived per commit (default {DEFAULT_BATCH_SIZE})",
    )


def summary(report: RebuildReport) -> list[str]:
    changed = report.count(RebuildOutcome.CHANGED)
    revisions = f" (revisions {report.first_revision} to {report.last_revision})" if changed else ""
    lines = [
        f"rebuilt {report.examined} transactions: {changed} changed{revisions}, "
        f"{report.count(RebuildOutcome.KNOWLEDGE_ONLY)} changed only in what is kept behind "
        f"the state, {report.count(RebuildOutcome.UNCHANGED)} unchanged"
    ]
    if incomplete := report.count(RebuildOutcome.INCOMPLETE):
        lines.append(
            f"{incomplete} could not be fully re-derived (webhook bodies erased by the body "
            "retention, or bodies the current rules cannot read) and keep their current state"
        )
    if gone := report.count(RebuildOutcome.GONE):
        lines.append(f"{gone} were merged into other transactions while the rebuild ran")
    return lines


async def _run(settings: Settings, batch_size: int) -> RebuildReport:
    try:
        store = open_store(settings)
        await store.open()
    except StoreInUse as exc:
        raise StartupError(f"{exc} (on SQLite, rebuild runs with the service stopped)") from None
    except StoreOpenError as exc:
        raise StartupError(str(exc)) from None
    try:
        total = await store.count_transactions()
        with tqdm(total=total, unit="transaction", file=sys.stderr, disable=None) as bar:
            # No watchers in this process: on PostgreSQL each replica's change feed tails the
            # changes from the log; on SQLite watchers resume from the log after the restart.
            return await rebuild(
                store,
                CommitPath(store),
                limits=StateLimits(
                    max_string_length=settings.max_string_length,
                    max_orders_per_transaction=settings.max_orders_per_transaction,
                    max_view_bytes=settings.max_view_bytes,
                ),
                batch_size=batch_size,
                on_progress=bar.update,
            )
    finally:
        await store.close()


def run_rebuild(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        print("transaction-service rebuild: --batch-size must be at least 1", file=sys.stderr)
        return 2
    try:
        settings = Settings(**({"db": args.db} if args.db else {}))
    except ValidationError as exc:
        for line in describe_errors(exc):
            print(f"transaction-service rebuild: bad setting {line}", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(_run(settings, args.batch_size))
    except StartupError as exc:
        print(f"transaction-service rebuild: {exc}", file=sys.stderr)
        return 2
    except StoreUnavailable as exc:
        print(f"transaction-service rebuild: stopped: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Every batch committed so far is whole; running it again continues correctly.
        return 130
    for line in summary(report):
        print(line)
    return 0
