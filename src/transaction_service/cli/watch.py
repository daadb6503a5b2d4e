"""`transaction-service watch`: a small client that prints changes as JSON lines.

It is also the reference for resuming a watch: remember the revision of the last message
(change, progress or current state) and, when the stream breaks, call again with
`start_revision` set to it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator

import grpc
from google.protobuf import json_format

from transaction_service.cli.connection import ClientSetupError, call_metadata, open_channel
from transactions.v1 import transactions_pb2 as pb
from transactions.v1 import transactions_pb2_grpc as pb_grpc

# Waits between reconnection attempts, in seconds; the last one repeats.
_BACKOFF = (0.5, 1.0, 2.0, 5.0)
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def revision_of(response: pb.WatchTransactionResponse | pb.WatchTransactionsResponse) -> int:
    """The revision to resume from after this message."""
    event = response.WhichOneof("event")
    if event == "change":
        return response.change.revision
    if event == "changes":
        return response.changes.changes[-1].revision
    if event == "progress":
        return response.progress.revision
    # `current`: only a single transaction's watch sends it.
    assert isinstance(response, pb.WatchTransactionResponse)
    return response.current.progress_revision


def _open(
    stub: pb_grpc.TransactionServiceStub, args: argparse.Namespace, start: int | None
) -> Iterator[pb.WatchTransactionResponse | pb.WatchTransactionsResponse]:
    metadata = call_metadata(args)
    if args.transaction_id or args.order_id:
        request = pb.WatchTransactionRequest(
            transaction_id=args.transaction_id or None,
            order_id=args.order_id or None,
            batch_changes=True,
        )
        if start is not None:
            request.start_revision = start
        one: Iterator[pb.WatchTransactionResponse] = stub.WatchTransaction(
            request, metadata=metadata
        )
        return one
    feed = pb.WatchTransactionsRequest(
        kinds=[f"CHANGE_KIND_{k.upper()}" for k in args.kind],
        team_id=args.team_id or "",
        batch_changes=True,
    )
    if start is not None:
        feed.start_revision = start
    every: Iterator[pb.WatchTransactionsResponse] = stub.WatchTransactions(feed, metadata=metadata)
    return every


def _lines(
    response: pb.WatchTransactionResponse | pb.WatchTransactionsResponse,
) -> Iterator[dict[str, object]]:
    """One JSON object per message; a batch (the CLI asks for them, they are cheaper for the
    server) is printed as one `change` line per change, as if each had come alone."""
    if response.WhichOneof("event") == "changes":
        for change in response.changes.changes:
            yield {"change": json_format.MessageToDict(change, preserving_proto_field_name=True)}
        return
    yield json_format.MessageToDict(response, preserving_proto_field_name=True)


def run_watch(args: argparse.Namespace) -> int:
    try:
        for kind in args.kind:
            pb.ChangeKind.Value(f"CHANGE_KIND_{kind.upper()}")
    except ValueError as exc:
        print(f"transaction-service watch: {exc}", file=sys.stderr)
        return 2
    try:
        channel = open_channel(args)
    except ClientSetupError as exc:
        print(f"transaction-service watch: {exc}", file=sys.stderr)
        return 2
    try:
        with channel:
            return _watch_forever(args, channel)
    except KeyboardInterrupt:
        return 130


def _watch_forever(args: argparse.Namespace, channel: grpc.Channel) -> int:
    start: int | None = args.from_revision
    failures = 0
    stub = pb_grpc.TransactionServiceStub(channel)
    while True:
        try:
            for response in _open(stub, args, start):
                failures = 0
                start = revision_of(response)
                for line in _lines(response):
                    print(json.dumps(line), flush=True)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
            print(f"transaction-service watch: {code.name}: {details}", file=sys.stderr)
            if args.no_reconnect or code not in _RETRYABLE:
                return 1
            time.sleep(_BACKOFF[min(failures, len(_BACKOFF) - 1)])
            failures += 1
            continue
        if args.no_reconnect:
            return 0
