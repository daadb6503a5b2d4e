"""The HTTP listener: Junction's webhooks, Prometheus metrics and the probes.

It runs on aiohttp in the event loop of the gRPC server, takes the same `App`, and hands webhooks
to the same use case as `IngestEvent` (`decode_delivery`, then `Ingestor.ingest`). Routes:

- `POST /webhooks/junction`: a Svix-signed webhook; 200 with the outcome after the commit.
- `GET /metrics`: Prometheus text format (needs a token when tokens are configured).
- `GET /healthz`: the process is alive. `GET /readyz`: started, not shutting down, and the store
  can write.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any

from aiohttp import web

from transaction_service import logs, tracing
from transaction_service.api.access import REQUEST_ID_KEY, new_request_id, usable_request_id
from transaction_service.app import App, StartupError
from transaction_service.auth import BearerTokens, Role
from transaction_service.config import Settings
from transaction_service.domain.payload import PayloadError
from transaction_service.errors import (
    FieldViolation,
    InvalidArgument,
    Reason,
    ServiceError,
    TooLarge,
)
from transaction_service.errors import Unavailable as ServiceUnavailable
from transaction_service.http.errors import (
    REFUSAL_LISTENER,
    Handler,
    json_errors,
    reason_of,
    status_for,
)
from transaction_service.http.guard import (
    LINGER_SECONDS,
    BodySlots,
    Connections,
    EdgeLimits,
    JsonErrors,
    MalformedRequests,
    ResponseWritten,
    Shedding,
    connection_cap,
    guarded_requests,
)
from transaction_service.http.webhooks import WebhookVerifier, event_id_header
from transaction_service.usecases.admission import Flow, Lane
from transaction_service.usecases.ingest import IngestorStopped, decode_delivery

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/webhooks/junction"
WEBHOOK_ROUTE = "webhook"
# Field names of a bad body: decode_delivery names them after IngestEvent's field.
_GRPC_BODY_FIELD = "payload_json"
_HTTP_BODY_FIELD = "body"
_READ_CHUNK = 64 * 1024
# Connections waiting to be accepted (the kernel holds them, not the process): room for a burst,
# so that a flood of connections does not leave a real webhook's SYN unanswered for a second.
_BACKLOG = 1024
# Webhooks come from Svix alone (they are signed): one flow of the webhook lane.
WEBHOOK_FLOW = Flow(Lane.WEBHOOK, "webhook")


class WebhookReceiver:
    """`POST /webhooks/junction`: check size and signature, then ingest like IngestEvent."""

    def __init__(self, app: App, bodies: BodySlots) -> None:
        settings = app.settings
        self._app = app
        self._bodies = bodies
        self._limit = settings.max_body_bytes
        self._allow_unsigned = settings.webhook_allow_unsigned
        self._deadline = settings.webhook_deadline_seconds
        self._verifier = (
            WebhookVerifier(settings.webhook_secrets) if settings.webhook_secrets else None
        )

    async def handle(self, request: web.Request) -> web.Response:
        arrived = time.monotonic()
        if self._app.stopping:
            raise IngestorStopped
        if self._verifier is None and not self._allow_unsigned:
            # 503, not 404: the URL is right and Svix keeps retrying, so nothing is lost while
            # an operator adds the secret.
            raise ServiceUnavailable(
                "the webhook endpoint is off: no webhook secret is configured on this server",
                reason=Reason.WEBHOOKS_DISABLED,
            )
        if request.content_length is not None and request.content_length > self._limit:
            raise _too_large(self._limit)
        signed = self._verifier.check_headers(request.headers) if self._verifier else None
        body = await _read_body(request, self._limit, self._bodies)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument(
                [FieldViolation(_HTTP_BODY_FIELD, "not UTF-8 text; a webhook body is JSON")]
            ) from None
        if self._verifier is not None and signed is not None:
            with tracing.span("verify webhook signature"):
                self._verifier.verify(signed, text)
            event_id = signed.id
        else:
            event_id = event_id_header(request.headers)
        try:
            delivery = decode_delivery(
                event_id,
                payload_json=text,
                max_body_bytes=self._limit,
                source="webhook",
                limits=self._app.limits,
            )
        except PayloadError as exc:
            id_header = "svix-id" if request.headers.get("svix-id") else "webhook-id"
            raise InvalidArgument([_http_field(v, id_header) for v in exc.violations]) from None
        # Svix stops waiting after 15 s: a webhook still queued by then is dropped unstored,
        # rather than committed for nobody and delaying the webhooks after it.
        result = await self._app.ingestor.ingest(
            delivery,
            flow=WEBHOOK_FLOW,
            time_remaining=self._deadline - (time.monotonic() - arrived),
        )
        return web.json_response(
            {
                "outcome": result.outcome.value,
                "event_id": result.event_id,
                "revision": result.revision,
                "transaction_id": result.transaction.view.id if result.transaction else None,
            }
        )


def _too_large(limit: int) -> TooLarge:
    return TooLarge(f"the body is larger than {limit} bytes, the limit of this server")


async def _read_body(request: web.Request, limit: int, bodies: BodySlots) -> bytes:
    """The whole body, refused as soon as it passes `limit` (a chunked body has no length).

    A body still arriving takes one of the listener's few body slots, and has until its
    deadline: a signature can only be checked on the whole body, so until then the bytes are
    anyone's. A body already whole when its head was read needs neither."""
    if request.content.is_eof():
        return await _read_all(request, limit)
    with bodies.slot() as seconds:
        try:
            async with asyncio.timeout(seconds):
                return await _read_all(request, limit)
        except TimeoutError:
            raise bodies.timed_out() from None


