"""Log formats: text lines or JSON lines, and the one structured line per ingested event.

A record may carry `fields` (pass `extra={"fields": {...}}`): text lines append them as
`key=value` with strings quoted and escaped, JSON lines add them as keys. Nothing a caller sends
can start a new line or pass for another field: text messages and values have their control
characters escaped, and JSON escapes everything itself.

What is logged never includes webhook bodies, tokens or secrets; ids are logged, quoted.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Ids longer than this are cut in log lines (an event id can be 256 characters).
_VALUE_LIMIT = 300


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
        fields = getattr(record, "fields", None)
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
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # ASCII only: no character in a value can be taken for a line break by any reader.
        return json.dumps(entry, default=str)


def formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else TextFormatter()
