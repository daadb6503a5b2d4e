"""Settings: `TRANSACTION_SERVICE_*` environment variables, overridden by command-line flags.

Each setting is declared once, here, with its default and its description; the flags of
`transaction-service serve`, their help texts and the settings table of docs/configuration.md are
all made from these declarations (`add_flags`, `settings_table`), so they cannot drift apart.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import os
import re
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from transaction_service.domain.limits import DEFAULT_LIMITS

ENV_PREFIX = "TRANSACTION_SERVICE_"
MiB = 1024 * 1024


def _comma_separated(value: Any) -> Any:
    # Lists come from the environment as "a,b,c"; flags give them as repeated options.
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _path_text(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


StrList = Annotated[list[str], NoDecode, BeforeValidator(_comma_separated)]


def _flag(name: str, **extra: Any) -> dict[str, Any]:
    """`json_schema_extra` for a setting whose flag is not simply `--<name>`."""
    return {"flag": name, **extra}


# `json_schema_extra` marking a setting whose values are secrets: errors never show them.
_SECRET: dict[str, Any] = {"secret": True}
PathText = Annotated[str, BeforeValidator(_path_text)]
# RFC 6750's b64token: what can follow "Bearer " in an authorization header.
_BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
WEBHOOK_SECRET_PREFIX = "whsec_"
MIN_TOKEN_LENGTH = 16


class Settings(BaseSettings):
    """Every setting of `transaction-service serve`. The description of each field is its help."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    # -- listening ---------------------------------------------------------------------------------
    grpc_host: str = Field(
        default="[::]", description="address the gRPC server listens on; [::] is every interface"
    )
    grpc_port: int = Field(
        default=50051, ge=0, le=65535, description="gRPC port (0: any free port, logged)"
    )
    http_host: str = Field(
        default="[::]",
        description="address the HTTP listener (webhooks, metrics, probes) listens on",
    )
    http_port: int = Field(
        default=8080, ge=0, le=65535, description="HTTP port (0: any free port, logged)"
    )

    # -- security ----------------------------------------------------------------------------------
    webhook_secrets: StrList = Field(
        default_factory=list,
        repr=False,
        description="Svix signing secret of the Junction webhook endpoint (whsec_...); several "
        "during a rotation. Without one, POST /webhooks/junction is off",
        json_schema_extra=_flag("--webhook-secret", **_SECRET),
    )
    webhook_allow_unsigned: bool = Field(
        default=False,
        description="accept webhooks without a signature when no secret is set: local "
        "development only",
    )
    tls_cert: PathText = Field(
        default="", description="PEM certificate (chain) for gRPC over TLS; off: plaintext"
    )
    tls_key: PathText = Field(default="", description="PEM private key of --tls-cert")
    tls_client_ca: PathText = Field(
        default="",
        description="PEM CA bundle: gRPC clients must present a certificate it signed (mTLS)",
    )
    ingest_tokens: StrList = Field(
        default_factory=list,
        repr=False,
        description="bearer token that may ingest and read over gRPC; once any token is set, "
        "every TransactionService call needs one",
        json_schema_extra=_flag("--ingest-token", **_SECRET),
    )
    read_tokens: StrList = Field(
        default_factory=list,
        repr=False,
        description="bearer token that may only read (get, list, watch; and GET /metrics)",
        json_schema_extra=_flag("--read-token", **_SECRET),
    )

    # -- storage -----------------------------------------------------------------------------------
    db: Annotated[str, BeforeValidator(_path_text)] = Field(
        default="var/transactions.db",
        min_length=1,
        description="the store: a SQLite file path (or sqlite:///path), created if missing; "
        "or a postgresql://user:password@host:port/database URL, shared by several replicas",
    )
    db_pool_size: int = Field(
        default=10, gt=0, description="PostgreSQL connections per process (reads and writes)"
    )
    db_lock_timeout_seconds: float = Field(
        default=2.0,
        gt=0,
        description="longest a write waits for a lock another database session (or, on "
        "SQLite, another connection to the file) holds; then it fails UNAVAILABLE and health "
        "names the lock wait. PostgreSQL reads too",
    )
    db_statement_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="PostgreSQL: longest one statement may run; keep it inside callers' "
        "deadlines (Svix waits 15 s)",
    )
    store_stall_seconds: float = Field(
        default=5.0,
        gt=0,
        description="a commit still running after this long turns health NOT_SERVING (a "
        "stalled store), as a failed write does",
    )
    store_recovery_seconds: float = Field(
        default=5.0,
        ge=0,
        description="after a fault, health says SERVING again once writes have succeeded for "
        "this long with no failure (so it does not flap)",
    )
    sqlite_synchronous: Literal["FULL", "NORMAL"] = Field(
        default="FULL",
        description="SQLite durability: FULL survives power loss, NORMAL only a process crash",
    )
    body_retention_seconds: float = Field(
        default=30 * 24 * 3600,
        gt=0,
        description="how long webhook bodies (patient names, birth dates, addresses) are kept; "
        "then erased, keeping each event's id, digest, outcome, reason and revision for dedupe "
        "and the history (ListTransactionEvents)",
    )
    max_batch: int = Field(
        default=256, gt=0, description="most deliveries committed together in one transaction"
    )
    ingest_queue_limit: int = Field(
        default=4096,
        ge=4,
        description="most deliveries waiting for a commit: a quarter for webhooks, a quarter "
        "for IngestEvent calls, half for IngestEvents streams, split evenly among the callers "
        "of each; past a share: RESOURCE_EXHAUSTED (gRPC) or 503 with Retry-After (webhooks), "
        "and a stream waits",
    )
    ingest_queue_bytes: int = Field(
        default=256 * MiB,
        gt=0,
        description="most bytes of bodies waiting for a commit, shared like ingest_queue_limit",
    )
    webhook_deadline_seconds: float = Field(
        default=15.0,
        gt=0,
        description="a webhook not taken into a commit this long after it arrived is dropped "
        "unstored and answered 503 (Svix gives up after 15 s and sends it again later)",
    )

    # -- requests ----------------------------------------------------------------------------------
    max_body_bytes: int = Field(
        default=1 * MiB,
        gt=0,
        description="largest webhook body; larger: INVALID_ARGUMENT over gRPC, 413 over HTTP",
    )
    max_message_bytes: int = Field(
        default=4 * MiB,
        gt=0,
        description="largest gRPC message received or sent; larger: RESOURCE_EXHAUSTED",
    )
    ingest_stream_window: int = Field(
        default=512,
        gt=0,
        description="deliveries of one IngestEvents stream read ahead of their answers (a "
        "request of several counts each); while this many wait for their commit the stream is "
        "not read (HTTP/2 pushes back)",
    )
    ingest_stream_window_bytes: int = Field(
        default=16 * MiB,
        gt=0,
        description="bodies of one IngestEvents stream read ahead of their answers, in bytes; "
        "bounds a stream's memory like ingest_stream_window",
    )

    max_string_length: int = Field(
        default=DEFAULT_LIMITS.max_string_length,
        gt=0,
        description="longest string kept in a transaction's state (ids, statuses, names)",
    )
    max_orders_per_transaction: int = Field(
        default=DEFAULT_LIMITS.max_orders_per_transaction,
        gt=0,
        description="most orders in one transaction (and in one order_transaction block)",
    )
    max_view_bytes: int = Field(
        default=DEFAULT_LIMITS.max_view_bytes,
        gt=0,
        description="largest state of one transaction, as JSON; keep it well below "
        "max_message_bytes so every transaction and change fits in a response",
    )

    # -- the edge: what one caller can hold (docs/limits.md) ---------------------------------------
    http_max_connections: int = Field(
        default=4096,
        gt=0,
        description="HTTP connections open at once, and never more than half the process's file "
        "descriptor limit, so an HTTP flood leaves gRPC and the store theirs; past it a new "
        "connection is answered 503 and closed",
    )
    http_idle_timeout_seconds: float = Field(
        default=15.0,
        gt=0,
        description="an HTTP connection that sends nothing for this long, after opening or "
        "between requests, is closed",
    )
    http_head_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="time from the first byte of an HTTP request head to its end; slower: the "
        "connection is closed",
    )
    http_max_head_bytes: int = Field(
        default=16 * 1024,
        ge=1024,
        description="largest HTTP request head (request line and headers); larger: 431 and the "
        "connection is closed",
    )
    http_body_timeout_seconds: float = Field(
        default=15.0,
        gt=0,
        description="time for a webhook body to arrive once its head has (Svix gives up after "
        "15 s); slower: 408 and the connection is closed",
    )
    http_max_body_reads: int = Field(
        default=16,
        gt=0,
        description="webhook bodies still arriving at once (unverified: a signature is checked "
        "on the whole body); one more: 503 with Retry-After. A body that came whole with its "
        "head is not counted. Bounds their memory to this times max_body_bytes",
    )
    grpc_max_concurrent_streams: int = Field(
        default=100,
        gt=0,
        description="gRPC calls in progress at once on one connection (HTTP/2 "
        "MAX_CONCURRENT_STREAMS); a client's further calls on it wait until one ends",
    )
    grpc_handshake_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="time a new gRPC connection has to finish its TLS handshake and HTTP/2 "
        "preface; slower: closed",
    )

    # -- lifecycle ---------------------------------------------------------------------------------
    shutdown_grace_seconds: float = Field(
        default=10.0, ge=0, description="time given to calls in flight on SIGTERM"
    )
    shutdown_delay_seconds: float = Field(
        default=0.0,
        ge=0,
        description="on SIGTERM, time spent reporting not ready (health, /readyz) before the "
        "listeners close, so balancers stop routing first; a second signal cuts it short",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="DEBUG, INFO, WARNING or ERROR"
    )
    log_format: Literal["text", "json"] = Field(
        default="text", description="text lines, or one JSON object per line"
    )
    log_events: bool = Field(
        default=False,
        description="one INFO line per ingested event (logger transaction_service.events: "
        "event, order and transaction ids, outcome, revision, source, ms); off by default, "
        "since writing it costs more than decoding the event (docs/performance.md)",
    )

    access_log_reads_every: int = Field(
        default=100,
        ge=0,
        description="a successful unary read (GetTransaction, ListTransactions, "
        "BatchGetTransactions, GetTransactionResults, ListTransactionEvents, health checks) gets "
        "an access line once in this many calls of its method, the first included, with "
        "`sampled` saying how many calls it stands for; 1: every call, 0: none. Failed calls, "
        "writes and streams always get theirs (a line costs more than a read: "
        "docs/performance.md)",
    )

    # -- watch -------------------------------------------------------------------------------------
    change_retention_seconds: float = Field(
        default=7 * 24 * 3600,
        gt=0,
        description="how long the change log keeps changes (a watch cannot resume from before)",
    )
    change_trim_interval_seconds: float = Field(
        default=60.0,
        gt=0,
        description="how often the change log is trimmed and expired bodies are erased",
    )
    keepalive_seconds: float = Field(
        default=30.0,
        ge=1,
        description="gRPC keepalive: ping each client connection this often",
    )
    keepalive_timeout_seconds: float = Field(
        default=10.0,
        ge=1,
        description="gRPC keepalive: drop a connection whose ping is not answered in this time "
        "(a dead or frozen watcher is gone within keepalive + this)",
    )
    watch_progress_seconds: float = Field(
        default=10.0, gt=0, description="progress message interval on idle watch streams"
    )
    watch_batch_interval_seconds: float = Field(
        default=0.05,
        ge=0,
        description="a watch stream that asked for batches (batch_changes) gets at most one "
        "message per this interval while changes keep coming (stretched by 0.5 ms per batched "
        "feed open)",
    )
    watch_queue_size: int = Field(
        default=1024,
        gt=0,
        description="changes buffered per watcher before it catches up from the change log",
    )
    watch_max_per_stream: int = Field(
        default=1000,
        gt=0,
        description="watches open at once on one Watch stream (the multiplexed RPC); a create "
        "past it is answered `canceled` RESOURCE_EXHAUSTED (TOO_MANY_WATCHES)",
    )
    watch_creates_per_second: float = Field(
        default=1000.0,
        gt=0,
        description="watches created per second on one Watch stream, in bursts of as many (at "
        "least 1): past it the server reads the stream's next request only once the budget "
        "allows (nothing is refused). Each create costs a read of the store, which its cancel "
        "does not take back",
    )
    watch_messages_per_second: int = Field(
        default=5000,
        gt=0,
        description="watch messages sent per second to watches that did not ask for batches, "
        "all together (at most 16 in one turn of the event loop): past it they lag, and catch up "
        "from the change log, so that they cannot slow ingest (batched watches are paced by "
        "watch_batch_interval_seconds instead)",
    )

    # -- Junction's API (reconcile, sweep, back-fill, combined results) ----------------------------
    junction_api_key: str = Field(
        default="",
        repr=False,
        description="Junction API key (sent as X-Vital-API-Key): turns on reconcile, the sweep, "
        "back-fill and fetching combined results. Give it in the environment",
        json_schema_extra=_SECRET,
    )
    junction_region: Literal["us", "eu"] = Field(
        default="us", description="the Junction region the API key belongs to"
    )
    junction_environment: Literal["production", "sandbox"] = Field(
        default="production", description="the Junction environment the API key belongs to"
    )
    junction_base_url: str = Field(
        default="",
        description="Junction API base URL, instead of the one for the region and environment "
        "(a proxy, or a fake in tests)",
    )
    junction_timeout_seconds: float = Field(
        default=10.0, gt=0, description="timeout of each request to Junction's API (retried)"
    )
    junction_max_concurrency: int = Field(
        default=4,
        gt=0,
        description="most requests to Junction's API in flight at once for reconcile, the "
        "sweep, back-fill and fetching combined results (GetTransactionResultsPdf calls have "
        "their own, results_pdf_max_calls)",
    )
    results_pdf_max_calls: int = Field(
        default=2,
        gt=0,
        description="GetTransactionResultsPdf calls in progress at once (each one request to "
        "Junction's API, apart from junction_max_concurrency, then its PDF sent from memory); "
        "past it: RESOURCE_EXHAUSTED with a retry hint",
    )
    results_pdf_calls_per_minute: int = Field(
        default=30,
        gt=0,
        description="GetTransactionResultsPdf calls started in any minute, so interactive reads "
        "cannot use up the API key's rate limit; past it: RESOURCE_EXHAUSTED with a retry hint",
    )
    results_pdf_max_bytes: int = Field(
        default=16 * MiB,
        gt=0,
        description="largest results PDF GetTransactionResultsPdf fetches (it is read whole "
        "from Junction before it is sent, so a slow reader holds no request to Junction); "
        "larger: RESOURCE_EXHAUSTED",
    )
    results_pdf_call_seconds: float = Field(
        default=120.0,
        gt=0,
        description="a GetTransactionResultsPdf call, fetching and sending included, ends with "
        "DEADLINE_EXCEEDED after this long; one whose caller reads nothing is dropped after "
        "twice this",
    )
    reconcile_interval_seconds: float = Field(
        default=0.0,
        ge=0,
        description="how often the sweep looks for active transactions that went silent and "
        "reconciles them with Junction's API; 0: no sweep",
    )
    reconcile_after_seconds: float = Field(
        default=6 * 3600,
        gt=0,
        description="a transaction is silent, and swept, when it is active and neither Junction "
        "nor a reconcile has told anything new of it for this long",
    )

    def __init__(self, **values: Any) -> None:
        # Accept the log level in any case, as users type it.
        if isinstance(values.get("log_level"), str):
            values["log_level"] = values["log_level"].upper()
        super().__init__(**values)

    # Messages of these validators never include the value: they are secrets.
    @field_validator("webhook_secrets")
    @classmethod
    def _webhook_secrets_form(cls, secrets: list[str]) -> list[str]:
        for number, secret in enumerate(secrets, start=1):
            if not webhook_secret_key(secret):
                raise ValueError(
                    f"secret #{number} is not of the form {WEBHOOK_SECRET_PREFIX}<base64>: "
                    "copy the endpoint's signing secret whole"
                )
        return secrets

    @field_validator("ingest_tokens", "read_tokens")
    @classmethod
    def _tokens_form(cls, tokens: list[str]) -> list[str]:
        for number, token in enumerate(tokens, start=1):
            if not _BEARER_TOKEN.fullmatch(token):
                raise ValueError(
                    f"token #{number} has characters a bearer token cannot have "
                    "(letters, digits and -._~+/ then optional =)"
                )
            if len(token) < MIN_TOKEN_LENGTH:
                # A short token can be guessed; tokens are made by machines, not remembered.
                raise ValueError(
                    f"token #{number} is shorter than {MIN_TOKEN_LENGTH} characters: use a long "
                    "random one (e.g. `openssl rand -hex 32`)"
                )
        return tokens

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.webhook_allow_unsigned and self.webhook_secrets:
            raise ValueError(
                "--webhook-allow-unsigned and --webhook-secret exclude each other: with a "
                "secret every webhook must be signed"
            )
        if set(self.ingest_tokens) & set(self.read_tokens):
            # Which role would it have? The ingest one, silently: refuse the ambiguity.
            raise ValueError(
                "a token is given both as an ingest token and as a read token: give each token "
                "one role (an ingest token may also read)"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together: set both or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS)")
        if self.reconcile_interval_seconds and not self.junction_api_key:
            raise ValueError(
                f"--reconcile-interval-seconds needs Junction's API: set {ENV_PREFIX}"
                "JUNCTION_API_KEY, or leave the interval at 0"
            )
        if self.junction_base_url and not self.junction_base_url.startswith(
            ("https://", "http://")
        ):
            raise ValueError("--junction-base-url must start with https:// (or http://)")
        return self

    @property
    def tokens_required(self) -> bool:
        return bool(self.ingest_tokens or self.read_tokens)


