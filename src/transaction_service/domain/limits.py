"""Bounds on what one transaction's state may hold, so every stored transaction and every change
always fits in a gRPC response with room to spare.

Parsing (`payload.parse_event`, `ingest.decode_delivery`) refuses a body whose own strings or
order list exceed the limits. The limits on the merged state (orders per merged transaction, size
of the serialized view) are for the merge planner to enforce, with the same `StateLimits`.
`DEFAULT_LIMITS` is what the service uses unless configured otherwise.

Why the defaults fit: a transaction's view holds nine strings per order and eight of its own. At
50 orders of 1,024-character strings a change is about 0.47 MB on the wire in ASCII and, in the
worst case (every character 4 bytes of UTF-8), about 1.9 MB: inside gRPC's default 4 MiB message
limit. The view-size limit (1 MiB of the view's JSON, which is larger than its protobuf form) caps
even that worst case at a quarter of the message limit, leaving room for the envelope of a change
or a response that carries more than one (tests/test_grpc_api.py measures both).
"""

from __future__ import annotations

from dataclasses import dataclass

# How deep a webhook body may nest objects and arrays; the body itself is level 1. Junction bodies
# nest about 5 levels. A protobuf Struct cannot carry much more than this anyway (protobuf decodes
# at most 100 nested messages and each JSON level takes three), so both body forms share one limit.
MAX_BODY_DEPTH = 32

# Bytes (UTF-8) of a string the stores index: order and transaction ids, user and team ids.
# PostgreSQL refuses a B-tree index entry over 2,704 bytes (error 54000), and 1,024 characters
# can take 4,096 bytes; 2,048 leaves room for the entry's other columns. SQLite has no such limit,
# so without this bound the two stores would disagree on what they accept.
MAX_KEY_BYTES = 2048


@dataclass(frozen=True, slots=True, kw_only=True)
class StateLimits:
    """Limits on one transaction's state. Exceeding one is INVALID_ARGUMENT naming the limit."""

    # Characters in each string the state keeps: ids, statuses, event type, sample id, lab, lab
    # test name, interpretation, user, team and client user ids. Real values are below 100 (ids
    # are UUIDs); 1,024 leaves room for long lab test names without letting one field grow a
    # transaction without bound.
    max_string_length: int = 1024
    # Orders listed in one `order_transaction` block, and orders in one merged transaction. A
    # transaction holds an initial order, at most one redraw and rarely a recreation or two.
    max_orders_per_transaction: int = 50
    # Bytes of a transaction's view serialized as JSON (`state.view_to_json`, as stored); its
    # protobuf form, as sent, is smaller.
    max_view_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        for name in ("max_string_length", "max_orders_per_transaction", "max_view_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


DEFAULT_LIMITS = StateLimits()
