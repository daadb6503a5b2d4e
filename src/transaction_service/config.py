"""Settings: `TRANSACTION_SERVICE_*` environment variables, overridden by command-line flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRANSACTION_SERVICE_", extra="ignore")

    # Address to listen on; "[::]" is every interface, IPv4 and IPv6.
    grpc_host: str = "[::]"
    grpc_port: int = Field(default=50051, ge=0, le=65535)
    # SQLite database file; created with its folder if missing.
    db: Path = Path("var/transactions.db")
    # Largest webhook body accepted by IngestEvent; larger bodies get INVALID_ARGUMENT.
    max_body_bytes: int = Field(default=1 * MiB, gt=0)
    # Largest gRPC message accepted; larger ones are refused by gRPC with RESOURCE_EXHAUSTED
    # before they reach the service. Kept above max_body_bytes so that an oversized body gets the
    # clearer INVALID_ARGUMENT.
    max_message_bytes: int = Field(default=4 * MiB, gt=0)
    # FULL: an acknowledged event survives power loss. NORMAL: survives a process crash only.
    sqlite_synchronous: Literal["FULL", "NORMAL"] = "FULL"
    # Most deliveries committed together in one transaction.
    max_batch: int = Field(default=256, gt=0)
    # How long SIGTERM/SIGINT waits for in-flight calls before cancelling them.
    shutdown_grace_seconds: float = Field(default=10.0, ge=0)
    # Changes older than this are trimmed from the change log; a watch cannot resume from before.
    change_retention_seconds: float = Field(default=7 * 24 * 3600, gt=0)
    # How often the change log is trimmed.
    change_trim_interval_seconds: float = Field(default=60.0, gt=0)
    # An idle watch stream gets a progress message this often (keeps resume points fresh and
    # proxies from closing the stream).
    watch_progress_seconds: float = Field(default=10.0, gt=0)
    # Changes buffered per watcher; a watcher further behind catches up from the change log.
    watch_queue_size: int = Field(default=1024, gt=0)
    log_level: str = "INFO"
