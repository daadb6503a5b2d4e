"""Parsing Junction webhook bodies into typed events.

Lenient where the provider is loose (unknown fields and enum values are kept or ignored, envelope
fields may be missing, timestamps come as `...Z` or `...+00:00`), strict where a wrong type would
corrupt state (an order id that is not a string, an event id that is not an integer).
Every problem is reported as a `FieldViolation` naming the field, so callers can answer with a
`google.rpc.BadRequest`.

Bounded: a body may nest at most `MAX_BODY_DEPTH` levels, every string the state keeps is at most
`StateLimits.max_string_length` characters, a transaction block lists at most
`StateLimits.max_orders_per_transaction` orders, and timestamps lie in [EARLIEST_TIME, LATEST_TIME).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
)
from pydantic_core import PydanticCustomError

from transaction_service.domain.limits import (
    DEFAULT_LIMITS,
    MAX_BODY_DEPTH,
    MAX_KEY_BYTES,
    StateLimits,
)
from transaction_service.errors import FieldViolation, InvalidArgument, echo

ORDER_EVENT_TYPES = frozenset({"labtest.order.created", "labtest.order.updated"})

# The supported range of timestamps (UTC; the upper end excluded). Every accepted time converts
# to UTC and to a protobuf Timestamp without overflow, and none can equal the "never" sentinel
# (the first instant of year 1) that the state sorts missing times by.
EARLIEST_TIME = datetime(1900, 1, 1, tzinfo=UTC)
LATEST_TIME = datetime(9999, 1, 1, tzinfo=UTC)


class PayloadError(InvalidArgument):
    """The body cannot be accepted; `violations` says why, field by field."""


def _as_utc(value: datetime) -> datetime:
    try:
        # The provider sends offsets; a naive time is taken as UTC rather than as local time.
        utc = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:  # an offset that moves the time off the calendar (year 0 or 10000)
        utc = None
    if utc is None or not EARLIEST_TIME <= utc < LATEST_TIME:
        raise PydanticCustomError(
            "timestamp_out_of_range",
            "must be from 1900-01-01T00:00:00Z up to, not including, 9999-01-01T00:00:00Z",
        )
    return utc


def _limits(info: ValidationInfo) -> StateLimits:
    context = info.context
    return context["limits"] if context else DEFAULT_LIMITS


def _bounded(value: str, info: ValidationInfo) -> str:
    limit = _limits(info).max_string_length
    if len(value) > limit:
        raise PydanticCustomError(
            "string_over_limit",
            "is {length} characters long; the limit is max_string_length={limit}",
            {"length": len(value), "limit": limit},
        )
    return value


def _key(value: str, info: ValidationInfo) -> str:
    value = _bounded(value, info)
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > MAX_KEY_BYTES:
        raise PydanticCustomError(
            "key_over_limit",
            "is {size} bytes of UTF-8; an id is indexed and may be at most {limit}",
            {"size": size, "limit": MAX_KEY_BYTES},
        )
    return value


def _id(value: str, info: ValidationInfo) -> str:
    if not value.strip():
        raise PydanticCustomError("blank_id", "must contain a non-space character")
    return _key(value, info)


def _order_count(value: Any, info: ValidationInfo) -> Any:
    # Before validation: a block listing 50,000 orders is refused without validating each one.
    limit = _limits(info).max_orders_per_transaction
    if isinstance(value, list) and len(value) > limit:
        raise PydanticCustomError(
            "too_many_orders",
            "lists {count} orders; the limit is max_orders_per_transaction={limit}",
            {"count": len(value), "limit": limit},
        )
    return value


Timestamp = Annotated[datetime, AfterValidator(_as_utc)]
# A string the state keeps: at most `max_string_length` characters.
Text = Annotated[str, AfterValidator(_bounded)]
# An id: kept, indexed (at most MAX_KEY_BYTES), and with at least one non-space character.
Id = Annotated[str, AfterValidator(_id)]
# A user or team id: kept and indexed.
Key = Annotated[str, AfterValidator(_key)]


class _Lenient(BaseModel):
    # Unknown fields are ignored: the provider adds fields without notice.
    model_config = ConfigDict(extra="ignore", frozen=True)


class StatusEvent(_Lenient):
    """An entry of `data.events`: one status the order reached."""

    id: int
    created_at: Timestamp
    # "HIGH.METHOD.LOW", e.g. "collecting_sample.walk_in_test.redraw_available".
    status: Text


class TransactionOrderEntry(_Lenient):
    """An entry of `order_transaction.orders`: another order's summary, as of the payload's time."""

    id: Id
    low_level_status: Text | None = None
    low_level_status_created_at: Timestamp | None = None
    # The transaction endpoint names the status fields `last_status` / `last_status_created_at`.
    last_status: Text | None = None
    last_status_created_at: Timestamp | None = None
    origin: Text | None = None
    parent_id: Text | None = None
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

    id: Id
    status: Text | None = None
    orders: Annotated[list[TransactionOrderEntry], BeforeValidator(_order_count)] = Field(
        default_factory=list
    )


class Lab(_Lenient):
    slug: Text | None = None


class LabTest(_Lenient):
    name: Text | None = None
    method: Text | None = None
    lab: Lab | None = None


class OrderDetails(_Lenient):
    type: Text | None = None


class OrderData(_Lenient):
    """`data` of a `labtest.order.*` webhook: the whole order at one moment."""

    id: Id
    user_id: Key | None = None
    team_id: Key | None = None
    origin: Text | None = None
    # Deprecated high-level status (not kept: the events say more).
    status: str | None = None
    events: list[StatusEvent] | None = None
    last_event: StatusEvent | None = None
    details: OrderDetails | None = None
    lab_test: LabTest | None = None
    sample_id: Text | None = None
    has_missing_results: bool | None = None
    interpretation: Text | None = None
    created_at: Timestamp | None = None
    updated_at: Timestamp | None = None
    order_transaction: TransactionBlock | None = None


class Envelope(_Lenient):
    event_type: Text = Field(min_length=1)
    user_id: Key | None = None
    team_id: Key | None = None
    # The customer's own id for the user (not always a UUID); only the envelope carries it.
    client_user_id: Text | None = None
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
    """JSON with sorted keys and no spaces: the form a body's digest is taken of.

    Numbers must already be normalised (integral floats as ints): `decode_json_body` does it while
    decoding, `normalise_body` does it for a body that came as a protobuf Struct.
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class _ExponentFloat(float):
    """A float Python writes with an exponent (1e+16, 1e-05): the one place msgspec's JSON differs
    from `json.dumps`'s (1e16, 1e-5). Decoding marks such numbers with this type, which msgspec
    refuses to encode, so that `canonical_bytes` falls back to `json.dumps` for them."""


