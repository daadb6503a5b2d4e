"""Parsing Junction webhook bodies into typed events.

Lenient where the provider is loose (unknown fields and enum values are kept or ignored, envelope
fields may be missing, timestamps come as `...Z` or `...+00:00`), strict where a wrong type would
corrupt state (an order id that is not a string, an event id that is not an integer).
Every problem is reported as a `FieldViolation` naming the field, so callers can answer with a
`google.rpc.BadRequest`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from transaction_service.errors import FieldViolation, InvalidArgument

ORDER_EVENT_TYPES = frozenset({"labtest.order.created", "labtest.order.updated"})


class PayloadError(InvalidArgument):
    """The body cannot be accepted; `violations` says why, field by field."""


def _as_utc(value: datetime) -> datetime:
    # The provider sends offsets; a naive time is taken as UTC rather than as local time.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


Timestamp = Annotated[datetime, AfterValidator(_as_utc)]


class _Lenient(BaseModel):
    # Unknown fields are ignored: the provider adds fields without notice.
    model_config = ConfigDict(extra="ignore", frozen=True)


class StatusEvent(_Lenient):
    """An entry of `data.events`: one status the order reached."""

    id: int
    created_at: Timestamp
    # "HIGH.METHOD.LOW", e.g. "collecting_sample.walk_in_test.redraw_available".
    status: str


class TransactionOrderEntry(_Lenient):
    """An entry of `order_transaction.orders`: another order's summary, as of the payload's time."""

    id: str = Field(min_length=1)
    low_level_status: str | None = None
    low_level_status_created_at: Timestamp | None = None
    # The transaction endpoint names the status fields `last_status` / `last_status_created_at`.
    last_status: str | None = None
    last_status_created_at: Timestamp | None = None
    origin: str | None = None
    parent_id: str | None = None
    created_at: Timestamp | None = None
    updated_at: Timestamp | None = None

    @property
    def status(self) -> str | None:
        return self.low_level_status or self.last_status

    @property
    def status_created_at(self) -> datetime | None:
        return self.low_level_status_created_at or self.last_status_created_at


class TransactionBlock(_Lenient):
    """`data.order_transaction`: the transaction as Junction saw it when it built the payload."""

    id: str = Field(min_length=1)
    status: str | None = None
    orders: list[TransactionOrderEntry] = Field(default_factory=list)


class Lab(_Lenient):
    slug: str | None = None


class LabTest(_Lenient):
    name: str | None = None
    method: str | None = None
    lab: Lab | None = None


class OrderDetails(_Lenient):
    type: str | None = None


class OrderData(_Lenient):
    """`data` of a `labtest.order.*` webhook: the whole order at one moment."""

    id: str = Field(min_length=1)
    user_id: str | None = None
    team_id: str | None = None
    origin: str | None = None
    # Deprecated high-level status.
    status: str | None = None
    events: list[StatusEvent] | None = None
    last_event: StatusEvent | None = None
    details: OrderDetails | None = None
    lab_test: LabTest | None = None
    sample_id: str | None = None
    has_missing_results: bool | None = None
    interpretation: str | None = None
    created_at: Timestamp | None = None
    updated_at: Timestamp | None = None
    order_transaction: TransactionBlock | None = None


class Envelope(_Lenient):
    event_type: str = Field(min_length=1)
    user_id: str | None = None
    team_id: str | None = None
    # The customer's own id for the user (not always a UUID); only the envelope carries it.
    client_user_id: str | None = None
    data: Any = None


class OrderEnvelope(Envelope):
    data: OrderData


@dataclass(frozen=True)
class OrderEvent:
    """A parsed `labtest.order.created` / `labtest.order.updated` webhook."""

    event_type: str
    order: OrderData
    # Envelope user and team, used when `data` lacks its own.
    user_id: str | None
    team_id: str | None
    client_user_id: str | None
    # Digest of the body's canonical JSON: a content-derived, order-independent tie-breaker.
    digest: str


@dataclass(frozen=True)
class OtherEvent:
    """A well-formed event of a type that does not change order state."""

    event_type: str
    digest: str


ParsedEvent = OrderEvent | OtherEvent


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces.

    Numbers must already be normalised (integral floats as ints): `decode_json_body` does it while
    decoding, `normalise_numbers` does it for a body that came as a protobuf Struct.
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def normalise_numbers(value: Any) -> Any:
    """Integral floats become ints, recursively.

    A protobuf Struct carries every number as a double, so 9001 and 9001.0 must come out alike for
    the two request forms to give the same digest.
    """
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: normalise_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise_numbers(v) for v in value]
    return value


def body_digest(body: dict[str, Any]) -> str:
    try:
        encoded = canonical_json(body).encode()
    except UnicodeEncodeError:
        # json.loads accepts escapes such as "\ud800" that are no text at all.
        raise PayloadError(
            [FieldViolation("", "body is not valid JSON text: it has an unpaired surrogate escape")]
        ) from None
    return hashlib.sha256(encoded).hexdigest()


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON value")


def _parse_float(text: str) -> float | int:
    # Integral floats become ints while decoding, so a decoded body is already canonical as far as
    # numbers go and canonical_json need not walk it.
    value = float(text)
    return int(value) if value.is_integer() else value


def decode_json_body(text: str) -> dict[str, Any]:
    """Decode a raw body; it must be a JSON object (strict JSON: no NaN or Infinity)."""
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_parse_float)
    except ValueError as exc:
        raise PayloadError([FieldViolation("", f"body is not valid JSON: {exc}")]) from None
    if not isinstance(value, dict):
        kind = type(value).__name__ if value is not None else "null"
        raise PayloadError(
            [FieldViolation("", f"body must be a JSON object, got {_json_kind(kind)}")]
        )
    return value


def _json_kind(python_kind: str) -> str:
    return {"list": "an array", "str": "a string", "int": "a number", "float": "a number"}.get(
        python_kind, python_kind
    )


def parse_event(body: dict[str, Any], digest: str | None = None) -> ParsedEvent:
    """Turn a decoded body into a typed event, or raise PayloadError naming every bad field."""
    digest = digest or body_digest(body)
    try:
        envelope = Envelope.model_validate(body)
        if envelope.event_type not in ORDER_EVENT_TYPES:
            return OtherEvent(event_type=envelope.event_type, digest=digest)
        parsed = OrderEnvelope.model_validate(body)
    except ValidationError as exc:
        raise PayloadError(_violations(exc)) from None
    return OrderEvent(
        event_type=parsed.event_type,
        order=parsed.data,
        user_id=parsed.user_id,
        team_id=parsed.team_id,
        client_user_id=parsed.client_user_id,
        digest=digest,
    )


def _violations(exc: ValidationError) -> list[FieldViolation]:
    out = []
    for error in exc.errors(include_url=False):
        path = ""
        for part in error["loc"]:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        description = error["msg"]
        if error["type"] != "missing" and "input" in error:
            description += f" (got {_describe_input(error['input'])})"
        out.append(FieldViolation(path, description))
    return out


def _describe_input(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
