"""What Junction's API answers, parsed with the same lenient models that parse webhook `data`.

Each answer keeps the provider's JSON as it came (`raw`), so that the mapping can hand the service
the provider's own words, and the parsed fields callers act on. An order answer *is* the order
object of a webhook's `data`; a transaction answer is a transaction block plus the team.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from transaction_service.domain.payload import OrderDataModel, TransactionBlockModel


class _Lenient(BaseModel):
    # As for webhooks: the provider adds fields without notice; built on first use, as they.
    model_config = ConfigDict(extra="ignore", frozen=True, defer_build=True)


class OrderTransactionAnswer(TransactionBlockModel):
    """`GET /v3/order_transaction/{id}`: `{id, team_id, status, orders}`.

    Its orders name their status `last_status` / `last_status_created_at`; `TransactionOrderEntry`
    accepts that spelling and the webhooks' `low_level_status` alike.
    """

    team_id: str | None = None


class _ResultsMetadata(_Lenient):
    # The provider's default: a result without a status is final.
    status: str = "final"
    interpretation: str | None = None


class _ResultsAnswer(_Lenient):
    """The parts of `LabResultsRaw` the service acts on; the rest stays in the raw bytes."""

    metadata: _ResultsMetadata | None = None
    # A list of biomarker results, or (older payloads) an object keyed by marker.
    results: list[Any] | dict[str, Any] | None = None
    missing_results: list[Any] | None = None
    order_transaction: TransactionBlockModel | None = None


@dataclass(frozen=True)
class OrderAnswer:
    """`GET /v3/order/{id}`, or one entry of `GET /v3/orders`."""

    raw: dict[str, Any]
    order: OrderDataModel

    @classmethod
    def from_raw(cls, raw: dict[str, Any]) -> OrderAnswer:
        """Parse one order object; raises pydantic's ValidationError if it is not one."""
        return cls(raw=raw, order=OrderDataModel.model_validate(raw))


@dataclass(frozen=True)
class TransactionAnswer:
    """`GET /v3/order_transaction/{id}`."""

    raw: dict[str, Any]
    transaction: OrderTransactionAnswer

    @classmethod
    def from_raw(cls, raw: dict[str, Any]) -> TransactionAnswer:
        return cls(raw=raw, transaction=OrderTransactionAnswer.model_validate(raw))


@dataclass(frozen=True)
class TransactionResults:
    """`GET /v3/order_transaction/{id}/result`: the combined results of the initial and redraw
    orders.

    `raw_json` is the body byte for byte, to be stored as it came; it is health data: never log it.
    """

    raw_json: bytes
    # `metadata.status`: "partial" while results are still expected, "final" once they are all in.
    status: str
    interpretation: str | None
    result_count: int
    missing_result_count: int
    # The transaction as the results endpoint saw it (webhook spelling); None on older answers.
    order_transaction: TransactionBlockModel | None

    @property
    def is_final(self) -> bool:
        return self.status == "final"

    @classmethod
    def from_raw(cls, raw_json: bytes, parsed: dict[str, Any]) -> TransactionResults:
        answer = _ResultsAnswer.model_validate(parsed)
        metadata = answer.metadata
        return cls(
            raw_json=raw_json,
            status=metadata.status if metadata else "",
            interpretation=metadata.interpretation if metadata else None,
            result_count=len(answer.results or ()),
            missing_result_count=len(answer.missing_results or ()),
            order_transaction=answer.order_transaction,
        )


class _OrdersPageAnswer(_Lenient):
    # Parsed here, not one by one, so a bad field is named from the page: `orders[3].id`.
    orders: list[OrderDataModel] = Field(default_factory=list)
    total: int | None = None
    page: int | None = None
    size: int | None = None


@dataclass(frozen=True)
class OrdersPage:
    """One page of `GET /v3/orders`: `{orders, total, page, size}`, pages numbered from 1."""

    orders: list[OrderAnswer]
    page: int
    size: int
    # Orders matching the filters on every page; None if the provider did not say.
    total: int | None

    @classmethod
    def from_raw(cls, raw: dict[str, Any], *, page: int, size: int) -> OrdersPage:
        answer = _OrdersPageAnswer.model_validate(raw)
        return cls(
            orders=[
                OrderAnswer(raw=order_raw, order=order)
                for order_raw, order in zip(raw.get("orders") or [], answer.orders, strict=True)
            ],
            page=answer.page or page,
            size=answer.size or size,
            total=answer.total,
        )