def _marked(value: float) -> float:
    magnitude = abs(value)
    return _ExponentFloat(value) if magnitude >= 1e16 or 0 < magnitude < 1e-4 else value


_CANONICAL = msgspec.json.Encoder(order="sorted")


def canonical_bytes(value: Any) -> bytes:
    """`canonical_json(value).encode()`, byte for byte, seven times faster: msgspec writes the
    same JSON (sorted keys, no spaces, UTF-8 unescaped) except for floats in exponent form, which
    decoding marks (`_ExponentFloat`) and which are then written by `json.dumps`."""
    try:
        return _CANONICAL.encode(value)
    except TypeError:
        return canonical_json(value).encode()


def normalise_body(body: dict[str, Any]) -> dict[str, Any]:
    """Check and normalise a body decoded elsewhere (from a protobuf Struct); raise PayloadError.

    It must nest at most MAX_BODY_DEPTH levels and hold only finite numbers (JSON has no NaN or
    Infinity). Integral floats become ints: a Struct carries every number as a double, so 9001 and
    9001.0 must come out alike for the two request forms to give the same digest.
    """
    if _deeper_than(body, MAX_BODY_DEPTH):
        raise PayloadError([_too_deep()])
    try:
        return _normalised(body)  # type: ignore[no-any-return]
    except _NotFinite:
        path, value = _first_non_finite(body)
        name = "NaN" if math.isnan(value) else "Infinity"
        raise PayloadError([FieldViolation(path, f"{name} is not a JSON number")]) from None


class _NotFinite(Exception):
    pass


def _normalised(value: Any) -> Any:
    # Recursive, but only over a body already known to nest at most MAX_BODY_DEPTH levels.
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        if math.isfinite(value):
            return _marked(value)
        raise _NotFinite
    if isinstance(value, dict):
        return {k: _normalised(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalised(v) for v in value]
    return value


def _first_non_finite(body: dict[str, Any]) -> tuple[str, float]:
    # Only on the error path: find where the bad number is, to name the field.
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, float) and not math.isfinite(node):
            return path, node
        if isinstance(node, dict):
            stack.extend((_key_path(path, k), v) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(node))
    raise AssertionError("no non-finite number in the body")


