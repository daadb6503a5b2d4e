"""Security of the gRPC API, in process: TLS, mutual TLS and bearer tokens per role, with a CA and
certificates the tests make (trustme). Also the HTTP side of tokens (/metrics)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.conftest import SCENARIOS
from tests.harness import loopback_settings
from transaction_service.api.auth import READ_METHODS, role_needed
from transaction_service.app import App, StartupError
from transaction_service.auth import Role
from transaction_service.config import Settings
from transaction_service.server import SERVICE_NAME, TransactionService
from transactions.v1 import transactions_pb2 as pb
from transactions.v1 import transactions_pb2_grpc as pb_grpc

INGEST_TOKEN = "ingest-token-0123456789"
READ_TOKEN = "read-token-0123456789"
DELIVERY = SCENARIOS[0]["deliveries"][0]


@dataclass
class Pki:
    """A CA, a server certificate for localhost, a client certificate, and a stranger CA's
    client certificate; all as files."""

    folder: Path
    ca: trustme.CA
    stranger: trustme.CA

    def path(self, name: str) -> str:
        return str(self.folder / name)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, stranger = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    stranger.cert_pem.write_to_path(str(folder / "stranger-ca.pem"))
    server = ca.issue_cert("localhost", "127.0.0.1")
    server.cert_chain_pems[0].write_to_path(str(folder / "server.pem"))
    server.private_key_pem.write_to_path(str(folder / "server.key"))
    for name, issuer in (("client", ca), ("stranger", stranger)):
        cert = issuer.issue_cert(f"{name}@example.com")
        cert.cert_chain_pems[0].write_to_path(str(folder / f"{name}.pem"))
        cert.private_key_pem.write_to_path(str(folder / f"{name}.key"))
    return Pki(folder, ca, stranger)


def settings_for(tmp_path: Path, **overrides: Any) -> Settings:
    db = overrides.pop("db", tmp_path / "x.db")
    return loopback_settings(db, **overrides)


@pytest.fixture
async def started() -> AsyncIterator[Any]:
    """A factory: `await started(settings)` gives a running service, stopped at the end."""
    services: list[TransactionService] = []

    async def start(settings: Settings, app: App | None = None) -> TransactionService:
        service = TransactionService(settings, app)
        await service.start()
        services.append(service)
        return service

    yield start
    for service in services:
        await service.stop()


def read_bytes(pki: Pki, name: str) -> bytes:
    return Path(pki.path(name)).read_bytes()


def tls_channel(port: int, pki: Pki, *, ca: str = "ca.pem", client: str | None = None) -> Any:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read_bytes(pki, ca),
        private_key=read_bytes(pki, f"{client}.key") if client else None,
        certificate_chain=read_bytes(pki, f"{client}.pem") if client else None,
    )
    return grpc.aio.secure_channel(f"localhost:{port}", credentials)


async def get_code(channel: Any, metadata: Sequence[tuple[str, str]] = ()) -> grpc.StatusCode:
    """The status of a GetTransaction for an unknown order: NOT_FOUND means the call got in."""
    stub = pb_grpc.TransactionServiceStub(channel)
    try:
        await stub.GetTransaction(
            pb.GetTransactionRequest(order_id="nobody"), metadata=metadata, timeout=10
        )
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


# -- TLS -----------------------------------------------------------------------------------------


async def test_tls_server_refuses_plaintext_and_untrusted_clients(
    tmp_path: Path, pki: Pki, started: Any
) -> None:
    """Over TLS a client trusting the CA gets in; a plaintext client, or one that trusts another
    CA, cannot connect at all."""
    service = await started(
        settings_for(tmp_path, tls_cert=pki.path("server.pem"), tls_key=pki.path("server.key"))
    )
    async with tls_channel(service.port, pki) as channel:
        assert await get_code(channel) == grpc.StatusCode.NOT_FOUND
    async with grpc.aio.insecure_channel(f"localhost:{service.port}") as channel:
        assert await get_code(channel) == grpc.StatusCode.UNAVAILABLE
    async with tls_channel(service.port, pki, ca="stranger-ca.pem") as channel:
        assert await get_code(channel) == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_needs_a_client_certificate_from_the_ca(
    tmp_path: Path, pki: Pki, started: Any
) -> None:
    """Under mTLS only a client with a certificate the configured CA signed gets in."""
    service = await started(
        settings_for(
            tmp_path,
            tls_cert=pki.path("server.pem"),
            tls_key=pki.path("server.key"),
            tls_client_ca=pki.path("ca.pem"),
        )
    )
    async with tls_channel(service.port, pki, client="client") as channel:
        assert await get_code(channel) == grpc.StatusCode.NOT_FOUND
    async with tls_channel(service.port, pki) as channel:
        assert await get_code(channel) == grpc.StatusCode.UNAVAILABLE
    async with tls_channel(service.port, pki, client="stranger") as channel:
        assert await get_code(channel) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"tls_cert": "missing.pem", "tls_key": "server.key"}, "cannot read it"),
        ({"tls_cert": "server.pem", "tls_key": "client.key"}, "does not belong"),
        ({"tls_cert": "server.key", "tls_key": "server.key"}, "not a PEM certificate"),
        (
            {"tls_cert": "server.pem", "tls_key": "server.key", "tls_client_ca": "server.key"},
            "not a PEM CA certificate",
        ),
    ],
)
async def test_tls_file_mistakes_are_startup_errors(
    tmp_path: Path, pki: Pki, files: dict[str, str], message: str
) -> None:
    """Missing, mismatched or non-PEM files stop the start with one line, before the store is
    opened or a port is bound."""
    settings = settings_for(tmp_path, **{k: pki.path(v) for k, v in files.items()})
    with pytest.raises(StartupError) as caught:
        await TransactionService(settings).start()
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "x.db").exists()


# -- tokens --------------------------------------------------------------------------------------


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


async def ingest_code(channel: Any, metadata: Sequence[tuple[str, str]]) -> grpc.StatusCode:
    stub = pb_grpc.TransactionServiceStub(channel)
    request = pb.IngestEventRequest(
        event_id=DELIVERY["svix_id"], payload_json=json.dumps(DELIVERY["body"])
    )
    try:
        await stub.IngestEvent(request, metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def watch_code(channel: Any, metadata: Sequence[tuple[str, str]]) -> grpc.StatusCode:
    """OK once the first message of a feed watch arrives; else the stream's status."""
    stub = pb_grpc.TransactionServiceStub(channel)
    call = stub.WatchTransactions(pb.WatchTransactionsRequest(), metadata=metadata, timeout=10)
    try:
        async for _message in call:
            return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as error:
        return error.code()
    finally:
        call.cancel()
    return grpc.StatusCode.OK


