"""`transaction-service reconcile` and `transaction-service backfill`: ask a running server to
reconcile with Junction's API (the server holds the API key and its rate limits), as `watch` asks
it for changes.

`reconcile` prints the ReconcileTransaction response as JSON. `backfill` shows a progress bar
(tqdm, on stderr, only on a terminal) while the server works through the window, then prints a
summary of outcomes on stdout. Exit codes: 0 done (every transaction reconciled), 1 the call
failed or some transaction could not be reconciled, 2 a usage mistake.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import UTC, date, datetime, time, timedelta

from google.protobuf import json_format

from transaction_client import ClientSetupError, TransactionServiceError
from transaction_client.sync import TransactionClient
from transaction_service.cli.connection import sync_client_for
from transactions.v1 import transactions_pb2 as pb

_RELATIVE = re.compile(r"(\d+)([mhdw])")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
# How many failed transactions the summary lists one by one.
_FAILURES_LISTED = 20


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 date or time (UTC unless it says otherwise), or a time ago: 30m, 36h, 7d, 2w.

    Raises argparse.ArgumentTypeError with a message for the user."""
    now = now or datetime.now(UTC)
    text = text.strip()
    if match := _RELATIVE.fullmatch(text):
        return now - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    try:
        if len(text) == 10:
            return datetime.combine(date.fromisoformat(text), time.min, tzinfo=UTC)
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: give an ISO 8601 date or time (2026-03-01, "
            "2026-03-01T08:00:00Z) or a time ago (30m, 36h, 7d, 2w)"
        ) from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed


def add_reconcile_flags(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--transaction-id", help="reconcile this transaction")
    target.add_argument("--order-id", help="reconcile the transaction of this order")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for the answer (default 120)"
    )


def add_backfill_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--since",
        required=True,
        type=parse_time,
        metavar="TIME",
        help="orders updated at or after this time: ISO 8601 (2026-03-01, "
        "2026-03-01T08:00:00Z; UTC unless it says) or a time ago (36h, 7d)",
    )
    parser.add_argument(
        "--until",
        type=parse_time,
        metavar="TIME",
        help="orders updated at or before this time (default: now)",
    )
    parser.add_argument(
        "--resend",
        action="store_true",
        help="ask Junction to re-send the orders' latest webhooks instead (window of at most "
        "60 days); they then arrive at the webhook endpoint",
    )


def _client(args: argparse.Namespace, command: str) -> TransactionClient | None:
    try:
        return sync_client_for(args)
    except ClientSetupError as exc:
        print(f"transaction-service {command}: {exc}", file=sys.stderr)
        return None


def run_reconcile(args: argparse.Namespace) -> int:
    client = _client(args, "reconcile")
    if client is None:
        return 2
    with client:
        try:
            response = client.reconcile_transaction(
                transaction_id=args.transaction_id or None,
                order_id=args.order_id or None,
                timeout=args.timeout,
            )
        except TransactionServiceError as error:
            print(f"transaction-service reconcile: {error}", file=sys.stderr)
            return 1
    answer = json_format.MessageToDict(response, preserving_proto_field_name=True)
    print(json.dumps(answer, indent=2))
    return 0


def run_backfill(args: argparse.Namespace) -> int:
    if args.until is not None and args.until < args.since:
        print("transaction-service backfill: --until is before --since", file=sys.stderr)
        return 2
    client = _client(args, "backfill")
    if client is None:
        return 2
    window = f"{_iso(args.since)} .. {_iso(args.until) if args.until else 'now'}"
    last = pb.BackfillTransactionsResponse()
    failures: list[tuple[str, str]] = []
    # Only backfill draws a bar: `reconcile` does not import tqdm (~45 ms, its version lookup).
    from tqdm import tqdm

    # disable=None: a bar on a terminal, nothing when stderr is a file or a pipe.
    bar = tqdm(desc="orders", unit="order", disable=None, file=sys.stderr, dynamic_ncols=True)
    with client, bar:
        try:
            for message in client.backfill_transactions(
                since=args.since, until=args.until, resend=args.resend
            ):
                last = message
                if message.outcome == pb.RECONCILE_OUTCOME_FAILED:
                    failures.append((message.transaction_id, message.error))
                if message.orders_total and bar.total != message.orders_total:
                    bar.total = message.orders_total
                bar.update(message.orders_read - bar.n)
                bar.set_postfix(
                    changed=message.transactions_changed,
                    unchanged=message.transactions_unchanged,
                    failed=message.transactions_failed,
                    refresh=False,
                )
        except TransactionServiceError as error:
            bar.close()
            print(f"transaction-service backfill: {error}", file=sys.stderr)
            _print_summary(window, last, failures, complete=False)
            return 1
    if args.resend:
        print(
            f"back-fill {window}: Junction will re-send the latest webhook of "
            f"{last.orders_resent} order(s)"
        )
        return 0
    _print_summary(window, last, failures, complete=last.done)
    return 0 if last.done and not failures else 1


def _print_summary(
    window: str,
    last: pb.BackfillTransactionsResponse,
    failures: list[tuple[str, str]],
    *,
    complete: bool,
) -> None:
    done = last.transactions_changed + last.transactions_unchanged + last.transactions_failed
    state = "" if complete else " (incomplete)"
    print(
        f"back-fill {window}{state}: {last.orders_read} order(s), {done} transaction(s): "
        f"{last.transactions_changed} changed, {last.transactions_unchanged} unchanged, "
        f"{last.transactions_failed} failed"
    )
    for transaction_id, error in failures[:_FAILURES_LISTED]:
        print(f"  failed {transaction_id}: {error}")
    if len(failures) > _FAILURES_LISTED:
        print(f"  ... and {len(failures) - _FAILURES_LISTED} more")


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
