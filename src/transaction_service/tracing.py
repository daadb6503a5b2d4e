"""OpenTelemetry tracing, configured by the standard `OTEL_*` environment variables.

Off unless an exporter is configured: `OTEL_TRACES_EXPORTER` (`otlp` or `console`) or an OTLP
endpoint (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) turns it on;
`OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` keeps it off whatever else is set. Off,
the SDK is not even imported, and the ingest path pays one test of `enabled` per delivery.

On (`configure`):

- a tracer provider whose resource comes from `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`
  (`service.name` defaults to transaction-service; `service.version` is the package's), whose
  sampler comes from `OTEL_TRACES_SAMPLER(_ARG)` (default: parent-based, always on), with a batch
  span processor (`OTEL_BSP_*`) and the exporter: OTLP over `http/protobuf` (the specification's
  default) or `grpc` (`OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL`), whose endpoint, headers,
  certificates, compression and timeout the exporter reads from its `OTEL_EXPORTER_OTLP_*`
  variables; or `console`, spans as JSON on stdout (logs go to stderr);
- propagation by `OTEL_PROPAGATORS` (default W3C `tracecontext,baggage`): a webhook's
  `traceparent` header and a gRPC call's `traceparent` metadata continue the caller's trace;
- the instrumentation packages of the libraries a call passes through: the grpc.aio server
  (`interceptors()`), the aiohttp server (its middleware goes first in every application made
  after `configure`), asyncpg and httpx;
- the service's own spans (`span()`): a webhook's signature check, each delivery's `ingest` with
  its `queue wait` and `commit`, the group commit of a batch (`commit batch`, with its size and a
  link to every delivery's span, each of which links back), the store commit and the publish to
  watchers, and each Junction API call;
- log lines written inside a span carry its `trace_id` and `span_id` (`logs.context_fields`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from transaction_service import logs

if TYPE_CHECKING:
    import grpc
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, SpanContext, Tracer

DEFAULT_SERVICE_NAME = "transaction-service"
PROTOCOLS = ("http/protobuf", "grpc")
EXPORTERS = ("otlp", "console", "none")

enabled = False
_tracer: Tracer | None = None
_provider: TracerProvider | None = None


class TracingConfigError(Exception):
    """An OTEL_* variable with a value this service cannot use; one line for the operator."""


def _env(environ: Mapping[str, str], name: str) -> str:
    return environ.get(name, "").strip()


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment configures an exporter (and does not disable the SDK)."""
    if _env(environ, "OTEL_SDK_DISABLED").lower() == "true":
        return False
    exporter = _env(environ, "OTEL_TRACES_EXPORTER").lower()
    if exporter:
        return exporter != "none"
    return bool(
        _env(environ, "OTEL_EXPORTER_OTLP_ENDPOINT")
        or _env(environ, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def _exporter(environ: Mapping[str, str]) -> SpanExporter:
    names = [n.strip().lower() for n in _env(environ, "OTEL_TRACES_EXPORTER").split(",") if n]
    name = names[0] if names else "otlp"
    if len(names) > 1 or name not in EXPORTERS:
        raise TracingConfigError(
            f"OTEL_TRACES_EXPORTER={_env(environ, 'OTEL_TRACES_EXPORTER')!r}: this service "
            f"exports to one of {', '.join(EXPORTERS)}"
        )
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    protocol = (
        _env(environ, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or _env(environ, "OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpSpanExporter,
        )

        return HttpSpanExporter()
    raise TracingConfigError(
        f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: this service speaks "
        f"{' or '.join(PROTOCOLS)} (http/json is not supported)"
    )


def configure(environ: Mapping[str, str] = os.environ, version: str = "") -> bool:
    """Turn tracing on if the environment configures an exporter; whether it is on. Raises
    TracingConfigError for a value that cannot work. Call once, before the server is built."""
    global enabled, _tracer, _provider
    if not wanted(environ):
        return False
    exporter = _exporter(environ)

    from opentelemetry import trace
    from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes: dict[str, str] = {"service.version": version} if version else {}
    named = _env(environ, "OTEL_SERVICE_NAME") or "service.name=" in _env(
        environ, "OTEL_RESOURCE_ATTRIBUTES"
    )
    if not named:
        attributes["service.name"] = DEFAULT_SERVICE_NAME
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    # Every aiohttp Application made from now on gets the tracing middleware first.
    AioHttpServerInstrumentor().instrument(tracer_provider=provider)
    # The asyncpg and grpc instrumentations ship no type information for these.
    AsyncPGInstrumentor().instrument(tracer_provider=provider)  # type: ignore[no-untyped-call]
    HTTPXClientInstrumentor().instrument(tracer_provider=provider)
    _provider = provider
    _tracer = provider.get_tracer("transaction_service", version or None)
    enabled = True
    current_span = trace.get_current_span

    def log_fields() -> dict[str, str]:
        found = current_span().get_span_context()
        if not found.is_valid:
            return {}
        return {"trace_id": f"{found.trace_id:032x}", "span_id": f"{found.span_id:016x}"}

    logs.context_fields = log_fields
    return True


def shutdown() -> None:
    """Export the spans still buffered (at the end of `serve`)."""
    if _provider is not None:
        _provider.shutdown()


def interceptors() -> list[grpc.aio.ServerInterceptor]:
    """The grpc.aio server interceptor of the instrumentation package, when tracing is on."""
    if not enabled:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(tracer_provider=_provider)]  # type: ignore[no-untyped-call]


@contextlib.contextmanager
def span(
    name: str,
    attributes: Mapping[str, str | int | bool] | None = None,
    *,
    links: Sequence[SpanContext] = (),
    root: bool = False,
) -> Iterator[Span | None]:
    """A span of the service's own around the block, current inside it (None when tracing is
    off). `root`: start a trace of its own rather than continue the current one."""
    if _tracer is None:
        yield None
        return
    from opentelemetry.context import Context
    from opentelemetry.trace import Link

    with _tracer.start_as_current_span(
        name,
        context=Context() if root else None,
        attributes=dict(attributes or {}),
        links=[Link(link) for link in links],
    ) as current:
        yield current


def past_span(
    name: str,
    parent: Span,
    start_ns: int,
    end_ns: int,
    attributes: Mapping[str, str | int | bool] | None = None,
    links: Sequence[SpanContext] = (),
) -> None:
    """Record a span that already happened, as a child of `parent` (e.g. a delivery's wait in
    the queue, recorded by the commit loop once its batch committed)."""
    if _tracer is None:
        return
    from opentelemetry.trace import Link, set_span_in_context

    done = _tracer.start_span(
        name,
        context=set_span_in_context(parent, _empty_context()),
        attributes=dict(attributes or {}),
        links=[Link(link) for link in links],
        start_time=start_ns,
    )
    done.end(end_time=end_ns)


def _empty_context() -> Context:
    from opentelemetry.context import Context

    return Context()


def ids(current: Span | None) -> tuple[str, str]:
    """(trace id, span id) of `current` in W3C hex, or empty strings."""
    if current is None:
        return "", ""
    found = current.get_span_context()
    if not found.is_valid:
        return "", ""
    return f"{found.trace_id:032x}", f"{found.span_id:016x}"


def call_failed(code: str, number: int) -> None:
    """Mark the current (server) span of a gRPC call as failed with `code`: the instrumentation
    package sees `context.abort` but not `abort_with_status`, which the service answers with."""
    if not enabled:
        return
    from opentelemetry import trace
    from opentelemetry.trace import Status, StatusCode

    current = trace.get_current_span()
    current.set_attribute("rpc.grpc.status_code", number)
    current.set_status(Status(StatusCode.ERROR, code))
