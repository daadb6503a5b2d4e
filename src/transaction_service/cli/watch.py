"""`transaction-service watch`: print changes as JSON lines, on the client's self-resuming watch.

One JSON object per line, as the stream's messages look in proto3 JSON: `{"change": ...}` per
change (a batch is printed as one line per change), `{"progress": {"revision": ...}}`,
`{"current": {"transaction": ..., "progress_revision": ...}}` for the state a single-transaction
watch opens with, and `{"resync": {...}}` for each state re-read after the history the watch
needed was compacted. Interruptions and resumptions are told on stderr, one line each.

With `--no-reconnect` it runs one stream and exits when it ends (1 if it ended with an error).
The first connection is not retried either way: a wrong address, a TLS mistake or a missing
token is told at once, with a hint, exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import Any

import grpc
from google.protobuf import json_format

from transaction_client import ClientSetupError, Progress, Snapshot, TransactionServiceError
from transaction_client.watch import WatchRequest
from transaction_service.cli.connection import client_for
from transactions.v1 import transactions_pb2 as pb

PROG = "transaction-service watch"


def _dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def line_of(item: object) -> dict[str, Any]:
    """The JSON object printed for one watch item."""
    if isinstance(item, Progress):
        return {"progress": _dict(pb.WatchProgress(revision=item.revision))}
    if isinstance(item, Snapshot):
        state = _dict(
            pb.TransactionSnapshot(transaction=item.transaction, progress_revision=item.revision)
        )
        return {"resync" if item.resync else "current": state}
    return {"change": _dict(item)}


def _request(args: argparse.Namespace) -> WatchRequest:
    if args.transaction_id or args.order_id:
        name = "transaction_id" if args.transaction_id else "order_id"
        return WatchRequest(lookup=(name, args.transaction_id or args.order_id))
    return WatchRequest(
        kinds=tuple(_kind(k) for k in args.kind),
        team_id=args.team_id or "",
    )


_KIND_PREFIX = "CHANGE_KIND_"


def _kind(name: str) -> pb.ChangeKind.ValueType:
    """The ChangeKind a `--kind` names (REDRAW_AVAILABLE, or with its CHANGE_KIND_ prefix, in any
    case); ValueError listing the kinds otherwise."""
    kinds = {key: value for key, value in pb.ChangeKind.items() if value}  # not UNSPECIFIED
    full = _KIND_PREFIX + name.upper().removeprefix(_KIND_PREFIX)
    if full in kinds:
        return kinds[full]
    known = [key.removeprefix(_KIND_PREFIX) for key in kinds]
    raise ValueError(f"--kind {name!r} is not a change kind; one of: {', '.join(known)}")


class _Notices(logging.Handler):
    """The client's notices (interrupted, resumed, resync) as lines of this command."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"{PROG}: {record.getMessage()}", file=sys.stderr, flush=True)


def run_watch(args: argparse.Namespace) -> int:
    try:
        for kind in args.kind:
            _kind(kind)
    except ValueError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    notices = logging.getLogger("transaction_client")
    notices.addHandler(_Notices())
    notices.setLevel(logging.INFO)
    notices.propagate = False
    try:
        return asyncio.run(_watch(args))
    except ClientSetupError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except TransactionServiceError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _print(item: object) -> None:
    print(json.dumps(line_of(item)), flush=True)


async def _watch(args: argparse.Namespace) -> int:
    async with client_for(args) as client:
        request = _request(args)
        if args.no_reconnect:
            call = request.open(client, args.from_revision)
            try:
                async for message in call:
                    event = message.WhichOneof("event")
                    if event == "changes":
                        for change in message.changes.changes:
                            _print(change)
                    else:
                        print(json.dumps(_dict(message)), flush=True)
            except grpc.aio.AioRpcError as exc:
                raise client.error(exc) from None
            return 0
        watch = client.open_watch(
            request,
            start_revision=args.from_revision,
            checkpoint=None,
            on_compacted="resync",
            progress=True,
            buffer_size=1000,
            connect_timeout=0,
            silence_timeout=None,
        )
        async for item in watch:
            _print(item)
    return 0
