"""What Junction's API says, as webhook-shaped bodies for the one ingest path. Pure: no I/O.

The service learns from the API exactly as it learns from webhooks: each answer becomes a
`labtest.order.updated` body that `parse_event` accepts, goes through the same dedupe and merge,
and is recorded with its outcome. Old news is STALE, as for a late webhook.

Event ids are derived from the body (`api:sha256:<digest of its canonical JSON>`): asking the API
twice about an unchanged order gives the same id, a DUPLICATE, not a new event. The body also says
where it came from (`transaction_service.source: "api"` and the endpoint), which the parser ignores.

An order answer (`GET /v3/order/{id}`, or an entry of `GET /v3/orders`) *is* a webhook's `data`:
it becomes the body as it is.

A transaction answer (`GET /v3/order_transaction/{id}`) has no order body of its own, but the
merge only reads transaction blocks from inside an order's `data`. So the block travels in a
*carrier*: `data = {"id": <an order of the transaction>, "order_transaction": <the answer>}`, and
nothing else. What that means for the merge (`domain/state.py`):
- Every order's status comes from its entry, stamped with the entry's own time
  (`last_status_created_at`), so per order the newest observation still wins.
- The carrier has no `updated_at` and no `events`. Its "own" observation therefore has no status
  and a snapshot older than any real order body, so it never hides the sample id, lab, method or
  result flags a webhook or an order answer brought; and the block's time is the newest time in
  its entries alone, so an old transaction answer can never outrank a newer webhook's block.
- The one thing the carrier does claim is that the carrier order's own body was seen
  (`seen_own_event`). The carrier is the initial order: the order the transaction was opened
  for, which every caller knows, and the one a reconcile fetches first. Reconcile should ingest
  the orders' own answers alongside the transaction answer; then the claim is true.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transaction_service.domain.payload import body_digest, canonical_json, normalise_body
from transaction_service.domain.state import OrderOrigin
from transaction_service.junction.answers import OrderAnswer, TransactionAnswer
from transaction_service.junction.endpoints import GET_ORDER, GET_ORDER_TRANSACTION

# The event type every API body takes: an update of an order that already exists.
API_EVENT_TYPE = "labtest.order.updated"
EVENT_ID_PREFIX = "api:sha256:"
# Where the body says it came from; an envelope field of ours, ignored by the parser.
SOURCE_FIELD = "transaction_service"


@dataclass(frozen=True)
class ApiEvent:
    """A webhook-shaped body synthesized from an API answer, ready for IngestEvent."""

    # `api:sha256:<hex>`: the same answer always gives the same id.
    event_id: str
    body: dict[str, Any]
    # The order whose `data` the body is (for a transaction answer: the carrier).
    order_id: str
    transaction_id: str | None

    def payload_json(self) -> str:
        """The body as canonical JSON, for IngestEventRequest.payload_json."""
        return canonical_json(self.body)


def api_event_id(body: dict[str, Any]) -> str:
    """The id of a synthesized body: a digest of its canonical JSON (numbers normalised)."""
    return EVENT_ID_PREFIX + body_digest(normalise_body(body))


def order_event(answer: OrderAnswer) -> ApiEvent:
    """`GET /v3/order/{id}` (or an entry of `GET /v3/orders`) as an order-updated body."""
    body = _body(answer.raw, endpoint=GET_ORDER)
    block = answer.order.order_transaction
    return ApiEvent(
        event_id=api_event_id(body),
        body=body,
        order_id=answer.order.id,
        transaction_id=block.id if block else None,
    )


def transaction_event(answer: TransactionAnswer) -> ApiEvent | None:
    """`GET /v3/order_transaction/{id}` as an order-updated body whose `data` is only a carrier for
    the transaction block (see the module docstring). None if the answer lists no order: there is
    no order to carry it, and no view of a transaction without orders."""
    carrier = transaction_carrier(answer)
    if carrier is None:
        return None
    data: dict[str, Any] = {"id": carrier, "order_transaction": answer.raw}
    team_id = answer.transaction.team_id
    if team_id:
        data["team_id"] = team_id
    body = _body(data, endpoint=GET_ORDER_TRANSACTION)
    return ApiEvent(
        event_id=api_event_id(body),
        body=body,
        order_id=carrier,
        transaction_id=answer.transaction.id,
    )


def transaction_carrier(answer: TransactionAnswer) -> str | None:
    """The order whose `data` carries a transaction answer: the initial order; failing an origin,
    the order with no parent; failing that, the first listed (the provider lists oldest first)."""
    orders = answer.transaction.orders
    for entry in orders:
        if entry.origin == OrderOrigin.INITIAL.value:
            return entry.id
    for entry in orders:
        if not entry.parent_id:
            return entry.id
    return orders[0].id if orders else None


def _body(data: dict[str, Any], *, endpoint: str) -> dict[str, Any]:
    # Numbers normalised as the webhook decoder does, so the id is the digest ingest computes.
    return {
        "event_type": API_EVENT_TYPE,
        "data": normalise_body(data),
        SOURCE_FIELD: {"source": "api", "endpoint": endpoint},
    }
