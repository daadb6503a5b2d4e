"""What a change changed, field by field: the fields of the view that differ, with their values
before. Computed once, when the change is planned (the view before is at hand then), and stored
with the change, so that a replay from the change log says the same as the live change did.

Field names are the view's, which are also the protobuf `Transaction` and `Order` fields' names.
A transaction's `orders` is named when any order was added, removed or changed; each such order
has an `OrderDiff` of its own (orders are told apart by id, not by their place in the list).

Nothing here does I/O.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any

import msgspec

from transaction_service.domain.state import OrderView, TransactionView

# `revision` is not a view field: it changes with every change, so it is never listed.
TRANSACTION_FIELDS = TransactionView.__struct_fields__
ORDER_FIELDS = tuple(n for n in OrderView.__struct_fields__ if n != "id")
# Every field's value in one call (diffs are computed for every applied delivery).
_TRANSACTION_VALUES = attrgetter(*TRANSACTION_FIELDS)
_ORDER_VALUES = attrgetter(*ORDER_FIELDS)
_ORDER_DEFAULTS = _ORDER_VALUES(OrderView(id=""))
# The transaction fields listed before `orders`, so that `orders` takes its place among them.
_BEFORE_ORDERS = frozenset(TRANSACTION_FIELDS[: TRANSACTION_FIELDS.index("orders")])


class OrderDiff(msgspec.Struct, frozen=True, kw_only=True):
    """One order added, removed or changed by a change."""

    id: str
    added: bool = False
    removed: bool = False
    # The order's fields whose value differs from before; for an added order, those it has set;
    # empty for a removed one.
    fields: tuple[str, ...] = ()


class ViewDiff(msgspec.Struct, frozen=True, kw_only=True):
    """The difference between a transaction's view before a change and after it."""

    # The transaction's fields whose value differs (`orders` if any order did); for a new
    # transaction, those it has set. Empty when nothing a caller sees changed (RESULTS_READY).
    fields: tuple[str, ...] = ()
    # The transaction before the change (read only the `fields`, and the orders named in
    # `orders`: a diff read back from the change log holds no more); None for a new transaction.
    before: TransactionView | None = None
    orders: tuple[OrderDiff, ...] = ()

    @property
    def created(self) -> bool:
        return self.before is None and bool(self.fields)

    def order_before(self, order_id: str) -> OrderView | None:
        """The order as it was before the change; None if it was added."""
        if self.before is None:
            return None
        return next((o for o in self.before.orders if o.id == order_id), None)


NOTHING = ViewDiff()


def _set_fields(order: OrderView) -> tuple[str, ...]:
    return tuple(
        n
        for n, value, default in zip(
            ORDER_FIELDS, _ORDER_VALUES(order), _ORDER_DEFAULTS, strict=True
        )
        if value != default
    )


def _with_orders(fields: list[str]) -> tuple[str, ...]:
    fields.insert(sum(f in _BEFORE_ORDERS for f in fields), "orders")
    return tuple(fields)


def diff_views(before: TransactionView | None, after: TransactionView) -> ViewDiff:
    """What changed from `before` (None: the transaction is new) to `after`."""
    if before is None:
        # Every field it has set; its id and status always are.
        defaults = _TRANSACTION_VALUES(TransactionView(id="", status=after.status))
        fields = [
            n
            for n, value, default in zip(
                TRANSACTION_FIELDS, _TRANSACTION_VALUES(after), defaults, strict=True
            )
            if n in ("id", "status") or (n != "orders" and value != default)
        ]
        orders = tuple(OrderDiff(id=o.id, added=True, fields=_set_fields(o)) for o in after.orders)
        return ViewDiff(fields=_with_orders(fields) if orders else tuple(fields), orders=orders)
    if before == after:
        return NOTHING
    fields = [
        n
        for n, old, new in zip(
            TRANSACTION_FIELDS, _TRANSACTION_VALUES(before), _TRANSACTION_VALUES(after), strict=True
        )
        if n != "orders" and old != new
    ]
    old_orders = {o.id: o for o in before.orders}
    diffs: list[OrderDiff] = []
    for order in after.orders:
        previous = old_orders.pop(order.id, None)
        if previous is None:
            diffs.append(OrderDiff(id=order.id, added=True, fields=_set_fields(order)))
        elif previous != order:
            changed = tuple(
                n
                for n, old, new in zip(
                    ORDER_FIELDS, _ORDER_VALUES(previous), _ORDER_VALUES(order), strict=True
                )
                if old != new
            )
            diffs.append(OrderDiff(id=order.id, fields=changed))
    diffs.extend(OrderDiff(id=order_id, removed=True) for order_id in old_orders)
    return ViewDiff(
        fields=_with_orders(fields) if diffs else tuple(fields),
        before=before,
        orders=tuple(diffs),
    )


# msgspec, as for the view: stored with each change in the change log. Of the view before, only
# what the diff names is stored (the id and status always, for they have no default): read back,
# the other fields hold their defaults, which nobody reads.
_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(ViewDiff)


def diff_to_json(diff: ViewDiff) -> str:
    before = diff.before
    if before is None:
        return _ENCODER.encode(diff).decode()
    values = dict(zip(TRANSACTION_FIELDS, _TRANSACTION_VALUES(before), strict=True))
    kept: dict[str, Any] = {"id": before.id, "status": before.status}
    kept.update((n, values[n]) for n in diff.fields if n != "orders")
    old_orders = {o.id: o for o in before.orders}
    orders = []
    for order in diff.orders:
        previous = old_orders.get(order.id)
        if previous is not None:
            names = ORDER_FIELDS if order.removed else order.fields
            entry = {"id": previous.id}
            entry.update((n, getattr(previous, n)) for n in names)
            orders.append(entry)
    kept["orders"] = orders
    stored = {"fields": diff.fields, "before": kept, "orders": diff.orders}
    return _ENCODER.encode(stored).decode()


def diff_from_json(text: str | bytes) -> ViewDiff:
    return _DECODER.decode(text)
