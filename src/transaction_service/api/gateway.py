"""Every gRPC call's way in: one generic handler finds the call's handler, in place of
interceptors.

For each call, grpc.aio asks `Gateway.service` for the method's handler. It notes the call's
arrival (`api/drain.py`, for draining), checks the call's token when tokens are configured (a
refused call gets a handler that refuses it without reading its request, `api/auth.py`), and
returns the method's handler, wrapped once, at registration, with the request id, metrics and
access lines of `api/access.py` (refusing handlers too, so refused calls are counted and logged).

Why not interceptors: grpc.aio runs a server's interceptors as a chain of coroutines for every
call, and an interceptor that wraps the handler must make a new one each time; here a call costs
a dictionary lookup. Measured on GetTransaction against the two interceptors this replaced, the
server's CPU per call fell by 7 to 18 us (docs/performance.md, "Access lines").
Tracing's interceptor (`tracing.py`, when tracing is on) still runs before this, so its span
covers the call and access lines carry its trace id.

Services are registered here, not with the server (`add`): a service registered with the
server directly would bypass the gateway, its calls unobserved and unguarded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc

from transaction_service.api.access import CallObserver
from transaction_service.api.auth import refusal, refusing
from transaction_service.api.drain import CallArrivals
from transaction_service.auth import BearerTokens

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler


class Gateway(grpc.GenericRpcHandler):
    def __init__(
        self, observer: CallObserver, arrivals: CallArrivals, tokens: BearerTokens
    ) -> None:
        self._observer = observer
        self._arrivals = arrivals
        self._tokens = tokens
        # Full method name -> (the handler as registered, the handler observed).
        self._handlers: dict[str, tuple[Handler, Handler]] = {}

    def add(self, service: str, handlers: dict[str, Handler]) -> None:
        """Serve `handlers` (by method name) as the methods of `service` (its full name)."""
        for name, handler in handlers.items():
            method = f"/{service}/{name}"
            handler = self._arrivals.wrap(method, handler)
            self._handlers[method] = handler, self._observer.wrap(method, handler)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        self._arrivals.arrived()
        method = handler_call_details.method
        found = self._handlers.get(method)
        if found is None:
            return None  # an unknown method: gRPC answers UNIMPLEMENTED
        if self._tokens.required:
            refused = refusal(self._tokens, method, handler_call_details.invocation_metadata)
            if refused is not None:
                return self._observer.wrap(method, refusing(found[0], refused))
        return found[1]

    def add_generated(self, add_to_server: Any, servicer: Any) -> None:
        """Serve `servicer` as generated code registers it with a server
        (`add_..._to_server(servicer, server)`), but through the gateway."""
        collector = _Collector()
        add_to_server(servicer, collector)
        if collector.generic and not collector.services:
            raise RuntimeError(f"{add_to_server.__name__} did not name its methods")
        for service, handlers in collector.services.items():
            self.add(service, handlers)


class _Collector:
    """Stands in for a server to generated `add_..._to_server` functions: they register each
    service twice, as a generic handler and by method name; the names are kept."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, Handler]] = {}
        self.generic = 0

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Handler]) -> None:
        self.services.setdefault(service, {}).update(handlers)

    def add_generic_rpc_handlers(self, generic_handlers: Any) -> None:
        self.generic += 1
