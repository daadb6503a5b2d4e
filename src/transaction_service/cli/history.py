"""`transaction-service history ID`: why is this transaction in this state? Prints its delivery
history (ListTransactionEvents) as a timeline, oldest first: when each delivery arrived and how,
what it claimed, what it did and why, the revision it made and what that changed. `--json`
prints one JSON object per entry instead (a TransactionEvent, as grpcurl would show it).

The id may be the transaction's or any of its orders'. Exit codes: 0 printed, 1 the call failed
(not found, refused, unreachable), 2 a usage mistake.
"""

from __future__ import annotations

import argparse
import json
import sys

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from transaction_client import ClientSetupError, NotFound, TransactionServiceError
from transaction_client.sync import TransactionClient
from transaction_service.cli.connection import sync_client_for
from transactions.v1 import transactions_pb2 as pb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("id", metavar="ORDER_OR_TRANSACTION_ID", help="a transaction or order id")
    parser.add_argument(
        "--json", action="store_true", help="one JSON object per entry, for machines"
    )
    parser.add_argument(
        "--bodies",
        action="store_true",
        help="with each delivery's body while it is kept (patient data: needs an ingest token)",
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for each page (default 30)"
    )


def run_history(args: argparse.Namespace) -> int:
    try:
        client = sync_client_for(args)
    except ClientSetupError as exc:
        print(f"transaction-service history: {exc}", file=sys.stderr)
        return 2
    with client:
        try:
            transaction_id, head, events = _history(client, args)
        except TransactionServiceError as error:
            print(f"transaction-service history: {error}", file=sys.stderr)
            return 1
    if args.json:
        for event in events:
            print(json.dumps(json_format.MessageToDict(event, preserving_proto_field_name=True)))
        return 0
    print(
        f"transaction {transaction_id}: {len(events)} "
        f"entr{'y' if len(events) == 1 else 'ies'}, oldest first (head revision {head})"
    )
    for event in events:
        print()
        for line in timeline_entry(event):
            print(line)
    return 0


def _history(
    client: TransactionClient, args: argparse.Namespace
) -> tuple[str, int, list[pb.TransactionEvent]]:
    """(transaction id, head revision, every entry); the id is tried as a transaction id, then
    as an order id."""
    options = {"include_bodies": args.bodies, "timeout": args.timeout}
    try:
        history = client.list_transaction_events(transaction_id=args.id, **options)
        events = list(history)
    except NotFound:
        history = client.list_transaction_events(order_id=args.id, **options)
        events = list(history)
    return history.transaction_id, history.revision, events


_SOURCES = {
    pb.EVENT_SOURCE_WEBHOOK: "webhook",
    pb.EVENT_SOURCE_GRPC: "gRPC",
    pb.EVENT_SOURCE_JUNCTION_API: "Junction API",
    pb.EVENT_SOURCE_RESULTS_FETCH: "results fetch",
    pb.EVENT_SOURCE_REBUILD: "rebuild",
}


def _time(value: Timestamp) -> str:
    return value.ToJsonString()


def timeline_entry(event: pb.TransactionEvent) -> list[str]:
    """The lines of one entry: arrival, source and id; what it claimed; outcome and reason;
    what its change changed; retries."""
    outcome = pb.IngestOutcome.Name(event.outcome).removeprefix("INGEST_OUTCOME_")
    made = f" -> revision {event.revision}" if event.revision else ""
    source = _SOURCES.get(event.source, "unknown source")
    lines = [f"{_time(event.received_at)}  {outcome}{made}  {source}  {event.event_id}"]
    about = event.event_type + (f" of order {event.order_id}" if event.order_id else "")
    claims = []
    if event.claimed_status:
        claims.append(f"order {event.claimed_status}")
    if event.claimed_transaction_status:
        claims.append(f"transaction {event.claimed_transaction_status}")
    if claims:
        about += f"; claims {', '.join(claims)}"
    if event.HasField("provider_time"):
        about += f" as of {_time(event.provider_time)}"
    lines.append(f"    {about}")
    if event.reason:
        lines.append(f"    why: {event.reason}")
    if event.kinds:
        kinds = ", ".join(pb.ChangeKind.Name(k).removeprefix("CHANGE_KIND_") for k in event.kinds)
        lines.append(f"    kinds: {kinds}")
    if event.diff.changed_fields.paths:
        lines.append(f"    changed: {', '.join(event.diff.changed_fields.paths)}")
    if event.duplicate_count:
        times = "time" if event.duplicate_count == 1 else "times"
        lines.append(
            f"    delivered again {event.duplicate_count} {times} (DUPLICATE), the last at "
            f"{_time(event.last_duplicate_at)}"
        )
    if event.body_erased:
        lines.append("    body erased (body retention)")
    elif event.body_json:
        lines.append(f"    body: {event.body_json}")
    return lines
