"""The one commit path: every write that can change what callers see goes through `CommitPath`.

A writer (ingest, the results fetcher, reconcile, rebuild) names the keys of its batch and hands
over a pure planner; the store locks, loads, plans and commits (`BatchWriter.write`). Then, here and
nowhere else, what was committed is made known, in revision order:

- the changes are published to the watch hub (through the change feed, which keeps publishing in
  revision order when other replicas commit in between);
- the head revision metric is moved on;
- the results fetcher is woken when the batch marked combined results to fetch now.

So no writer wires a callback of its own, and a writer added later cannot forget to publish: it
has no other way to write.

`commit_each` commits a batch of items (deliveries) so that one item cannot fail the others: when
the store refuses the data of the batch, the batch is split in halves and each half committed on
its own, down to the one item to blame; when rows of some items are locked by another database
session, the batch commits without those items. Each item gets its own answer.

While a commit runs longer than the store's `health.stall_seconds`, the store's health says so
(NOT_SERVING): a stalled store is as useless to callers as a failing one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Generic, TypeVar

from transaction_service.metrics import Metrics
from transaction_service.store.base import (
    Answer,
    AppliedBatch,
    BatchKeys,
    BatchWriter,
    ChangeRecord,
    KeysBusy,
    Planner,
    StoreDataRefused,
)

log = logging.getLogger(__name__)

Publish = Callable[[Sequence[ChangeRecord]], None]
Item = TypeVar("Item")
ItemAnswer = TypeVar("ItemAnswer")


@dataclass(frozen=True)
class Committed(Generic[ItemAnswer]):
    """An item's answer from the batch that committed it."""

    applied: AppliedBatch
    answer: ItemAnswer


# What `commit_each` gives each item: its answer, or why it was not committed (KeysBusy,
# StoreDataRefused for the one item whose data the store refused, or what the store raised).
ItemResult = Committed[ItemAnswer] | Exception


class CommitPath:
    """Commits planned batches and publishes what they changed.

    `publish` gets the committed changes of each batch, in revision order (the app passes its
    change feed's; a command without watchers, such as an offline rebuild, passes none).
    `results_wanted` is set whenever a committed batch marked combined results as due: the
    results fetcher waits on it.
    """

    def __init__(
        self,
        writer: BatchWriter,
        *,
        publish: Publish | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._writer = writer
        self._publish = publish
        self._metrics = metrics if metrics is not None else Metrics()
        self._clock = clock
        self.results_wanted = asyncio.Event()

    async def commit(self, keys: BatchKeys, plan: Planner[Answer]) -> tuple[AppliedBatch, Answer]:
        """Commit the batch `plan` makes of the state of `keys` (see `BatchWriter.write`), then make
        its changes known. Raises what the store raises; then nothing was written."""
        health = self._writer.health
        started = time.monotonic()
        # Reported while the commit still runs: a commit that hangs has no end to report at.
        stall = asyncio.get_running_loop().call_later(
            health.stall_seconds, lambda: health.stalled(time.monotonic() - started)
        )
        try:
            applied, answer = await self._writer.write(keys, plan)
        finally:
            stall.cancel()
        self._committed(applied)
        return applied, answer

    async def commit_each(
        self,
        items: Sequence[Item],
        keys_of: Callable[[Sequence[Item]], BatchKeys],
        plan_of: Callable[[Sequence[Item]], Planner[Sequence[ItemAnswer]]],
    ) -> list[ItemResult[ItemAnswer]]:
        """Commit `items` as one batch (`keys_of` names its keys, `plan_of` plans it, answering
        each item in order); each item's result, in order. One item cannot fail the others:

        - StoreDataRefused: the batch is split in halves, each committed on its own, until the
          item whose data the store refuses is alone; it gets the StoreDataRefused.
        - KeysBusy: the items that touch the locked rows get it; the others are committed.
        - any other error fails the items of the batch (or part) that raised it.
        """
        results: list[ItemResult[ItemAnswer] | None] = [None] * len(items)
        # Parts to commit, the next on top; first halves before second halves, so that a
        # stream's deliveries are committed in the order they came.
        parts: list[list[int]] = [list(range(len(items)))]
        while parts:
            part = parts.pop()
            chosen = [items[i] for i in part]
            try:
                applied, answers = await self.commit(keys_of(chosen), plan_of(chosen))
            except StoreDataRefused as refused:
                if len(part) == 1:
                    results[part[0]] = refused
                else:
                    middle = len(part) // 2
                    parts += [part[middle:], part[:middle]]
                continue
            except KeysBusy as busy:
                blocked = {i for i in part if busy.touches(keys_of([items[i]]))}
                for i in blocked:
                    results[i] = busy
                rest = [i for i in part if i not in blocked]
                if rest and blocked:
                    parts.append(rest)
                elif rest:
                    # Locked rows none of the items names (found through the order index):
                    # they are refused together, rather than tried again forever.
                    for i in rest:
                        results[i] = busy
                continue
            except Exception as exc:
                for i in part:
                    results[i] = exc
                continue
            for i, answer in zip(part, answers, strict=True):
                results[i] = Committed(applied, answer)
        done = [result for result in results if result is not None]
        assert len(done) == len(items)
        return done

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
