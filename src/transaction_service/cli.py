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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