async def _read_all(request: web.Request, limit: int) -> bytes:
    chunks, size = [], 0
    while chunk := await request.content.read(_READ_CHUNK):
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _http_field(violation: FieldViolation, id_header: str) -> FieldViolation:
    """`payload_json.data.id` -> `body.data.id`, `event_id` -> the header that carried it
    (`svix-id` or `webhook-id`): the field as an HTTP caller knows it."""
    field = violation.field
    if field == _GRPC_BODY_FIELD or field.startswith(_GRPC_BODY_FIELD + "."):
        field = _HTTP_BODY_FIELD + field.removeprefix(_GRPC_BODY_FIELD)
    elif field == "event_id":
        field = id_header
    return FieldViolation(field, violation.description)


class Operations:
    """`/metrics`, `/healthz` and `/readyz`."""

    def __init__(self, app: App) -> None:
        self._app = app
        self._tokens = BearerTokens(app.settings.ingest_tokens, app.settings.read_tokens)

    async def metrics(self, request: web.Request) -> web.Response:
        # The HTTP port faces the internet for webhooks: with tokens configured, metrics (volumes,
        # refusals) are a read like any other and need a read or ingest token.
        self._tokens.authorize(request.headers.get("Authorization"), Role.READ)
        response = web.Response(body=self._app.metrics.exposition())
        response.headers["Content-Type"] = self._app.metrics.content_type
        return response

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(self, request: web.Request) -> web.Response:
        if self._app.ready:
            return web.json_response({"status": "ready"})
        if self._app.stopping:
            why = "shutting down"
        elif not self._app.started:
            why = "starting"
        else:
            failing = ", ".join(self._app.store.health.failing)
            why = f"the store cannot write ({failing})"
        return web.json_response({"status": "not ready", "reason": why}, status=503)


def observe(app: App) -> Any:
    """Middleware: a request id for every request (the caller's `X-Request-Id` when usable,
    else a new one; set for the request's log lines, in error bodies and sent back as
    `X-Request-Id`), and the HTTP metrics by route and status."""
    metrics = app.metrics

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get(REQUEST_ID_KEY, "")
        request_id = given if usable_request_id(given) else new_request_id()
        token = logs.request_id.set(request_id)
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            if not response.prepared:
                response.headers["X-Request-Id"] = request_id
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else "other"
            metrics.http_answered(route, request.method, status, time.perf_counter() - started)
            logs.request_id.reset(token)

    return middleware


def build_http_app(app: App, bodies: BodySlots) -> web.Application:
    """The aiohttp application for `app`: routes, error mapping, refusal accounting, request
    ids and metrics. With tracing on, its middleware comes first (tracing.configure), so every
    log line of a request has its trace."""
    http = web.Application(
        middlewares=[observe(app), guarded_requests, json_errors],
        client_max_size=app.settings.max_body_bytes,
    )
    receiver = WebhookReceiver(app, bodies)
    operations = Operations(app)
    http.router.add_post(WEBHOOK_PATH, receiver.handle, name=WEBHOOK_ROUTE)
    http.router.add_get("/metrics", operations.metrics)
    http.router.add_get("/healthz", operations.healthz)
    http.router.add_get("/readyz", operations.readyz)

    def refused(request: web.Request, refusal: ServiceError) -> None:
        if request.match_info.route.name != WEBHOOK_ROUTE:
            return
        reason = reason_of(refusal)
        app.metrics.webhook_refused(reason)
        fields: dict[str, Any] = {
            "status": status_for(refusal)[0],
            "reason": reason,
            "event_id": event_id_header(request.headers) or None,
        }
        log.info("webhook refused", extra={"fields": fields})

    async def anonymous_server_header(request: web.Request, response: web.StreamResponse) -> None:
        # The port faces the internet: do not advertise library and Python versions.
        response.headers["Server"] = "transaction-service"

    http[REFUSAL_LISTENER] = refused
    http.on_response_prepare.append(anonymous_server_header)
    return http