def stored_events(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT count(*) FROM events").fetchone()[0]


async def test_tokens_per_role_on_unary_and_streaming_calls(tmp_path: Path, started: Any) -> None:
    """No token or an unknown one: UNAUTHENTICATED on every call, streaming ones included. A
    read token reads and watches but IngestEvent is PERMISSION_DENIED (nothing stored); an
    ingest token does both. Health and reflection need no token."""
    settings = settings_for(tmp_path, ingest_tokens=[INGEST_TOKEN], read_tokens=[READ_TOKEN])
    service = await started(settings)
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        for metadata in ([], bearer("guess"), [("authorization", READ_TOKEN)], bearer("")):
            assert await get_code(channel, metadata) == unauthenticated, metadata
            assert await ingest_code(channel, metadata) == unauthenticated, metadata
            assert await watch_code(channel, metadata) == unauthenticated, metadata

        assert await get_code(channel, bearer(READ_TOKEN)) == grpc.StatusCode.NOT_FOUND
        assert await watch_code(channel, bearer(READ_TOKEN)) == grpc.StatusCode.OK
        assert await ingest_code(channel, bearer(READ_TOKEN)) == grpc.StatusCode.PERMISSION_DENIED
        assert stored_events(settings.db) == 0

        assert await ingest_code(channel, bearer(INGEST_TOKEN)) == grpc.StatusCode.OK
        assert await get_code(channel, bearer(INGEST_TOKEN)) == grpc.StatusCode.NOT_FOUND
        assert await watch_code(channel, bearer(INGEST_TOKEN)) == grpc.StatusCode.OK
        # The scheme's case does not matter (RFC 7235); the token's does.
        assert await get_code(channel, [("authorization", f"bearer {READ_TOKEN}")]) != (
            unauthenticated
        )
        assert await get_code(channel, bearer(READ_TOKEN.upper())) == unauthenticated

        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        listing = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        async for response in listing:
            names = {s.name for s in response.list_services_response.service}
            assert SERVICE_NAME in names
            break


async def test_refusals_never_echo_the_token(tmp_path: Path, started: Any) -> None:
    """The error for an unknown or read-only token names no token."""
    service = await started(settings_for(tmp_path, read_tokens=[READ_TOKEN]))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        stub = pb_grpc.TransactionServiceStub(channel)
        for token in ("a-guessed-token", READ_TOKEN):
            request = pb.IngestEventRequest(payload_json="{}")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.IngestEvent(request, metadata=bearer(token), timeout=10)
            assert token not in str(caught.value.details())
            assert token not in repr(caught.value.trailing_metadata())


def test_every_method_needs_a_role_and_writes_need_ingest() -> None:
    """Each method of the service is guarded; only the listed reads are open to read tokens,
    so a write method added later is closed to them by default."""
    methods = pb.DESCRIPTOR.services_by_name["TransactionService"].methods
    assert {m.name for m in methods} > READ_METHODS
    for method in methods:
        needed = role_needed(f"/{SERVICE_NAME}/{method.name}")
        assert needed == (Role.READ if method.name in READ_METHODS else Role.INGEST)
    assert role_needed(f"/{SERVICE_NAME}/SomeFutureWrite") == Role.INGEST
    assert role_needed("/grpc.health.v1.Health/Check") is None


def test_the_gateway_guards_every_call_with_handlers_wrapped_once() -> None:
    """Every call's handler comes from the gateway (no interceptor): a call the token allows
    gets the method's handler wrapped at registration, the same object every time; a refused
    one a request-streaming handler that refuses before reading its request; an unknown method
    none. Each call, known or not, is noted for draining."""
    from transaction_service.api.access import CallObserver
    from transaction_service.api.drain import CallArrivals
    from transaction_service.api.gateway import Gateway
    from transaction_service.auth import BearerTokens
    from transaction_service.metrics import Metrics

    tokens = BearerTokens(["ingest-token-0123456789"], ["read-token-0123456789"])
    arrivals = CallArrivals()
    gateway = Gateway(CallObserver(Metrics(), tokens), arrivals, tokens)

    async def answer(request: Any, context: Any) -> bytes:
        return b""

    handler = grpc.unary_unary_rpc_method_handler(answer)
    gateway.add(SERVICE_NAME, {"GetTransaction": handler, "IngestEvent": handler})
    gateway.add_generated(
        health_pb2_grpc.add_HealthServicer_to_server, health_pb2_grpc.HealthServicer()
    )

    @dataclass
    class Details:
        method: str
        invocation_metadata: tuple[tuple[str, str], ...] = ()

    read = (("authorization", "Bearer read-token-0123456789"),)
    get = f"/{SERVICE_NAME}/GetTransaction"
    first = gateway.service(Details(get, read))
    assert first is not None
    assert first is gateway.service(Details(get, read))
    assert not first.request_streaming
    assert first.unary_unary is not answer
    for refused in (Details(get), Details(f"/{SERVICE_NAME}/IngestEvent", read)):
        refusing = gateway.service(refused)
        assert refusing is not None
        assert refusing.request_streaming
    assert gateway.service(Details("/grpc.health.v1.Health/Check")) is not None
    arrivals.last = 0.0
    assert gateway.service(Details(f"/{SERVICE_NAME}/NoSuchMethod", read)) is None
    assert arrivals.last > 0


async def test_metrics_need_a_token_when_tokens_are_configured(
    tmp_path: Path, started: Any
) -> None:
    """The HTTP port faces the internet: with tokens set, /metrics wants a read or ingest token
    (the probes stay open)."""
    settings = settings_for(tmp_path, ingest_tokens=[INGEST_TOKEN], read_tokens=[READ_TOKEN])
    service = await started(settings)
    base = f"http://127.0.0.1:{service.http_port}"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/metrics") as response:
            assert response.status == 401
            assert (await response.json())["error"]["reason"] == "MISSING_TOKEN"
        for token in (READ_TOKEN, INGEST_TOKEN):
            headers = {"Authorization": f"Bearer {token}"}
            async with session.get(f"{base}/metrics", headers=headers) as response:
                assert response.status == 200
                assert "transaction_service_events_total" in await response.text()
        for probe in ("/healthz", "/readyz"):
            async with session.get(f"{base}{probe}") as response:
                assert response.status == 200


async def test_watch_cli_sends_its_token(tmp_path: Path, started: Any) -> None:
    """`transaction-service watch` without a token is told UNAUTHENTICATED and exits; with
    `--token` it streams."""
    service = await started(settings_for(tmp_path, read_tokens=[READ_TOKEN]))

    async def watch(*args: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "transaction_service", "watch", "--address", f"127.0.0.1:{service.port}"),
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )

    refused = await watch("--no-reconnect")
    async with asyncio.timeout(30):
        _, stderr = await refused.communicate()
    assert refused.returncode == 1
    assert "UNAUTHENTICATED" in stderr.decode()

    allowed = await watch("--token", READ_TOKEN)
    try:
        assert allowed.stdout is not None
        async with asyncio.timeout(30):
            first = json.loads(await allowed.stdout.readline())
        assert "progress" in first
    finally:
        allowed.terminate()
        await allowed.wait()
