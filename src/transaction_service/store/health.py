"""Whether the store can write, and how its failures are logged.

A store that cannot write (disk full, I/O error, database file gone, server unreachable) fails
every batch until the cause is fixed. Logging a traceback per call would bury the cause, so each
kind of failure is logged once when it starts, then at most every `repeat_seconds` with a count,
and once more when writes succeed again. Listeners (health checks, readiness) hear of every flip.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("transaction_service.store")


class WriteHealth:
    def __init__(self, description: str, repeat_seconds: float = 30.0) -> None:
        self._description = description
        self._repeat = repeat_seconds
        self._counts: dict[str, int] = {}
        self._logged_at: dict[str, float] = {}
        self._listeners: list[Callable[[bool], None]] = []

    @property
    def healthy(self) -> bool:
        return not self._counts

    @property
    def failing(self) -> dict[str, int]:
        """Failure kinds since the last success, each with how often it happened."""
        return dict(self._counts)

    def subscribe(self, listener: Callable[[bool], None]) -> None:
        self._listeners.append(listener)

    def failed(self, kind: str) -> None:
        was_healthy = self.healthy
        count = self._counts[kind] = self._counts.get(kind, 0) + 1
        now = time.monotonic()
        last = self._logged_at.get(kind)
        if last is None or now - last >= self._repeat:
            self._logged_at[kind] = now
            log.error(
                "store %s cannot write: %s (%d time%s so far); not serving until a write succeeds",
                self._description,
                kind,
                count,
                "" if count == 1 else "s",
            )
        if was_healthy:
            self._notify(False)

    def succeeded(self) -> None:
        if self.healthy:
            return
        summary = ", ".join(f"{kind} x{count}" for kind, count in self._counts.items())
        log.warning("store %s writes again after %s", self._description, summary)
        self._counts.clear()
        self._logged_at.clear()
        self._notify(True)

    def _notify(self, healthy: bool) -> None:
        for listener in self._listeners:
            try:
                listener(healthy)
            except Exception:
                log.exception("store health listener failed")
