"""Admission to the ingest queue: a bound on what waits for a commit, and fairness among callers.

Modelled on Kubernetes' API priority and fairness (shares per flow, separate queues), sized for
one commit loop:

- **Lanes.** Deliveries wait in one of three lanes by how they came: webhooks (Junction, through
  Svix), unary gRPC calls (`IngestEvent`, and reconciliation's own ingests), and bulk streams
  (`IngestEvents`). Each lane may hold its share of `limit` deliveries and `limit_bytes` of
  bodies: a quarter each for webhooks and unary calls, half for streams. So no kind of caller can
  fill the queue for the others.
- **Flows.** Within a lane, each flow (a stream, a client connection) may hold at most an equal
  part of the lane's share among the flows that have something waiting, so no stream or caller
  can take more than its share.
- **Batches filled round-robin**: one delivery from each lane in turn, and within a lane one from
  each flow in turn (each flow in its own order). While bulk streams keep the queue full, every
  batch still carries the waiting webhooks and unary calls.

What happens to a delivery that finds its share full is the caller's choice (`Ingestor`):
refused at once (webhooks and unary calls: retry later), or held until there is room (streams:
their window stops reading, and HTTP/2 makes the producer wait).

No I/O and no asyncio here: the Ingestor owns the waiting and the answers.
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar


class Lane(enum.StrEnum):
    WEBHOOK = "webhook"
    UNARY = "unary"
    STREAM = "stream"


# Each lane's part of the queue's bounds.
LANE_SHARES = {Lane.WEBHOOK: 0.25, Lane.UNARY: 0.25, Lane.STREAM: 0.5}


@dataclass(frozen=True)
class Flow:
    """Who a delivery waits for: its lane, and which flow of the lane (a stream, a peer)."""

    lane: Lane
    name: str = ""


T = TypeVar("T")


@dataclass(eq=False)
class Ticket(Generic[T]):
    """One delivery's place in the queue."""

    item: T
    flow: Flow
    size: int
    # Still waiting: neither taken into a batch nor withdrawn.
    waiting: bool = field(default=False)


@dataclass
class _LaneState(Generic[T]):
    limit: int
    limit_bytes: int
    count: int = 0
    size: int = 0
    # Flow name -> its waiting tickets, oldest first; the flow whose turn is next comes first.
    flows: OrderedDict[str, deque[Ticket[T]]] = field(default_factory=OrderedDict)
    # Flow name -> how many of its tickets wait (withdrawn ones stay in the deque until taken).
    counts: dict[str, int] = field(default_factory=dict)


class AdmissionQueue(Generic[T]):
    """The deliveries waiting for a commit, by lane and flow, within the bounds."""

    def __init__(self, limit: int, limit_bytes: int) -> None:
        self.limit = limit
        self.limit_bytes = limit_bytes
        self._lanes: dict[Lane, _LaneState[T]] = {
            lane: _LaneState(max(1, int(limit * share)), max(1, int(limit_bytes * share)))
            for lane, share in LANE_SHARES.items()
        }

    def __len__(self) -> int:
        return sum(lane.count for lane in self._lanes.values())

    def depth(self, lane: Lane) -> int:
        return self._lanes[lane].count

    def lane_limit(self, lane: Lane) -> int:
        return self._lanes[lane].limit

    def flow_share(self, flow: Flow) -> int:
        """How many deliveries `flow` may have waiting now: an equal part of its lane's share
        among the flows with something waiting (itself included)."""
        lane = self._lanes[flow.lane]
        active = len(lane.counts) + (flow.name not in lane.counts)
        return max(1, lane.limit // active)

    def has_room(self, flow: Flow, size: int) -> bool:
        lane = self._lanes[flow.lane]
        if lane.count >= lane.limit or (lane.count > 0 and lane.size + size > lane.limit_bytes):
            return False
        return lane.counts.get(flow.name, 0) < self.flow_share(flow)

    def put(self, ticket: Ticket[T]) -> None:
        """Queue `ticket` (the caller checked `has_room`)."""
        lane = self._lanes[ticket.flow.lane]
        name = ticket.flow.name
        lane.flows.setdefault(name, deque()).append(ticket)
        lane.counts[name] = lane.counts.get(name, 0) + 1
        lane.count += 1
        lane.size += ticket.size
        ticket.waiting = True

    def withdraw(self, ticket: Ticket[T]) -> bool:
        """Take a waiting ticket out of the bounds (its caller gave up); False if it was taken
        into a batch already. It is skipped, not searched for: removal costs nothing."""
        if not ticket.waiting:
            return False
        self._release(ticket)
        return True

    def _release(self, ticket: Ticket[T]) -> None:
        ticket.waiting = False
        lane = self._lanes[ticket.flow.lane]
        name = ticket.flow.name
        lane.count -= 1
        lane.size -= ticket.size
        left = lane.counts[name] - 1
        if left:
            lane.counts[name] = left
        else:
            del lane.counts[name]

    def take(self, most: int, most_bulk: int | None = None) -> list[Ticket[T]]:
        """Up to `most` waiting tickets, round-robin over lanes and, in each, over flows; at
        most `most_bulk` of them from the stream lane."""
        batch: list[Ticket[T]] = []
        turns = self._turns(most if most_bulk is None else most_bulk)
        while len(batch) < most:
            ticket = next(turns, None)
            if ticket is None:
                break
            batch.append(ticket)
        return batch

    def _turns(self, most_bulk: int) -> Iterator[Ticket[T]]:
        lanes = list(self._lanes.items())
        bulk = 0
        while True:
            progressed = False
            for name, lane in lanes:
                if name is Lane.STREAM:
                    if bulk >= most_bulk:
                        continue
                    bulk += 1
                ticket = self._next_of(lane)
                if ticket is not None:
                    progressed = True
                    yield ticket
            if not progressed:
                return

    def _next_of(self, lane: _LaneState[T]) -> Ticket[T] | None:
        while lane.flows:
            name, tickets = next(iter(lane.flows.items()))
            while tickets and not tickets[0].waiting:
                tickets.popleft()  # withdrawn
            if not tickets:
                del lane.flows[name]
                continue
            ticket = tickets.popleft()
            if tickets:
                lane.flows.move_to_end(name)  # the next flow's turn
            else:
                del lane.flows[name]
            self._release(ticket)
            return ticket
        return None
