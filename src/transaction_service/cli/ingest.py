"""`transaction-service ingest FILE...`: feed stored deliveries to a running server in bulk.

Each file is one of:
- JSON lines: one delivery per line, either `{"event_id": ..., "body": ...}` (`body` a JSON
  object, or a string holding the raw body; `svix_id` is taken for `event_id` too; no id: one is
  derived from the body) or a raw webhook body, sent byte for byte as `payload_json`;
- a fixture (`{"scenario", "deliveries": [{"svix_id", "body"}], "expect"}`, as in
  tests/fixtures/junction/): its deliveries, in order;
- one (pretty-printed) webhook body.
`-` reads JSON lines from standard input.

Everything goes through one `IngestEvents` stream, up to `--per-request` deliveries to a request
(fewer, larger messages cost the server far less per delivery), at most `--window` deliveries
ahead of the answers, so memory stays bounded whatever the size of the input. If the stream
breaks with UNAVAILABLE (a restart, a replica going away), the client reconnects and sends again
what was not answered: retries of an event id are harmless. A progress bar (tqdm) goes to stderr
when it is a terminal; the summary of outcomes and refusals goes to stdout. Exit status: 0 when
every delivery was accepted, 1 if any was refused or the stream failed, 2 for unusable arguments.

Why tqdm for the bar: one small dependency-free package that writes to stderr, keeps stdout
clean for the summary, and turns itself off when stderr is not a terminal (CI, pipes); rich
would bring a rendering stack (and its dependencies) for one bar.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import grpc
from tqdm import tqdm

from transaction_client import ClientSetupError, TransactionClient
from transaction_service.cli.connection import client_for
from transactions.v1 import transactions_pb2 as pb

DEFAULT_WINDOW = 512
# Deliveries per IngestEvents request (the server takes up to 500): past about 50 the
# per-message cost is already a small part of a delivery's (docs/performance.md).
DEFAULT_PER_REQUEST = 100
# Errors listed one by one in the summary; the rest are counted.
LISTED_ERRORS = 50
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE}
_BACKOFF = (0.5, 1.0, 2.0, 5.0, 5.0)

_OUTCOMES = {
    pb.INGEST_OUTCOME_APPLIED: "applied",
    pb.INGEST_OUTCOME_DUPLICATE: "duplicate",
    pb.INGEST_OUTCOME_STALE: "stale",
    pb.INGEST_OUTCOME_IGNORED: "ignored",
}


class InputError(Exception):
    """A file that cannot be read; one line for the user."""


@dataclass(frozen=True)
class Item:
    """One delivery to send, and where it came from (`file:line`, `file#deliveries[i]`)."""

    where: str
    request: pb.IngestEventRequest
    # Why it cannot even be sent (an envelope whose event_id is not a string): refused here.
    problem: str = ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help="JSON lines ({event_id, body} or raw bodies), fixture files, or one webhook body "
        "per file; - reads JSON lines from stdin",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=DEFAULT_WINDOW,
        help=f"deliveries sent ahead of their answers (default {DEFAULT_WINDOW})",
    )
    parser.add_argument(
        "--per-request",
        type=int,
        default=DEFAULT_PER_REQUEST,
        help=f"deliveries sent in one request, 1 to 500 (default {DEFAULT_PER_REQUEST})",
    )


def _item(event_id: Any, body: Any, where: str) -> Item:
    if not isinstance(event_id, str):
        return Item(where, pb.IngestEventRequest(), problem="event_id must be a string")
    text = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
    return Item(where, pb.IngestEventRequest(event_id=event_id, payload_json=text))


def _line_item(line: str, where: str) -> Item:
    try:
        value = json.loads(line)
    except ValueError:
        value = None  # sent as it is: the server says what is wrong with it
    if isinstance(value, dict) and "body" in value and "event_type" not in value:
        event_id = value.get("event_id", value.get("svix_id", ""))
        return _item(event_id, value["body"], where)
    return Item(where, pb.IngestEventRequest(payload_json=line))


def _lines(stream: TextIO, name: str) -> Iterator[Item]:
    for number, line in enumerate(stream, start=1):
        if line.strip():
            yield _line_item(line.rstrip("\r\n"), f"{name}:{number}")


def _document_items(document: Any, text: str, name: str) -> list[Item]:
    if isinstance(document, dict) and isinstance(document.get("deliveries"), list):
        items = []
        for i, delivery in enumerate(document["deliveries"]):
            where = f"{name}#deliveries[{i}]"
            if not isinstance(delivery, dict) or "body" not in delivery:
                raise InputError(f"{where}: a delivery must be an object with a body")
            event_id = delivery.get("svix_id", delivery.get("event_id", ""))
            items.append(_item(event_id, delivery["body"], where))
        return items
    return [Item(name, pb.IngestEventRequest(payload_json=text))]


def _open(path: str) -> TextIO:
    try:
        return open(path, encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{path}: cannot read it: {exc.strerror or exc}") from None


def _is_one_document(path: str) -> tuple[bool, Any, str]:
    """Whether the file is a single JSON document spread over lines (a fixture, or one
    pretty-printed body) rather than JSON lines; with the document and its text if so."""
    with _open(path) as stream:
        first = next((line for line in stream if line.strip()), "")
        try:
            json.loads(first)
            return False, None, ""  # the first line stands alone: JSON lines
        except ValueError:
            pass
    with _open(path) as stream:
        text = stream.read()
    try:
        return True, json.loads(text), text
    except ValueError:
        return False, None, ""  # not one document either: lines, each refused by the server


def plan_inputs(paths: list[str]) -> tuple[list[Callable[[], Iterator[Item]]], int | None]:
    """A reader per file (lazy: JSON lines are read as they are sent) and the total number of
    deliveries, if known (not for stdin). Raises InputError for a file that cannot be read."""
    readers: list[Callable[[], Iterator[Item]]] = []
    total: int | None = 0
    for path in paths:
        if path == "-":
            readers.append(lambda: _lines(sys.stdin, "stdin"))
            total = None
            continue
        whole, document, text = _is_one_document(path)
        if whole:
            items = _document_items(document, text, path)
            readers.append(lambda items=items: iter(items))  # type: ignore[misc]
            count = len(items)
        else:
            with _open(path) as stream:
                count = sum(1 for line in stream if line.strip())

            def read(path: str = path) -> Iterator[Item]:
                with _open(path) as stream:
                    yield from _lines(stream, path)

            readers.append(read)
        if total is not None:
            total += count
    return readers, total


@dataclass
class Tally:
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    refused: list[str] = field(default_factory=list)
    refused_count: int = 0

    def record(self, item: Item, response: pb.IngestEventResponse) -> None:
        if response.HasField("error"):
            self.refused_count += 1
            if len(self.refused) < LISTED_ERRORS:
                error = response.error
                code = grpc.StatusCode(_status_code(error.code)).name
                event = f" (event_id {response.event_id})" if response.event_id else ""
                message = " ".join(error.message.split())
                self.refused.append(f"  {item.where}{event}: {code}: {message}")
        else:
            self.outcomes[_OUTCOMES.get(response.outcome, "unknown")] += 1

    @property
    def answered(self) -> int:
        return sum(self.outcomes.values()) + self.refused_count


def _status_code(number: int) -> tuple[int, str]:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code.value
    return grpc.StatusCode.UNKNOWN.value


async def feed(
    client: TransactionClient,
    items: Iterator[Item],
    *,
    window: int,
    on_answer: Callable[[Item, pb.IngestEventResponse], None],
    per_request: int = DEFAULT_PER_REQUEST,
) -> str | None:
    """Send every item through IngestEvents, up to `per_request` to a request and at most
    `window` ahead of their answers; None when all were answered, else why not."""
    unanswered: collections.deque[Item] = collections.deque()
    failures = 0
    while True:
        call = client.stub.IngestEvents(metadata=client.metadata)
        to_send = unanswered  # sent before and not answered: first, in order
        sent: collections.deque[list[Item]] = collections.deque()
        room = asyncio.Semaphore(window)

        async def write(
            call: Any = call,
            to_send: collections.deque[Item] = to_send,
            sent: collections.deque[list[Item]] = sent,
            room: asyncio.Semaphore = room,
        ) -> None:
            ended = False
            while not ended:
                batch: list[Item] = []
                # Waits for room for the first delivery only: a request goes out with what
                # there is room for (and what the input has) now.
                while len(batch) < per_request and not (batch and room.locked()):
                    await room.acquire()
                    item = to_send.popleft() if to_send else next(items, None)
                    if item is None:
                        room.release()
                        ended = True
                        break
                    if item.problem:
                        room.release()
                        on_answer(item, _refused_here(item.problem))
                        continue
                    batch.append(item)
                if not batch:
                    continue
                sent.append(batch)
                if len(batch) == 1:
                    await call.write(batch[0].request)
                else:
                    await call.write(pb.IngestEventRequest(deliveries=[i.request for i in batch]))
            await call.done_writing()

        writer = asyncio.create_task(write())
        try:
            while (response := await call.read()) != grpc.aio.EOF:
                assert isinstance(response, pb.IngestEventResponse)  # not EOF
                batch = sent.popleft()
                # A request refused whole (its own error, no results) refuses each delivery.
                answers = response.results or [response] * len(batch)
                for item, answer in zip(batch, answers, strict=True):
                    on_answer(item, answer)
                    room.release()
                failures = 0
            await writer
            return None
        except grpc.aio.AioRpcError as exc:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            unanswered = collections.deque([*(i for batch in sent for i in batch), *to_send])
            error = client.error(exc)
            if exc.code() not in _RETRYABLE or failures >= len(_BACKOFF):
                return str(error)
            print(f"transaction-service ingest: {error}; reconnecting", file=sys.stderr)
            await asyncio.sleep(_BACKOFF[failures])
            failures += 1


def _refused_here(problem: str) -> pb.IngestEventResponse:
    code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    return pb.IngestEventResponse(error=pb.IngestError(code=code, message=problem))


def _chain(readers: list[Callable[[], Iterator[Item]]]) -> Iterator[Item]:
    for read in readers:
        yield from read()


async def _run(
    args: argparse.Namespace, readers: list[Callable[[], Iterator[Item]]], total: int | None
) -> int:
    tally = Tally()
    with tqdm(total=total, unit="event", file=sys.stderr, disable=None) as bar:

        def on_answer(item: Item, response: pb.IngestEventResponse) -> None:
            tally.record(item, response)
            bar.update(1)

        async with client_for(args) as client:
            failure = await feed(
                client,
                _chain(readers),
                window=args.window,
                on_answer=on_answer,
                per_request=args.per_request,
            )
    counts = ", ".join(f"{tally.outcomes[name]} {name}" for name in _OUTCOMES.values())
    print(f"ingested {tally.answered} deliveries: {counts}, {tally.refused_count} refused")
    if tally.refused:
        print("refused:")
        for line in tally.refused:
            print(line)
        if tally.refused_count > len(tally.refused):
            print(f"  ... and {tally.refused_count - len(tally.refused)} more")
    if failure is not None:
        print(f"transaction-service ingest: stopped: {failure}", file=sys.stderr)
        return 1
    return 1 if tally.refused_count else 0


def run_ingest(args: argparse.Namespace) -> int:
    if args.window < 1:
        print("transaction-service ingest: --window must be at least 1", file=sys.stderr)
        return 2
    if not 1 <= args.per_request <= 500:
        print("transaction-service ingest: --per-request must be 1 to 500", file=sys.stderr)
        return 2
    try:
        readers, total = plan_inputs(args.files)
        return asyncio.run(_run(args, readers, total))
    except (InputError, ClientSetupError) as exc:
        print(f"transaction-service ingest: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
