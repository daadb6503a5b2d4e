"""The HTTP listener (aiohttp, in the gRPC server's event loop): webhooks, metrics, probes."""

from transaction_service.http.server import HttpListener, build_http_app, webhook_mode

__all__ = ["HttpListener", "build_http_app", "webhook_mode"]
