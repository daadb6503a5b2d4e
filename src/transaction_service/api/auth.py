"""The gRPC side of bearer tokens: every TransactionService call's token is checked before its
handler runs (by `api/gateway.py`, which finds each call's handler).

Unary and streaming calls alike: a refused call is answered by a handler of the same shape that
aborts with UNAUTHENTICATED or PERMISSION_DENIED before the real handler runs. Health and
reflection are not guarded, so probes and `grpcurl list` / `describe` keep working.

Reads are listed by name; every other method of the service needs an ingest token, so a write
method added later is closed to read tokens until someone decides otherwise.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import TypeVar

import grpc

from transaction_service.api.errors import Context, abort
from transaction_service.auth import BearerTokens, Role
from transaction_service.errors import ServiceError
from transactions.v1 import transactions_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TransactionService"].full_name
READ_METHODS = frozenset(
    {
        "GetTransaction",
        "ListTransactions",
        "WatchTransaction",
        "WatchTransactions",
        "Watch",
        "BatchGetTransactions",
        "GetTransactionResults",
        "GetTransactionResultsPdf",
        # Bodies (patient data) only to an ingest token: checked by the method itself.
        "ListTransactionEvents",
    }
)


def role_needed(method: str) -> Role | None:
    """The role a full method name (`/package.Service/Method`) needs; None if unguarded."""
    service, _, name = method.lstrip("/").partition("/")
    if service != SERVICE_NAME:
        return None
    return Role.READ if name in READ_METHODS else Role.INGEST


Request = TypeVar("Request")
Response = TypeVar("Response")


def refusal(
    tokens: BearerTokens, method: str, metadata: Iterable[tuple[str, str | bytes]] | None
) -> ServiceError | None:
    """Why a call of `method` (its full name) with `metadata` is refused; None if it may go on
    (tokens are not configured, the method is not guarded, or its token allows it)."""
    if not tokens.required:
        return None
    needed = role_needed(method)
    if needed is None:
        return None
    authorization = None
    for key, value in metadata or ():
        if key == "authorization":
            authorization = value if isinstance(value, str) else None
            break
    try:
        tokens.authorize(authorization, needed)
    except ServiceError as refused:
        return refused
    return None


def refusing(
    handler: grpc.RpcMethodHandler[Request, Response], refusal: ServiceError
) -> grpc.RpcMethodHandler[Request, Response]:
    """A handler that answers a call of `handler`'s method with `refusal` without reading, let
    alone decoding, its request: whatever a caller without a token sends costs no more than the
    HTTP/2 flow-control window of its stream (a 4 MiB wide Struct decoded costs several times
    its size, and a tenth of a second of CPU). It is registered as request-streaming whatever
    the method's shape: on the wire a call is the same either way, but only a request-streaming
    handler runs before the request message has arrived."""

    async def unary_response(requests: AsyncIterator[Request], context: Context) -> Response:
        await abort(context, refusal)

    async def stream_response(
        requests: AsyncIterator[Request], context: Context
    ) -> AsyncIterator[Response]:
        await abort(context, refusal)
        yield  # pragma: no cover (abort raises; the yield makes this a generator)

    # No request deserializer: nothing is read, so nothing would be decoded anyway.
    serializer = handler.response_serializer
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            stream_response, response_serializer=serializer
        )
    return grpc.stream_unary_rpc_method_handler(unary_response, response_serializer=serializer)
