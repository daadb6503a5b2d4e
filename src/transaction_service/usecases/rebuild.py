"""Re-deriving every transaction from its stored events, after a merge-rule change.

The merge rule lives in code (`domain/state.py`); what the store keeps per transaction is the
knowledge and the view that rule made of the events at the time. When the rule changes, `rebuild`
walks every transaction (by id, so transactions changing meanwhile are neither skipped nor visited
twice), and for each batch of them, under the store's own locks, loads the events of their orders,
replays them with the current rule (`plan.plan_rebuild`: the knowledge is replaced, not joined)
and writes the differences through the store's normal write path. A difference a caller can see
gets a new revision and a change in the log with its change kinds, like any ingested change, so
every watcher, on every replica, hears of it and can resume across it.

Online or offline: online where the store allows it. On PostgreSQL it runs while the replicas
serve: each batch takes the same advisory locks as ingest, so a delivery for a transaction being
rebuilt waits for that batch (and is then merged into the rebuilt state), and each replica's
change feed publishes the changes to its watchers. SQLite allows one writer process, which the
running service holds: there `rebuild` runs with the service stopped (the store's lock says so),
and watchers see the changes when they resume from their last revision after the restart. Run
it after every replica runs the new rule, so nothing merges with the old one meanwhile.

Events whose bodies were erased by the body retention cannot be replayed: a transaction with any
such event keeps its current state and is counted as not fully re-derived.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from transaction_service.domain.limits import DEFAULT_LIMITS, StateLimits
from transaction_service.store.base import BatchKeys, BatchPlan, BatchState, TransactionReads
from transaction_service.usecases.commit import CommitPath
from transaction_service.usecases.plan import RebuildOutcome, plan_rebuild

DEFAULT_BATCH_SIZE = 100


@dataclass
class RebuildReport:
    """How many transactions each outcome had, and the revisions the changes got."""

    outcomes: Counter[RebuildOutcome] = field(default_factory=Counter)
    first_revision: int = 0
    last_revision: int = 0

    @property
    def examined(self) -> int:
        return sum(self.outcomes.values())

    def count(self, outcome: RebuildOutcome) -> int:
        return self.outcomes[outcome]


async def rebuild(
    store: TransactionReads,
    commits: CommitPath,
    *,
    limits: StateLimits = DEFAULT_LIMITS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    now: datetime | None = None,
    on_progress: Callable[[int], object] = lambda _: None,
) -> RebuildReport:
    """Rebuild every transaction of an open store, a batch at a time through the commit path
    (which publishes the changes to whoever listens); `on_progress(n)` after each batch of n."""
    started = now or datetime.now(UTC)
    report = RebuildReport()
    after = ""
    while ids := await store.transaction_ids(after, batch_size):
        keys = BatchKeys(frozenset(), frozenset(), frozenset(ids), replay=frozenset(ids))

        def plan(
            state: BatchState, ids: list[str] = ids
        ) -> tuple[BatchPlan, dict[str, RebuildOutcome]]:
            return plan_rebuild(ids, state, started, limits)

        applied, outcomes = await commits.commit(keys, plan)
        report.outcomes.update(outcomes.values())
        if applied.changes:
            report.first_revision = report.first_revision or applied.changes[0].revision
            report.last_revision = applied.changes[-1].revision
        on_progress(len(ids))
        after = ids[-1]
    return report
