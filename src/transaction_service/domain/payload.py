"""Parsing Junction webhook bodies into typed events.

Lenient where the provider is loose (unknown fields and enum values are kept or ignored, envelope
fields may be missing, timestamps come as `...Z` or `...+00:00`), strict where a wrong type would
corrupt state (an order id that is not a string, an event id that is not an integer).
Every problem is reported as a `FieldViolation` naming the field, so callers can answer with a
`google.rpc.BadRequest`.

Two parsers, one behaviour. The hot path decodes a body with msgspec (JSON into Python values,
then `data` into the typed `Struct`s below, in C) and checks the limits in one walk over the
structs. The pydantic models (`...Model`) are the reference: a body the hot path does not take as
it is (a field of the wrong type, a value the lenient models coerce, a limit exceeded) is parsed
again by them, so what is accepted, how it is coerced and every violation's field and words are
theirs. Bodies that are refused, or need coercing, are rare; they pay for both.

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


# Ids that are path segments of their own: in a Junction API request's path
# (`/v3/order/{order_id}`) they would name another resource, however they are quoted.
DOT_SEGMENTS = frozenset({".", ".."})
DOT_SEGMENT_MESSAGE = "must not be `.` or `..`: it would change the path of a Junction API request"


def _id(value: str, info: ValidationInfo) -> str:
    if not value.strip():
        raise PydanticCustomError("blank_id", "must contain a non-space character")
    if value in DOT_SEGMENTS:
        raise PydanticCustomError("dot_segment_id", DOT_SEGMENT_MESSAGE)
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
# An id: kept, indexed (at most MAX_KEY_BYTES), with at least one non-space character, and not a
# dot segment.
Id = Annotated[str, AfterValidator(_id)]
# A user or team id: kept and indexed.
Key = Annotated[str, AfterValidator(_key)]


class _Lenient(BaseModel):
    # The reference parser (see the module's docstring); Junction's API answers use it too.
    # Unknown fields are ignored: the provider adds fields without notice. Each model's
    # validator is built on its first use, not at import: most processes (the hot path takes
    # nearly every body) never use them, and building them costs ~40 ms of a server's start.
    model_config = ConfigDict(extra="ignore", frozen=True, defer_build=True)


class StatusEventModel(_Lenient):
    """An entry of `data.events`: one status the order reached."""

    id: int
    created_at: Timestamp
    # "HIGH.METHOD.LOW", e.g. "collecting_sample.walk_in_test.redraw_available".
    status: Text


class TransactionOrderEntryModel(_Lenient):
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


class TransactionBlockModel(_Lenient):
    """`data.order_transaction`: the transaction as Junction saw it when it built the payload."""

    id: Id
    status: Text | None = None
    orders: Annotated[list[TransactionOrderEntryModel], BeforeValidator(_order_count)] = Field(
        default_factory=list
    )


class LabModel(_Lenient):
    slug: Text | None = None


class LabTestModel(_Lenient):
    name: Text | None = None
    method: Text | None = None
    lab: LabModel | None = None


class OrderDetailsModel(_Lenient):
    type: Text | None = None


class OrderDataModel(_Lenient):
    """`data` of a `labtest.order.*` webhook: the whole order at one moment."""

    id: Id
    user_id: Key | None = None
    team_id: Key | None = None
    origin: Text | None = None
    # Deprecated high-level status (not kept: the events say more).
    status: str | None = None
    events: list[StatusEventModel] | None = None
    last_event: StatusEventModel | None = None
    details: OrderDetailsModel | None = None
    lab_test: LabTestModel | None = None
    sample_id: Text | None = None
    has_missing_results: bool | None = None
    interpretation: Text | None = None
    created_at: Timestamp | None = None
    updated_at: Timestamp | None = None
    order_transaction: TransactionBlockModel | None = None


class Envelope(_Lenient):
    event_type: Text = Field(min_length=1)
    user_id: Key | None = None
    team_id: Key | None = None
    # The customer's own id for the user (not always a UUID); only the envelope carries it.
    client_user_id: Text | None = None
    data: Any = None


class OrderEnvelope(Envelope):
    data: OrderDataModel


# -- the typed structs the hot path decodes into (the same fields as the models above) -----------


def _utc(value: datetime) -> datetime:
    """As `_as_utc`, for the structs: a failure sends the body to the reference parser."""
    try:
        utc = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:  # an offset that moves the time off the calendar
        raise ValueError("timestamp out of range") from None
    if not EARLIEST_TIME <= utc < LATEST_TIME:
        raise ValueError("timestamp out of range")
    return utc


class StatusEvent(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    created_at: datetime
    status: str

    def __post_init__(self) -> None:
        msgspec.structs.force_setattr(self, "created_at", _utc(self.created_at))


class TransactionOrderEntry(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    low_level_status: str | None = None
    low_level_status_created_at: datetime | None = None
    last_status: str | None = None
    last_status_created_at: datetime | None = None
    origin: str | None = None
    parent_id: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None

    def __post_init__(self) -> None:
        for name in _ENTRY_TIMES:
            value = getattr(self, name)
            if value is not None:
                msgspec.structs.force_setattr(self, name, _utc(value))

    @property
    def status(self) -> str | None:
        return self.low_level_status or self.last_status

    @property
    def status_created_at(self) -> datetime | None:
        return self.low_level_status_created_at or self.last_status_created_at


_ENTRY_TIMES = (
    "low_level_status_created_at",
    "last_status_created_at",
    "created_at",
    "updated_at",
)


class TransactionBlock(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    status: str | None = None
    orders: list[TransactionOrderEntry] = msgspec.field(default_factory=list)


class Lab(msgspec.Struct, frozen=True, kw_only=True):
    slug: str | None = None


class LabTest(msgspec.Struct, frozen=True, kw_only=True):
    name: str | None = None
    method: str | None = None
    lab: Lab | None = None


class OrderDetails(msgspec.Struct, frozen=True, kw_only=True):
    type: str | None = None


class OrderData(msgspec.Struct, frozen=True, kw_only=True):
    """`data` of a `labtest.order.*` webhook: the whole order at one moment."""

    id: str
    user_id: str | None = None
    team_id: str | None = None
    origin: str | None = None
    status: str | None = None
    events: list[StatusEvent] | None = None
    last_event: StatusEvent | None = None
    details: OrderDetails | None = None
    lab_test: LabTest | None = None
    sample_id: str | None = None
    has_missing_results: bool | None = None
    interpretation: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    order_transaction: TransactionBlock | None = None

    def __post_init__(self) -> None:
        for name in ("created_at", "updated_at"):
            value = getattr(self, name)
            if value is not None:
                msgspec.structs.force_setattr(self, name, _utc(value))


def _text_ok(value: str | None, limit: int) -> bool:
    return value is None or len(value) <= limit


def _key_ok(value: str | None, limit: int) -> bool:
    return value is None or (
        len(value) <= limit and len(value.encode("utf-8", "surrogatepass")) <= MAX_KEY_BYTES
    )


def _id_ok(value: str, limit: int) -> bool:
    return bool(value.strip()) and value not in DOT_SEGMENTS and _key_ok(value, limit)


def _within_limits(order: OrderData, limits: StateLimits) -> bool:
    """Whether every string and list of `order` is within `limits`, as the models check them."""
    n = limits.max_string_length
    if not (
        _id_ok(order.id, n)
        and _key_ok(order.user_id, n)
        and _key_ok(order.team_id, n)
        and _text_ok(order.origin, n)
        and _text_ok(order.sample_id, n)
        and _text_ok(order.interpretation, n)
    ):
        return False
    events = [*(order.events or ()), *((order.last_event,) if order.last_event else ())]
    if any(len(e.status) > n for e in events):
        return False
    if order.details is not None and not _text_ok(order.details.type, n):
        return False
    test = order.lab_test
    if test is not None and not (
        _text_ok(test.name, n)
        and _text_ok(test.method, n)
        and (test.lab is None or _text_ok(test.lab.slug, n))
    ):
        return False
    block = order.order_transaction
    if block is None:
        return True
    if not (_id_ok(block.id, n) and _text_ok(block.status, n)):
        return False
    if len(block.orders) > limits.max_orders_per_transaction:
        return False
    return all(
        _id_ok(e.id, n)
        and _text_ok(e.low_level_status, n)
        and _text_ok(e.last_status, n)
        and _text_ok(e.origin, n)
        and _text_ok(e.parent_id, n)
        for e in block.orders
    )


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


def _canonical_checked(body: dict[str, Any]) -> bytes:
    """`canonical_bytes(body)`, or PayloadError if the body holds no text at all."""
    try:
        return canonical_bytes(body)
    except (UnicodeEncodeError, msgspec.EncodeError):
        # json.loads accepts escapes such as "\ud800" that are no text at all.
        raise PayloadError(
            [FieldViolation("", "body is not valid JSON text: it has an unpaired surrogate escape")]
        ) from None


def body_digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical_checked(body)).hexdigest()


def digest_of(body: dict[str, Any]) -> tuple[str, bytes]:
    """The body's digest and its canonical bytes (see `parse_event`'s `canonical`)."""
    canonical = _canonical_checked(body)
    return hashlib.sha256(canonical).hexdigest(), canonical


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON value")


def _parse_float(text: str) -> float | int:
    # Integral floats become ints while decoding, so a decoded body is already canonical as far as
    # numbers go and canonical_json need not walk it.
    value = float(text)
    if not math.isfinite(value):  # 1e400: valid JSON syntax, but no finite double
        raise ValueError(f"number {echo(text, 40)} is out of range")
    return int(value) if value.is_integer() else _marked(value)


def _fast_float(text: str) -> float | int:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("out of range")  # the reference decode says so in its words
    return int(value) if value.is_integer() else _marked(value)


# Decodes what `json.loads` does into the same values (integral floats as ints, as
# `_parse_float`), about three times faster; on anything it refuses, the reference decode runs.
_FAST_JSON = msgspec.json.Decoder(float_hook=_fast_float)


def decode_json_body(text: str) -> dict[str, Any]:
    """Decode a raw body; it must be a JSON object (strict JSON: no NaN or Infinity), nested at
    most MAX_BODY_DEPTH levels."""
    try:
        fast = _FAST_JSON.decode(text)
    except (msgspec.DecodeError, ValueError, RecursionError):
        fast = None
    if isinstance(fast, dict):
        # A body nested N levels has at least N opening brackets: most bodies need no walk.
        brackets = text.count("{") + text.count("[")
        if brackets > MAX_BODY_DEPTH and _deeper_than(fast, MAX_BODY_DEPTH):
            raise PayloadError([_too_deep()])
        return fast
    return _decode_json_body_reference(text)


def _decode_json_body_reference(text: str) -> dict[str, Any]:
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


# Seconds with more than six decimals: msgspec rounds them to microseconds, the models truncate.
_LONG_FRACTION = re.compile(rb":\d\d\.\d{7}")


def parse_event(
    body: dict[str, Any],
    digest: str | None = None,
    *,
    limits: StateLimits = DEFAULT_LIMITS,
    canonical: bytes | None = None,
) -> ParsedEvent:
    """Turn a decoded body into a typed event, or raise PayloadError naming every bad field.

    `limits` bounds the strings and the transaction block's order list (see StateLimits).
    `canonical` is the body's `canonical_bytes`, if the caller has them.
    """
    if canonical is None:
        canonical = _canonical_checked(body)
    digest = digest or hashlib.sha256(canonical).hexdigest()
    if _LONG_FRACTION.search(canonical) is None:
        fast = _fast_event(body, digest, limits)
        if fast is not None:
            return fast
    return _reference_event(body, digest, limits)


def _fast_event(body: dict[str, Any], digest: str, limits: StateLimits) -> ParsedEvent | None:
    """The event, parsed into the structs; None if the reference parser must decide."""
    n = limits.max_string_length
    event_type = body.get("event_type")
    if type(event_type) is not str or not event_type or len(event_type) > n:
        return None
    user_id, team_id = body.get("user_id"), body.get("team_id")
    client_user_id = body.get("client_user_id")
    for value in (user_id, team_id, client_user_id):
        if value is not None and type(value) is not str:
            return None
    if not (_key_ok(user_id, n) and _key_ok(team_id, n) and _text_ok(client_user_id, n)):
        return None
    if event_type not in ORDER_EVENT_TYPES:
        return OtherEvent(event_type=event_type, digest=digest)
    try:
        order = msgspec.convert(body.get("data"), OrderData)
    except msgspec.ValidationError:
        return None
    if not _within_limits(order, limits):
        return None
    return OrderEvent(
        event_type=event_type,
        order=order,
        user_id=user_id,
        team_id=team_id,
        client_user_id=client_user_id,
        digest=digest,
    )


def _reference_event(body: dict[str, Any], digest: str, limits: StateLimits) -> ParsedEvent:
    """The event as the pydantic models parse it (the reference), or their violations."""
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
        # What the models took (coerced where they are lenient) is what the struct holds.
        order=msgspec.convert(parsed.data.model_dump(), OrderData),
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
