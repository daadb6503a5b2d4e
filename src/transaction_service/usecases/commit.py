"""The one commit path: every write that can change what callers see goes through `CommitPath`.

A writer (ingest, the results fetcher, reconcile, rebuild) names the keys of its batch and hands
over a pure planner; the store locks, loads, plans and commits (`Store.write`). Then, here and
nowhere else, what was committed is made known, in revision order:

- the changes are published to the watch hub (through the change feed, which keeps publishing in
  revision order when other replicas commit in between);
- the head revision metric is moved on;
- the results fetcher is woken when the batch marked combined results to fetch now.

So no writer wires a callback of its own, and a writer added later cannot forget to publish: it
has no other way to write.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from transaction_service import tracing
from transaction_service.metrics import Metrics
from transaction_service.store.base import (
    Answer,
    AppliedBatch,
    BatchKeys,
    ChangeRecord,
    Planner,
    Store,
)

log = logging.getLogger(__name__)

Publish = Callable[[Sequence[ChangeRecord]], None]


class CommitPath:
    """Commits planned batches and publishes what they changed.

    `publish` gets the committed changes of each batch, in revision order (the app passes its
    change feed's; a command without watchers, such as an offline rebuild, passes none).
    `results_wanted` is set whenever a committed batch marked combined results as due: the
    results fetcher waits on it.
    """

    def __init__(
        self,
        store: Store,
        *,
        publish: Publish | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.store = store
        self._publish = publish
        self._metrics = metrics if metrics is not None else Metrics()
        self._clock = clock
        self.results_wanted = asyncio.Event()

    async def commit(self, keys: BatchKeys, plan: Planner[Answer]) -> tuple[AppliedBatch, Answer]:
        """Commit the batch `plan` makes of the state of `keys` (see `Store.write`), then make
        its changes known. Raises what the store raises; then nothing was written. Timed
        (`store_commit_seconds`), and traced as `store commit` and `publish` when tracing is on."""
        with tracing.span("store commit"):
            started = time.perf_counter()
            applied, answer = await self.store.write(keys, plan)
            self._metrics.store_committed(time.perf_counter() - started)
            with tracing.span("publish", {"transaction_service.changes": len(applied.changes)}):
                self._committed(applied)
        return applied, answer

    def _committed(self, applied: AppliedBatch) -> None:
        changes = applied.changes
        if changes:
            if self._publish is not None:
                try:
                    self._publish(changes)
                except Exception:
                    # A bug in the hub: logged; the commit stands and is answered.
                    log.exception("publishing committed changes failed")
            self._metrics.revision_committed(changes[-1].revision)
        now = self._clock()
        if any(p.due_at <= now for p in applied.plan.results_pending.values()):
            self.results_wanted.set()
