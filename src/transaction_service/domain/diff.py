"""What a change changed, field by field: the fields of the view that differ, with their values
before. Computed once, when the change is planned (the view before is at hand then), and stored
with the change, so that a replay from the change log says the same as the live change did.

Field names are the view's, which are also the protobuf `Transaction` and `Order` fields' names.
A transaction's `orders` is named when any order was added, removed or changed; each such order
has an `OrderDiff` of its own (orders are told apart by id, not by their place in the list).

Nothing here does I/O.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import msgspec

from transaction_service.domain.state import OrderView, TransactionView

# `revision` is not a view field: it changes with every change, so it is never listed.
TRANSACTION_FIELDS = tuple(f.name for f in dataclasses.fields(TransactionView))
ORDER_FIELDS = tuple(f.name for f in dataclasses.fields(OrderView) if f.name != "id")
_TRANSACTION_SCALARS = tuple(f for f in TRANSACTION_FIELDS if f != "orders")


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderDiff:
    """One order added, removed or changed by a change."""

    id: str
    added: bool = False
    removed: bool = False
    # The order's fields whose value differs from before; for an added order, those it has set;
    # empty for a removed one.
    fields: tuple[str, ...] = ()
    # The order before the change (read only the `fields`); None when it was added.
    before: OrderView | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ViewDiff:
    """The difference between a transaction's view before a change and after it."""

    # The transaction's fields whose value differs (`orders` if any order did); for a new
    # transaction, those it has set. Empty when nothing a caller sees changed (RESULTS_READY).
    fields: tuple[str, ...] = ()
    # The transaction before the change, without its orders (they are in `orders`); read only
    # the `fields`. None for a new transaction.
    before: TransactionView | None = None
    orders: tuple[OrderDiff, ...] = ()

    @property
    def created(self) -> bool:
        return self.before is None and bool(self.fields)


NOTHING = ViewDiff()

_ORDER_DEFAULTS = OrderView(id="")


def _set_fields(value: Any, names: tuple[str, ...], defaults: Any) -> tuple[str, ...]:
    return tuple(n for n in names if getattr(value, n) != getattr(defaults, n))


def diff_views(before: TransactionView | None, after: TransactionView) -> ViewDiff:
    """What changed from `before` (None: the transaction is new) to `after`."""
    if before is None:
        # Every field it has set; its id and status always are.
        defaults = TransactionView(id="", status=after.status)
        set_fields = [n for n in _TRANSACTION_SCALARS if getattr(after, n) != getattr(defaults, n)]
        fields = ("id", "status", *(n for n in set_fields if n not in ("id", "status")))
        orders = tuple(
            OrderDiff(id=o.id, added=True, fields=_set_fields(o, ORDER_FIELDS, _ORDER_DEFAULTS))
            for o in after.orders
        )
        if orders:
            fields = (*fields, "orders")
        return ViewDiff(fields=tuple(sorted(fields, key=TRANSACTION_FIELDS.index)), orders=orders)
    if before == after:
        return NOTHING
    changed_fields = [n for n in _TRANSACTION_SCALARS if getattr(before, n) != getattr(after, n)]
    old = {o.id: o for o in before.orders}
    diffs: list[OrderDiff] = []
    for order in after.orders:
        previous = old.pop(order.id, None)
        if previous is None:
            diffs.append(
                OrderDiff(
                    id=order.id,
                    added=True,
                    fields=_set_fields(order, ORDER_FIELDS, _ORDER_DEFAULTS),
                )
            )
        elif previous != order:
            changed = tuple(n for n in ORDER_FIELDS if getattr(previous, n) != getattr(order, n))
            diffs.append(OrderDiff(id=order.id, fields=changed, before=previous))
    diffs.extend(OrderDiff(id=o.id, removed=True, before=o) for o in old.values())
    if diffs:
        changed_fields.append("orders")
    return ViewDiff(
        fields=tuple(sorted(changed_fields, key=TRANSACTION_FIELDS.index)),
        before=dataclasses.replace(before, orders=[]),
        orders=tuple(diffs),
    )


# msgspec, as for the view: stored with each change in the change log.
_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(ViewDiff)


def diff_to_json(diff: ViewDiff) -> str:
    return _ENCODER.encode(diff).decode()


def diff_from_json(text: str | bytes) -> ViewDiff:
    return _DECODER.decode(text)
