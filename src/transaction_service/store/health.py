"""Whether the store can write, and how its faults are logged.

A store that cannot write (disk full, I/O error, database file gone, server unreachable, a lock
held by another session) fails every batch until the cause is fixed; a store whose commits stall
answers nobody. Either way the service must say so (health NOT_SERVING, /readyz 503) so that
balancers send the traffic elsewhere, and say it steadily:

- it turns unhealthy at the first failure, or as soon as a commit has run longer than
  `stall_seconds` (the commit path reports that while the commit is still running);
- it turns healthy again only once writes have succeeded for `recovery_seconds` with no failure
  in between (hysteresis: on a disk that is nearly full, or a database that comes and goes, some
  writes succeed between the failures, and health would otherwise flip with each);
- the log names each kind of fault once, when it starts (no traceback: the kind says what is
  wrong), and once when the episode ends, with how often each kind happened.

Listeners (health checks, readiness) hear of every flip.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("transaction_service.store")

STALL_SECONDS = 5.0
RECOVERY_SECONDS = 5.0


class WriteHealth:
    def __init__(
        self,
        description: str,
        *,
        stall_seconds: float = STALL_SECONDS,
        recovery_seconds: float = RECOVERY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._description = description
        self.stall_seconds = stall_seconds
        self.recovery_seconds = recovery_seconds
        self._clock = clock
        self._counts: dict[str, int] = {}
        self._healthy = True
        # When the current run of successes (with no failure since) began, while unhealthy.
        self._clean_since: float | None = None
        self._listeners: list[Callable[[bool], None]] = []

    def configure(self, *, stall_seconds: float, recovery_seconds: float) -> None:
        self.stall_seconds = stall_seconds
        self.recovery_seconds = recovery_seconds

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def failing(self) -> dict[str, int]:
        """Fault kinds of the current episode, each with how often it happened."""
        return dict(self._counts)

    def subscribe(self, listener: Callable[[bool], None]) -> None:
        self._listeners.append(listener)

    def failed(self, kind: str) -> None:
        """A write failed (or stalled) for `kind`, a short cause such as "disk full"."""
        self._clean_since = None
        count = self._counts[kind] = self._counts.get(kind, 0) + 1
        if count == 1:
            log.error(
                "store %s cannot write: %s; not serving until writes succeed for %gs",
                self._description,
                kind,
                self.recovery_seconds,
            )
        if self._healthy:
            self._healthy = False
            self._notify(False)

    def stalled(self, seconds: float) -> None:
        """A commit has been running for `seconds` (over `stall_seconds`) and is still running."""
        self.failed(f"commits stalled (one has run for over {seconds:g}s)")

    def succeeded(self) -> None:
        if self._healthy:
            return
        now = self._clock()
        if self._clean_since is None:
            self._clean_since = now
        if now - self._clean_since < self.recovery_seconds:
            return
        summary = ", ".join(f"{kind} x{count}" for kind, count in self._counts.items())
        log.warning("store %s writes again after %s; serving", self._description, summary)
        self._counts.clear()
        self._clean_since = None
        self._healthy = True
        self._notify(True)

    def _notify(self, healthy: bool) -> None:
        for listener in self._listeners:
            try:
                listener(healthy)
            except Exception:
                log.exception("store health listener failed")