def webhook_secret_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret; empty if the secret is not of that form."""
    if not secret.startswith(WEBHOOK_SECRET_PREFIX):
        return b""
    encoded = secret.removeprefix(WEBHOOK_SECRET_PREFIX)
    try:
        # Strictly (unlike a lenient decoder, which skips stray characters): a secret with a
        # typo must fail here, at start, rather than fail every signature later.
        return base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        return b""


# ----------------------------------------------------------------------------------------------
# Flags, help and the settings table, made from the declarations above.
# ----------------------------------------------------------------------------------------------


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def flag_name(field: str) -> str:
    info = Settings.model_fields[field]
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    return str(extra.get("flag") or "--" + field.replace("_", "-"))


def _is_secret(field: str) -> bool:
    info = Settings.model_fields.get(field)
    extra = info.json_schema_extra if info and isinstance(info.json_schema_extra, dict) else {}
    return bool(extra.get("secret"))


def _is_list(info: FieldInfo) -> bool:
    return get_origin(info.annotation) is list


def _choices(info: FieldInfo) -> tuple[Any, ...] | None:
    return get_args(info.annotation) if get_origin(info.annotation) is Literal else None


def default_text(field: str) -> str:
    info = Settings.model_fields[field]
    default = info.get_default(call_default_factory=True)
    if isinstance(default, bool):
        return "off" if not default else "on"
    if default in (None, "", []):
        return "none"
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    return str(default)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; its help is the setting's description, its default shown."""
    group = parser.add_argument_group(
        "settings", f"each flag can also be set as an environment variable {ENV_PREFIX}<NAME>"
    )
    for field, info in Settings.model_fields.items():
        help_text = f"{info.description} (default {default_text(field)}; {env_name(field)})"
        kwargs: dict[str, Any] = {"dest": field, "default": None, "help": help_text}
        if info.annotation is bool:
            kwargs["action"] = "store_const"
            kwargs["const"] = True
        elif _is_list(info):
            kwargs["action"] = "append"
            kwargs["metavar"] = field.removesuffix("s").upper()
        else:
            kwargs["metavar"] = field.upper() if _choices(info) is None else None
            if (choices := _choices(info)) is not None:
                kwargs["metavar"] = "|".join(str(c) for c in choices)
        group.add_argument(flag_name(field), **kwargs)


