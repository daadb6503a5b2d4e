"""`transaction-service serve`: the command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from transaction_service.config import Settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transaction-service",
        description="Junction lab-order webhooks in, order transaction state out.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the gRPC server",
        description="Run the gRPC server. "
        "Every flag can also be set as TRANSACTION_SERVICE_<NAME>.",
    )
    serve.add_argument("--grpc-host", help="address to listen on (default [::], all interfaces)")
    serve.add_argument(
        "--grpc-port", type=int, help="port to listen on (default 50051; 0 picks one)"
    )
    serve.add_argument("--db", help="SQLite database file (default var/transactions.db)")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (default INFO)")

    watch = commands.add_parser(
        "watch",
        help="print transaction changes as JSON lines",
        description="Stream changes from a running server, one JSON object per line: of one "
        "transaction (--transaction-id or --order-id), or of all of them. Reconnects by itself "
        "and resumes from the last revision it printed, so nothing is missed or repeated.",
    )
    watch.add_argument(
        "--address", default="localhost:50051", help="server address (default localhost:50051)"
    )
    target = watch.add_mutually_exclusive_group()
    target.add_argument("--transaction-id", help="watch this transaction only")
    target.add_argument("--order-id", help="watch the transaction of this order only")
    watch.add_argument(
        "--from-revision",
        type=int,
        help="replay changes after this revision first (0: all that are kept); default: from now",
    )
    watch.add_argument(
        "--kind",
        action="append",
        default=[],
        metavar="KIND",
        help="only changes of this kind, e.g. REDRAW_AVAILABLE (repeatable; whole feed only)",
    )
    watch.add_argument("--team-id", help="only this team's transactions (whole feed only)")
    watch.add_argument(
        "--no-reconnect", action="store_true", help="exit when the stream ends instead of resuming"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "watch":
        from transaction_service.watch_client import run_watch

        return run_watch(args)
    overrides = {
        key: value for key, value in vars(args).items() if key != "command" and value is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"transaction-service: bad setting:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from transaction_service.server import serve

    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