def webhook_mode(settings: Settings) -> str:
    """`signed`, `unsigned` (local development) or `off`: how `POST /webhooks/junction` works."""
    if settings.webhook_secrets:
        return "signed"
    return "unsigned" if settings.webhook_allow_unsigned else "off"


class HttpListener:
    """Binds the HTTP port (`bind`, before the app starts, so a port in use stops the start
    early), serves (`start`) and drains (`stop`). Every connection goes through the guard of
    http/guard.py: the limits of docs/limits.md."""

    def __init__(self, app: App) -> None:
        self._app = app
        self._socket: socket.socket | None = None
        self._runner: web.AppRunner | None = None
        self._shedding: Shedding | None = None
        self.port = 0
        self.max_connections, self.fd_limit = connection_cap(app.settings.http_max_connections)

    def bind(self) -> int:
        settings = self._app.settings
        host = settings.http_host.strip("[]")
        address = f"{settings.http_host}:{settings.http_port}"
        try:
            if ":" in host:
                # Like gRPC's [::]: one socket for IPv6 and IPv4 (asyncio would make two, which
                # with port 0 get two different ports).
                self._socket = socket.create_server(
                    (host, settings.http_port),
                    family=socket.AF_INET6,
                    dualstack_ipv6=host == "::",
                    backlog=_BACKLOG,
                )
            else:
                self._socket = socket.create_server((host, settings.http_port), backlog=_BACKLOG)
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {address} for HTTP: {exc.strerror or exc} "
                "(is another transaction-service running? set --http-port)"
            ) from None
        self.port = self._socket.getsockname()[1]
        return self.port

    async def start(self) -> None:
        assert self._socket is not None, "bind() first"
        settings, metrics = self._app.settings, self._app.metrics
        limits = EdgeLimits.of(settings, self.max_connections)
        self._shedding = Shedding(
            metrics, {"connection": limits.max_connections, "body": settings.http_max_body_reads}
        )
        bodies = BodySlots(
            settings.http_max_body_reads,
            settings.http_body_timeout_seconds,
            self._shedding,
            metrics,
        )
        logging.getLogger("aiohttp.server").addFilter(_MALFORMED)
        # Each connection's protocol (aiohttp's RequestHandler, as JsonErrors).
        protocol: dict[str, Any] = dict(
            # Not an access log (webhook outcomes are logged one line each): the guard's signal
            # that a response is written.
            access_log_class=ResponseWritten,
            access_log=log,
            # The guard closes idle and slow connections; aiohttp's own timer is a backstop.
            keepalive_timeout=limits.idle_timeout + limits.head_timeout,
            lingering_time=LINGER_SECONDS,
            # The guard refuses a head past max_head_bytes with 431 before any line of it can
            # pass aiohttp's own limits (which would answer 400).
            max_line_size=limits.max_head_bytes,
            max_field_size=limits.max_head_bytes,
        )
        self._runner = web.AppRunner(
            build_http_app(self._app, bodies),
            handle_signals=False,
            shutdown_timeout=settings.shutdown_grace_seconds,
            **protocol,
        )
        await self._runner.setup()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        connections = Connections(
            limits,
            lambda: JsonErrors(server, loop=loop, **protocol),
            self._shedding,
            metrics,
        )
        await _GuardedSite(self._runner, self._socket, connections).start()

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (up to the grace period), close."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._shedding is not None:
            self._shedding.close()
            self._shedding = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None


_MALFORMED = MalformedRequests()


class _GuardedSite(web.BaseSite):
    """aiohttp's site for a socket we bound, with every connection behind a `ConnectionGuard`."""

    def __init__(self, runner: web.AppRunner, sock: socket.socket, connections: Connections):
        super().__init__(runner, backlog=_BACKLOG)
        self._sock = sock
        self._connections = connections

    @property
    def name(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"http://{host}:{port}"

    async def start(self) -> None:
        await super().start()
        self._server = await asyncio.get_running_loop().create_server(
            self._connections, sock=self._sock, backlog=self._backlog
        )
