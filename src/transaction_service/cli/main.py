"""The command line: `transaction-service serve`, and the clients of a running server (`watch`,
`history`, `health`, `reconcile`, `backfill`)."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from transaction_service.cli.connection import add_connection_flags, quiet_grpc

if TYPE_CHECKING:
    import asyncio

    from transaction_service.logs import NativeStderr

log = logging.getLogger("transaction_service")

# The cyclic garbage collector's thresholds (CPython's default: 700, 10, 10); see
# `tune_garbage_collector`.
GC_THRESHOLDS = (50_000, 20, 10)


# The commands that call a running server. The others (serve, rebuild) take their flags from the
# server's settings and modules.
CLIENT_COMMANDS = ("watch", "ingest", "history", "health", "reconcile", "backfill")


def command_of(argv: Sequence[str]) -> str | None:
    """The command word of a command line (the first argument that is not an option)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, for a command line whose command is `command` (None: all of them).

    Each command's own flags are added only when it is the one parsed (or for the usage, when
    no known command is): the serve flags come from the settings (pydantic) and rebuild's from
    the store, which `transaction-service health`, run by a container's HEALTHCHECK on a machine
    that may be busy, must not pay to import."""

    def wanted(name: str) -> bool:
        return command not in (*CLIENT_COMMANDS, "serve", "rebuild") or name == command

    parser = argparse.ArgumentParser(
        prog="transaction-service",
        description="Junction lab-order webhooks in, order transaction state out.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the service",
        description="Run the service: gRPC, and HTTP for webhooks, metrics and probes; on the "
        "embedded SQLite store by default.",
    )
    if wanted("serve"):
        from transaction_service.config import add_flags

        add_flags(serve)

    watch = commands.add_parser(
        "watch",
        help="print transaction changes as JSON lines",
        description="Stream changes from a running server, one JSON object per line: of one "
        "transaction (--transaction-id or --order-id), or of all of them. Reconnects by itself "
        "and resumes from the last revision it printed, so nothing is missed or repeated.",
    )
    add_connection_flags(watch, token=True)
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

    ingest = commands.add_parser(
        "ingest",
        help="send stored deliveries to a running server in bulk (IngestEvents)",
        description="Feed deliveries from files through one IngestEvents stream, with a "
        "progress bar, then print a summary of outcomes and refusals. Files: JSON lines "
        '({"event_id", "body"} or raw webhook bodies), fixture files ({"deliveries": '
        '[{"svix_id", "body"}]}), or one webhook body per file. Exits 1 if any delivery was '
        "refused.",
    )
    add_connection_flags(ingest, token=True)
    if wanted("ingest"):
        from transaction_service.cli.ingest import add_arguments as add_ingest_arguments

        add_ingest_arguments(ingest)

    rebuild = commands.add_parser(
        "rebuild",
        help="re-derive every transaction from its stored events (after a merge-rule change)",
        description="Replay each transaction's stored webhooks with this version's merge rule "
        "and write the differences as ordinary changes (new revisions that watchers see). "
        "Online on PostgreSQL: run it while the replicas serve. On SQLite stop the service "
        "first (one process owns the file). Transactions with webhook bodies erased by the "
        "body retention keep their state and are counted.",
    )
    if wanted("rebuild"):
        from transaction_service.cli.rebuild import add_arguments as add_rebuild_arguments

        add_rebuild_arguments(rebuild)

    health = commands.add_parser(
        "health",
        help="exit 0 if a server's gRPC health check says SERVING",
        description="Ask a running server's gRPC health service (for container probes). Exits "
        "0 on SERVING; otherwise prints one line saying why and exits 1.",
    )
    add_connection_flags(health, token=False)
    health.add_argument(
        "--service",
        default="",
        help="service to ask about (default: the whole server; e.g. "
        "transactions.v1.TransactionService)",
    )
    health.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for the answer (default 5)"
    )

    history = commands.add_parser(
        "history",
        help="why is a transaction in its state: every delivery, its outcome and the reason",
        description="Print a transaction's delivery history (ListTransactionEvents) from a "
        "running server, oldest first: when each delivery arrived and from where, the status "
        "it claimed, what it did (applied, stale, ignored) and why, the revision it made and "
        "what changed, and how often it was delivered again. ID may be the transaction's or "
        "any of its orders'.",
    )
    add_connection_flags(history, token=True)
    if wanted("history"):
        from transaction_service.cli.history import add_arguments as add_history_arguments

        add_history_arguments(history)

    reconcile = commands.add_parser(
        "reconcile",
        help="reconcile one transaction with Junction's API",
        description="Ask a running server to read one transaction and its orders from "
        "Junction's API and take in what they say (events with source api, merged like "
        "webhooks). Prints the response as JSON: the state afterwards and what each answer did. "
        "The server needs TRANSACTION_SERVICE_JUNCTION_API_KEY.",
    )
    add_connection_flags(reconcile, token=True)
    if wanted("reconcile"):
        from transaction_service.cli.reconcile import add_reconcile_flags

        add_reconcile_flags(reconcile)

    backfill = commands.add_parser(
        "backfill",
        help="reconcile every transaction Junction updated in a time window",
        description="After an outage: ask a running server to page through the orders Junction "
        "updated in the window and reconcile each of their transactions, with a progress bar, "
        "then print a summary of outcomes. With --resend, ask Junction to re-send their latest "
        "webhooks instead. The server needs TRANSACTION_SERVICE_JUNCTION_API_KEY.",
    )
    add_connection_flags(backfill, token=True)
    if wanted("backfill"):
        from transaction_service.cli.reconcile import add_backfill_flags

        add_backfill_flags(backfill)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Before the imports: a command imports hundreds of modules (serve: over 600), and at
    # CPython's default thresholds the collector ran ~160 times over them, ~45 ms of a server's
    # start (`tune_garbage_collector` says why a running server keeps these thresholds).
    gc.set_threshold(*GC_THRESHOLDS)
    argv = sys.argv[1:] if argv is None else list(argv)
    command = command_of(argv)
    if command in CLIENT_COMMANDS:
        quiet_grpc()  # before anything imports grpc, building the parser included
    args = build_parser(command).parse_args(argv)
    if args.command == "watch":
        from transaction_service.cli.watch import run_watch

        return run_watch(args)
    if args.command == "ingest":
        from transaction_service.cli.ingest import run_ingest

        return run_ingest(args)
    if args.command == "rebuild":
        from transaction_service.cli.rebuild import run_rebuild

        configure_logging("WARNING")
        return run_rebuild(args)
    if args.command == "history":
        from transaction_service.cli.history import run_history

        return run_history(args)
    if args.command == "health":
        from transaction_service.cli.health import run_health

        return run_health(args)
    if args.command in ("reconcile", "backfill"):
        from transaction_service.cli.reconcile import run_backfill, run_reconcile

        return run_reconcile(args) if args.command == "reconcile" else run_backfill(args)
    return serve_command(args)


def serve_command(args: argparse.Namespace) -> int:
    import difflib

    from pydantic import ValidationError

    from transaction_service.app import StartupError
    from transaction_service.config import (
        Settings,
        describe_errors,
        env_name,
        from_flags,
        unknown_environment,
    )

    try:
        settings = from_flags(args)
    except ValidationError as exc:
        # Logs asked for as JSON (the format itself valid) get the error as a JSON line too: a
        # collector that parses every line would otherwise drop the one that says why.
        requested = getattr(args, "log_format", None) or os.environ.get(env_name("log_format"))
        if (requested or "").strip().lower() == "json":
            from transaction_service.logs import formatter

            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(formatter("json"))
            logging.basicConfig(level="INFO", handlers=[handler], force=True)
            for line in describe_errors(exc):
                log.error("transaction-service: error: bad setting %s", line)
            return 2
        for line in describe_errors(exc):
            _startup_error(f"bad setting {line}")
        return 2
    native = configure_logging(settings.log_level, settings.log_format, native_stderr=True)
    for name in unknown_environment():
        known = [env_name(field) for field in Settings.model_fields]
        hint = difflib.get_close_matches(name, known, n=1)
        log.warning(
            "environment variable %s is not a setting and is ignored%s",
            name,
            f" (did you mean {hint[0]}?)" if hint else "",
        )
    import asyncio

    from transaction_service import tracing
    from transaction_service.metrics import version

    try:
        tracing.configure(version=version())
    except tracing.TracingConfigError as exc:
        _startup_error(str(exc), native, as_json=settings.log_format == "json")
        return 2
    from transaction_service.server import serve

    tune_garbage_collector()
    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            runner.run(serve(settings))
    except StartupError as exc:
        _startup_error(str(exc), native, as_json=settings.log_format == "json")
        return 2
    finally:
        tracing.shutdown()
        if native is not None:
            native.stop()
    return 0


def tune_garbage_collector() -> None:
    """Collect cyclic garbage less often. A server allocates many short-lived objects per call
    (all freed by reference counting), and at CPython's default a young collection runs every
    700 allocations and an old one, over every live object (thousands of watches, cached
    responses), every hundred of those: measured, sequential IngestEvent p50 went from 3.0 to
    2.0 ms, and with 2,000 watchers p99 from about 100 to 75 ms. Objects alive after the
    imports are frozen out of collection altogether. The thresholds themselves (GC_THRESHOLDS)
    are set by `main`, before the imports, for every command; the server keeps them."""
    gc.freeze()


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed (Linux and macOS): the same asyncio API, with less CPU per
    callback, which is most of what a busy gRPC server does. None: asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _startup_error(
    message: str, native: NativeStderr | None = None, *, as_json: bool = True
) -> None:
    """One line on stderr: text, or a JSON log line when logs are JSON (`as_json`, with the
    capture `native` set)."""
    if native is not None:
        native.stop()  # the line goes out after everything logged before it
        if as_json:
            log.error("transaction-service: error: %s", message)
            return
    print(f"transaction-service: error: {message}", file=sys.stderr)


def configure_logging(
    level: str, log_format: str = "text", *, native_stderr: bool = False
) -> NativeStderr | None:
    """Every log record to stderr, as text lines or JSON lines (`logs.py`). In JSON mode, or
    with `native_stderr` (the server), what grpc-core and other native code write to stderr is
    logged too (`logs.NativeStderr`), so that every line is in the configured format (and
    failed TLS handshakes are logged once per episode); the capture is returned, to stop at
    exit."""
    from transaction_service.logs import LibraryNoise, NativeStderr, formatter

    native = NativeStderr() if log_format == "json" or native_stderr else None
    # No line shows the thread, process or calling function: skip finding them for every record
    # (the logging HOWTO's optimisations; a gRPC call writes two lines).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    handler = logging.StreamHandler(native.start() if native is not None else sys.stderr)
    handler.setFormatter(formatter(log_format))
    handler.addFilter(LibraryNoise())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    return native


if __name__ == "__main__":
    sys.exit(main())