_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def _key_path(path: str, key: str) -> str:
    # Keys come from the caller: anything but a short plain name is quoted and truncated.
    if _PLAIN_KEY.fullmatch(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{echo(key, 40)}]"


def _deeper_than(body: dict[str, Any], limit: int) -> bool:
    """Whether objects and arrays nest more than `limit` levels (the body itself is level 1).

    Level by level, without recursion: the bodies this refuses would overflow a recursive walk.
    """
    level: list[Any] = [body]
    depth = 1
    while True:
        children = [
            child
            for node in level
            for child in (node.values() if isinstance(node, dict) else node)
            if isinstance(child, dict | list)
        ]
        if not children:
            return False
        depth += 1
        if depth > limit:
            return True
        level = children


def _too_deep() -> FieldViolation:
    return FieldViolation(
        "", f"nested deeper than {MAX_BODY_DEPTH} levels of objects and arrays (the limit)"
    )


# What a NUL character looks like in JSON text: the escape (a raw NUL is not valid JSON), as
# json.dumps and msgspec write it.
NUL_ESCAPE = "\\u0000"


def nul_violations(body: dict[str, Any]) -> list[FieldViolation]:
    """A violation for each string (key or value) of the body holding a NUL character (U+0000):
    PostgreSQL's text cannot hold one (error 22021), so neither store takes it."""
    found = []
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, str):
            if "\x00" in node:
                found.append(FieldViolation(path, _NUL_DESCRIPTION))
        elif isinstance(node, dict):
            for key, value in node.items():
                child = _key_path(path, key)
                if "\x00" in key:
                    found.append(FieldViolation(child, "the key " + _NUL_DESCRIPTION))
                stack.append((child, value))
        elif isinstance(node, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(node))
    return sorted(found, key=lambda v: v.field)


_NUL_DESCRIPTION = "contains a NUL character (U+0000), which the store cannot hold"


def body_digest(body: dict[str, Any]) -> str:
    try:
        encoded = canonical_bytes(body)
    except (UnicodeEncodeError, msgspec.EncodeError):
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
    if not math.isfinite(value):  # 1e400: valid JSON syntax, but no finite double
        raise ValueError(f"number {echo(text, 40)} is out of range")
    return int(value) if value.is_integer() else _marked(value)


def decode_json_body(text: str) -> dict[str, Any]:
    """Decode a raw body; it must be a JSON object (strict JSON: no NaN or Infinity), nested at
    most MAX_BODY_DEPTH levels."""
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_parse_float)
    except RecursionError:
        raise PayloadError([_too_deep()]) from None
    except ValueError as exc:
        raise PayloadError([FieldViolation("", f"body is not valid JSON: {exc}")]) from None
    if not isinstance(value, dict):
        kind = type(value).__name__ if value is not None else "null"
        raise PayloadError(
            [FieldViolation("", f"body must be a JSON object, got {_json_kind(kind)}")]
        )
    if _deeper_than(value, MAX_BODY_DEPTH):
        raise PayloadError([_too_deep()])
    return value


def _json_kind(python_kind: str) -> str:
    return {"list": "an array", "str": "a string", "int": "a number", "float": "a number"}.get(
        python_kind, python_kind
    )


def parse_event(
    body: dict[str, Any], digest: str | None = None, *, limits: StateLimits = DEFAULT_LIMITS
) -> ParsedEvent:
    """Turn a decoded body into a typed event, or raise PayloadError naming every bad field.

    `limits` bounds the strings and the transaction block's order list (see StateLimits).
    """
    digest = digest or body_digest(body)
    context = {"limits": limits}
    try:
        envelope = Envelope.model_validate(body, context=context)
        if envelope.event_type not in ORDER_EVENT_TYPES:
            return OtherEvent(event_type=envelope.event_type, digest=digest)
        parsed = OrderEnvelope.model_validate(body, context=context)
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
    # Input is echoed only quoted and truncated, so a message cannot reflect a large or hostile
    # value (or forge a log line).
    if isinstance(value, str):
        return echo(value)
    if isinstance(value, dict):
        return f"an object of {len(value)} keys"
    if isinstance(value, list):
        return f"an array of {len(value)} items"
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