def from_flags(args: argparse.Namespace) -> Settings:
    """Settings from the environment, overridden by the flags that were given."""
    overrides = {
        field: getattr(args, field)
        for field in Settings.model_fields
        if getattr(args, field, None) is not None
    }
    return Settings(**overrides)


def unknown_environment(environ: Mapping[str, str] | None = None) -> list[str]:
    """`TRANSACTION_SERVICE_*` variables that name no setting (a typo is otherwise silent)."""
    environ = os.environ if environ is None else environ
    known = {env_name(field) for field in Settings.model_fields}
    return sorted(
        name
        for name in environ
        if name.upper().startswith(ENV_PREFIX)
        and name.upper() not in known
        # Read by the test suite, not by the service.
        and not name.upper().startswith(ENV_PREFIX + "TEST_")
        # The client commands' token (transaction_client), beside a server in one environment.
        and name.upper() != ENV_PREFIX + "TOKEN"
    )


def describe_errors(exc: ValidationError) -> Iterator[str]:
    """One line per bad setting, naming its flag and variable, the problem, and the value."""
    for error in exc.errors(include_url=False):
        field = str(error["loc"][0]) if error["loc"] else ""
        if field in Settings.model_fields:
            where = f"{flag_name(field)} / {env_name(field)}"
        else:
            where = env_name(field) if field else "settings"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "not a setting"
        got = error.get("input")
        # The value is shown only for a named, non-secret setting (a whole-settings error's
        # input is every setting, secrets included).
        hidden = error["type"] == "extra_forbidden" or not field or _is_secret(field)
        shown = "" if hidden or got is None else f" (got {got!r})"
        yield f"{where}: {message}{shown}"


def settings_table() -> str:
    """The settings table of docs/configuration.md, in Markdown."""
    lines = ["| variable | flag | default | meaning |", "|---|---|---|---|"]
    for field, info in Settings.model_fields.items():
        lines.append(
            f"| `{env_name(field)}` | `{flag_name(field)}` | `{default_text(field)}` "
            f"| {info.description} |"
        )
    return "\n".join(lines)
