"""Log formats: text lines or JSON lines, and the one structured line per ingested event.

A record may carry `fields` (pass `extra={"fields": {...}}`): text lines append them as
`key=value` with strings quoted and escaped, JSON lines add them as keys. Nothing a caller sends
can start a new line or pass for another field: text messages and values have their control
characters escaped, and JSON escapes everything itself.

Lines written while a call or an HTTP request is served carry its `request_id` (the transports
set `request_id`), and, when tracing is on, the `trace_id` and `span_id` of the active span (see
`tracing.py`, which sets `context_fields`).

What is logged never includes webhook bodies, tokens or secrets; ids are logged, quoted.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Ids longer than this are cut in log lines (an event id can be 256 characters).
_VALUE_LIMIT = 300

# The request id of the gRPC call or HTTP request being served (api/access.py, http/server.py).
request_id: ContextVar[str] = ContextVar("request_id", default="")
# Set by tracing.py when tracing is on: the active span's trace_id and span_id, if any.
context_fields: Callable[[], dict[str, str]] | None = None


def _context(record: logging.LogRecord) -> dict[str, Any]:
    """The record's own fields, then the request id and trace ids of where it was written."""
    fields: dict[str, Any] = dict(getattr(record, "fields", None) or {})
    if rid := request_id.get():
        fields.setdefault("request_id", rid)
    if context_fields is not None:
        for key, value in context_fields().items():
            fields.setdefault(key, value)
    return fields


def _escape(text: str) -> str:
    """`text` with control characters (newlines included) written as escapes."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def _text_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        quoted = repr(value)  # quotes and escapes: no value can forge another field or line
        return quoted if len(quoted) <= _VALUE_LIMIT else quoted[: _VALUE_LIMIT - 4] + "...'"
    return str(value)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message key=value ...`, one line per record (tracebacks aside)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = _escape(record.message)
        line = super().formatMessage(record)
        fields = _context(record)
        if fields:
            line += " " + " ".join(f"{key}={_text_value(v)}" for key, v in fields.items())
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the record's fields, and the
    traceback (as one string) if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_context(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # ASCII only: no character in a value can be taken for a line break by any reader.
        return json.dumps(entry, default=str)


def formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else TextFormatter()


class LibraryNoise(logging.Filter):
    """Drops what libraries log, with a traceback, about faults the service reports itself.

    - asyncpg's pool logs a WARNING with a traceback each time it fails to reconnect its floor
      of connections (every second or so while PostgreSQL is down); the store logs the outage
      once when it starts and once when it ends, naming the cause (store/health.py).
    - grpc.aio fails a call's last send with `ExecuteBatchError` when the client cancelled it
      an instant before (a race in grpc.aio), and asyncio logs that task's exception with a
      traceback; the call's access line already says it was cancelled by the client.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "asyncpg.pool" and str(record.msg).startswith("Failed to restore"):
            return False
        exc = record.exc_info[1] if record.exc_info else None
        return not (exc is not None and type(exc).__name__ == "ExecuteBatchError")


# grpc-core (absl) log lines: `E1206 22:33:11.123456  1234 ssl_transport_security.cc:1677] text`.
_NATIVE_LINE = re.compile(r"([IWEF])\d{4} [\d:.]+\s+\d+ ([^\]\s]+:\d+)\] ?(.*)")
_NATIVE_LEVELS = {
    "I": logging.INFO,
    "W": logging.WARNING,
    "E": logging.ERROR,
    "F": logging.CRITICAL,
}


# grpc-core's line for each failed TLS handshake, and how long none must fail for an episode
# of them to end.
_HANDSHAKE_FAILED = "Handshake failed"
HANDSHAKE_QUIET_SECONDS = 10.0


class NativeStderr:
    """Everything written to file descriptor 2, by anyone, as log records.

    grpc-core writes its log (failed TLS handshakes, for one) with absl straight to the process's
    stderr, past Python's logging; so do other C libraries, and Python itself for its
    last-resort messages. In JSON mode every line on stderr must be JSON: `start()` points
    descriptor 2 at a pipe, a thread reads it line by line and logs each line (grpc-core's as
    logger `grpc` with its level and source file, others as logger `stderr`), and the log
    handler writes to the real stderr (`stream`). `stop()` puts descriptor 2 back and drains the
    pipe.
    """

    def __init__(self, quiet_seconds: float = HANDSHAKE_QUIET_SECONDS) -> None:
        self._saved = -1
        self._thread: threading.Thread | None = None
        self.stream: TextIO | None = None
        # Failed TLS handshakes (grpc-core logs each, some twice): one line when they start,
        # one with the count once none has failed for `quiet_seconds`.
        self._quiet_seconds = quiet_seconds
        self._handshakes_lock = threading.Lock()
        self._handshakes_failed = 0
        self._last_handshake_failure = 0.0

    def start(self) -> TextIO:
        """Capture descriptor 2; the stream to write log lines to (the real stderr)."""
        sys.stderr.flush()
        self._saved = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self.stream = os.fdopen(
            os.dup(self._saved), "w", buffering=1, encoding="utf-8", errors="backslashreplace"
        )
        self._thread = threading.Thread(
            target=self._pump, args=(read,), name="stderr-to-log", daemon=True
        )
        self._thread.start()
        # A handler that fails reports it on sys.stderr, which is the pipe: never loop on it.
        logging.raiseExceptions = False
        return self.stream

    def _pump(self, read: int) -> None:
        native = logging.getLogger("grpc")
        other = logging.getLogger("stderr")
        with os.fdopen(read, "rb") as pipe:
            for raw in pipe:
                line = raw.decode("utf-8", "backslashreplace").rstrip("\r\n")
                if not line.strip():
                    continue
                if match := _NATIVE_LINE.match(line):
                    level, source, text = match.groups()
                    if text.startswith(_HANDSHAKE_FAILED):
                        self._handshake_failed(native, text, source)
                        continue
                    native.log(_NATIVE_LEVELS[level], text, extra={"fields": {"source": source}})
                else:
                    other.warning(line)

    def _handshake_failed(self, native: logging.Logger, text: str, source: str) -> None:
        with self._handshakes_lock:
            self._handshakes_failed += 1
            self._last_handshake_failure = time.monotonic()
            first = self._handshakes_failed == 1
        if first:
            native.warning(
                "TLS handshakes failing: %s; the count follows once none has failed for %gs",
                text,
                self._quiet_seconds,
                extra={"fields": {"source": source}},
            )
            self._check_handshakes_later(self._quiet_seconds)

    def _check_handshakes_later(self, seconds: float) -> None:
        timer = threading.Timer(seconds, self._check_handshakes)
        timer.daemon = True
        timer.start()

    def _check_handshakes(self) -> None:
        with self._handshakes_lock:
            left = self._last_handshake_failure + self._quiet_seconds - time.monotonic()
            failed = self._handshakes_failed
            if left <= 0:
                self._handshakes_failed = 0
        if left > 0:
            self._check_handshakes_later(left)
            return
        logging.getLogger("grpc").warning(
            "TLS handshakes: none failed for %gs; %d failed before", self._quiet_seconds, failed
        )

    def stop(self, timeout: float = 2.0) -> None:
        if self._saved < 0:
            return
        sys.stderr.flush()
        # The pipe's last writer was descriptor 2: the reader sees its end once it has read all.
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._saved = -1
        if self._thread is not None:
            self._thread.join(timeout)
