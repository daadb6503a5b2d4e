"""Reconcile with Junction's API: what the API says, taken in exactly as webhooks are.

Webhooks are at-least-once only while the endpoint comes back; after an outage, a bad secret or
a provider incident a transaction can be stuck in a state that is no longer true. Reconciling asks
the API (`GET /v3/order_transaction/{id}` and `GET /v3/order/{id}` for its orders), turns each
answer into a webhook-shaped body (`junction/mapping.py`) and hands it to the one ingest entry,
`Ingestor.ingest`: the same dedupe and merge, recorded with source `api`, counted and logged
like webhooks. Old news is STALE; the same answer twice is a DUPLICATE (its event id is the
digest of the body); a webhook arriving after a reconcile is STALE or DUPLICATE.

Three ways in, one use case (`Reconciler`):
- `reconcile`: one transaction, by its id or one of its order ids (the ReconcileTransaction RPC);
- `sweep`: every ACTIVE transaction silent for longer than RECONCILE_AFTER_SECONDS (run now and
  then by `sweep_forever`, one replica at a time);
- `backfill`: every transaction with an order updated in a window (`GET /v3/orders`), or a
  request that Junction re-sends their webhooks (`resend`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from transaction_service.domain.limits import StateLimits
from transaction_service.domain.state import TransactionStatus
from transaction_service.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Reason,
    ServiceError,
    Unavailable,
    echo,
)
from transaction_service.junction.answers import OrderAnswer
from transaction_service.junction.client import MAX_PAGE_SIZE, JunctionClient, JunctionNotFound
from transaction_service.junction.errors import JunctionNotConfigured, provider_errors
from transaction_service.junction.mapping import (
    SOURCE_FIELD,
    ApiEvent,
    order_event,
    transaction_event,
)
from transaction_service.metrics import Metrics
from transaction_service.store.base import (
    Jobs,
    ReconcileChecks,
    Results,
    TransactionReads,
    TransactionSnapshot,
)
from transaction_service.usecases.commit import CommitPath
from transaction_service.usecases.ingest import Delivery, IngestResult, Outcome, decode_delivery
from transaction_service.usecases.results import plan_missing_results, results_keys

log = logging.getLogger(__name__)

Ingest = Callable[[Delivery], Awaitable[IngestResult]]
# Transactions asked about per query of the sweep.
SWEEP_PAGE = 100


@dataclass(frozen=True)
class ReconciledAnswer:
    """One answer of Junction's API, taken in as an event."""

    endpoint: str
    order_id: str
    result: IngestResult


@dataclass(frozen=True)
class Reconciled:
    """What reconciling one transaction did."""

    transaction: TransactionSnapshot | None
    answers: list[ReconciledAnswer]
    head_revision: int

    @property
    def changed(self) -> bool:
        return any(a.result.outcome == Outcome.APPLIED for a in self.answers)


@dataclass(frozen=True)
class BackfillProgress:
    """One step of a back-fill: a transaction done (or, with no id, only orders read), and the
    counts so far."""

    transaction_id: str
    # "changed", "unchanged", "failed"; "" when the step reports no transaction.
    outcome: str
    error: str
    orders_total: int
    orders_read: int
    changed: int
    unchanged: int
    failed: int
    done: bool = False


@dataclass
class SweepReport:
    checked: int = 0
    changed: int = 0
    failed: int = 0
    # Junction was unavailable: the sweep stopped early and tries again at its next turn.
    interrupted: bool = False


@dataclass
class _Counts:
    changed: int = 0
    unchanged: int = 0
    failed: int = 0
    orders_total: int = 0
    orders_read: int = 0

    def step(self, transaction_id: str, outcome: str, error: str = "") -> BackfillProgress:
        if outcome:
            setattr(self, outcome, getattr(self, outcome) + 1)
        return BackfillProgress(
            transaction_id=transaction_id,
            outcome=outcome,
            error=error,
            orders_total=self.orders_total,
            orders_read=self.orders_read,
            changed=self.changed,
            unchanged=self.unchanged,
            failed=self.failed,
        )


class ReconcileStore(TransactionReads, Results, ReconcileChecks, Jobs, Protocol):
    """What reconciliation reads and records: the current state and results of a transaction,
    the sweep's candidates and checks, under the job lock that one replica holds."""


class Reconciler:
    """The reconcile use case. `client` is None when no API key is configured: every call then
    fails with FAILED_PRECONDITION naming the setting."""

    def __init__(
        self,
        store: ReconcileStore,
        commits: CommitPath,
        client: JunctionClient | None,
        *,
        ingest: Ingest,
        max_body_bytes: int,
        limits: StateLimits,
        concurrency: int = 4,
        backfill_page_size: int = MAX_PAGE_SIZE,
        metrics: Metrics | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._commits = commits
        self._client = client
        self._ingest = ingest
        self._max_body_bytes = max_body_bytes
        self._limits = limits
        # Transactions reconciled at once by the sweep and back-fill (the client caps requests).
        self._concurrency = concurrency
        # Orders per page of `GET /v3/orders` (the provider's most is 100).
        self.backfill_page_size = backfill_page_size
        self._metrics = metrics if metrics is not None else Metrics()
        self._clock = clock

    def client(self) -> JunctionClient:
        if self._client is None:
            raise JunctionNotConfigured
        return self._client

    # ------------------------------------------------------------------------------ one transaction

    async def reconcile(
        self, *, transaction_id: str = "", order_id: str = "", trigger: str = "rpc"
    ) -> Reconciled:
        """Reconcile the transaction with this id, or the one of this order."""
        started = time.perf_counter()
        try:
            if order_id:
                reconciled = await self._by_order(order_id)
            else:
                reconciled = await self._by_transaction_id(transaction_id)
        except ServiceError:
            self._metrics.reconciled(trigger, "failed")
            raise
        outcome = "changed" if reconciled.changed else "unchanged"
        self._metrics.reconciled(trigger, outcome)
        outcomes: dict[str, int] = {}
        for answer in reconciled.answers:
            outcomes[answer.result.outcome.value] = outcomes.get(answer.result.outcome.value, 0) + 1
        fields = {
            "transaction_id": reconciled.transaction.view.id if reconciled.transaction else None,
            "trigger": trigger,
            "outcome": outcome,
            **{f"answers_{k}": v for k, v in sorted(outcomes.items())},
            "ms": round((time.perf_counter() - started) * 1000, 2),
        }
        log.info("reconciled", extra={"fields": fields})
        return reconciled

    async def _by_transaction_id(self, transaction_id: str) -> Reconciled:
        client = self.client()
        known, _ = await self._store.get(transaction_id)
        if known is not None and known.view.legacy:
            # A legacy stand-in's id is its order's: Junction knows the order, not a transaction.
            return await self._by_order(transaction_id)
        return await self._transaction(client, transaction_id, {})

    async def _by_order(self, order_id: str) -> Reconciled:
        client = self.client()
        with provider_errors():
            order = await client.get_order(order_id)
        block = order.order.order_transaction
        if block is not None and block.id.strip():
            return await self._transaction(client, block.id, {order.order.id: order})
        # A legacy order (no transaction block): its own answer is all there is.
        answers = await self._take_in([order_event(order)])
        snapshot, head = await self._store.get_by_order(order.order.id)
        if snapshot is not None:
            await self._store.record_reconcile_checks([snapshot.view.id], self._clock())
        return Reconciled(snapshot, answers, head)

    async def _transaction(
        self, client: JunctionClient, transaction_id: str, on_hand: dict[str, OrderAnswer]
    ) -> Reconciled:
        """Ask for the transaction and every order of it not `on_hand`; take them all in."""
        with provider_errors():
            answer = await client.get_order_transaction(transaction_id)
            wanted = [e.id for e in answer.transaction.orders if e.id not in on_hand]
            fetched = await asyncio.gather(*(self._order_if_known(client, i) for i in wanted))
        orders = {**on_hand, **{a.order.id: a for a in fetched if a is not None}}
        events = [order_event(a) for a in orders.values()]
        carrier = transaction_event(answer)
        if carrier is not None:
            events.append(carrier)
        if not events:
            raise NotFound(
                f"Junction lists no orders in transaction {echo(transaction_id)}: there is "
                "nothing to take in"
            )
        answers = await self._take_in(events)
        snapshot, head = await self._store.get(transaction_id)
        if snapshot is None:  # its orders moved elsewhere (the provider changed its mind)
            snapshot, head = await self._store.get_by_order(events[0].order_id)
        await self._store.record_reconcile_checks([transaction_id], self._clock())
        await self._ask_for_missing_results(snapshot)
        return Reconciled(snapshot, answers, head)

    async def _ask_for_missing_results(self, snapshot: TransactionSnapshot | None) -> None:
        """A COMPLETED transaction whose results were never fetched (it completed before the API
        key was configured): mark them to fetch. Results once fetched and since erased after the
        body retention are not fetched again: that erasure is the point of the retention."""
        view = snapshot.view if snapshot is not None else None
        if view is None or view.legacy or view.status != TransactionStatus.COMPLETED:
            return
        stored, pending = await self._store.get_results(view.id)
        if stored is not None or pending is not None:
            return
        now = self._clock()
        # The commit wakes the results fetcher when it marked them.
        applied, _ = await self._commits.commit(
            results_keys(view.id), lambda state: (plan_missing_results(state, view.id, now), None)
        )
        if applied.plan.results_pending:
            log.info(
                "combined results never fetched: marked to fetch",
                extra={"fields": {"transaction_id": view.id}},
            )

    async def _order_if_known(self, client: JunctionClient, order_id: str) -> OrderAnswer | None:
        # An order the transaction lists but Junction cannot show: its entry in the transaction
        # answer still brings its status; the rest of the reconcile goes on.
        try:
            return await client.get_order(order_id)
        except JunctionNotFound:
            log.warning(
                "Junction lists an order it does not show", extra={"fields": {"order_id": order_id}}
            )
            return None

    async def _take_in(self, events: Iterable[ApiEvent]) -> list[ReconciledAnswer]:
        """Ingest the answers together (one group commit), as source `api`."""
        events = list(events)
        deliveries = [self._delivery(e) for e in events]
        results = await asyncio.gather(*(self._ingest(d) for d in deliveries))
        return [
            ReconciledAnswer(endpoint=_endpoint(e), order_id=e.order_id, result=r)
            for e, r in zip(events, results, strict=True)
        ]

    def _delivery(self, event: ApiEvent) -> Delivery:
        try:
            return decode_delivery(
                event.event_id,
                payload_json=event.payload_json(),
                max_body_bytes=self._max_body_bytes,
                source="api",
                limits=self._limits,
            )
        except InvalidArgument as exc:
            # The request was fine; Junction's answer is beyond what the service keeps.
            raise FailedPrecondition(
                f"Junction's answer from {_endpoint(event)} about order {echo(event.order_id)} "
                f"cannot be taken in: {exc.message}",
                reason=Reason.ANSWER_BEYOND_LIMITS,
            ) from None

    # ---------------------------------------------------------------------------------------- sweep

    async def sweep_forever(self, *, interval: float, silence: timedelta) -> None:
        """Reconcile silent ACTIVE transactions every `interval` seconds, until cancelled; one
        replica at a time (the others find the job lock taken and skip their turn)."""
        while True:
            try:
                async with self._store.exclusive("reconcile-sweep") as mine:
                    if mine:
                        report = await self.sweep(self._clock() - silence)
                        if report.checked or report.failed or report.interrupted:
                            log.info(
                                "sweep: %d silent transaction(s) reconciled, %d changed, "
                                "%d failed%s",
                                report.checked,
                                report.changed,
                                report.failed,
                                "; stopped early: Junction is unavailable"
                                if report.interrupted
                                else "",
                            )
            except Exception:
                log.exception("the reconcile sweep failed; will retry")
            await asyncio.sleep(interval)

    async def sweep(self, silent_before: datetime) -> SweepReport:
        """Reconcile every ACTIVE transaction with no news since `silent_before`, each once.

        A transaction that fails for good (Junction does not know it, refuses) is remembered as
        checked, so it is asked again only after another silent period; if Junction is
        unavailable the sweep stops and tries again at its next turn.
        """
        report = SweepReport()
        seen: set[str] = set()
        slots = asyncio.Semaphore(self._concurrency)

        async def one(transaction_id: str) -> None:
            async with slots:
                if report.interrupted:
                    return
                try:
                    reconciled = await self.reconcile(
                        transaction_id=transaction_id, trigger="sweep"
                    )
                except Unavailable:
                    report.interrupted = True
                    return
                except ServiceError as exc:
                    report.failed += 1
                    log.warning(
                        "sweep: cannot reconcile: %s",
                        exc.message,
                        extra={"fields": {"transaction_id": transaction_id}},
                    )
                    await self._store.record_reconcile_checks([transaction_id], self._clock())
                    return
                report.checked += 1
                report.changed += reconciled.changed

        while not report.interrupted:
            candidates = await self._store.reconcile_candidates(silent_before, SWEEP_PAGE)
            fresh = [c for c in candidates if c not in seen]
            if not fresh:
                break
            seen.update(fresh)
            await asyncio.gather(*(one(c) for c in fresh))
        return report

    # ------------------------------------------------------------------------------------ back-fill

    async def backfill(
        self, since: datetime, until: datetime | None = None
    ) -> AsyncIterator[BackfillProgress]:
        """Reconcile every transaction with an order Junction updated in [since, until]: one
        step per transaction, then a last step with `done`.

        Each listed order is taken in from the listing itself; each transaction is then read
        once (with those of its orders the listing did not hold). A transaction that fails is
        counted and reported, and the back-fill goes on; Junction unavailable ends it.
        """
        client = self.client()
        counts = _Counts()
        done: set[str] = set()
        slots = asyncio.Semaphore(self._concurrency)

        async def one(key: str, orders: dict[str, OrderAnswer]) -> BackfillProgress:
            async with slots:
                try:
                    if key.startswith("order:"):
                        (order,) = orders.values()
                        answers = await self._take_in([order_event(order)])
                        reconciled = Reconciled(None, answers, 0)
                        transaction_id = order.order.id
                    else:
                        reconciled = await self._transaction(client, key, orders)
                        transaction_id = key
                except Unavailable:
                    self._metrics.reconciled("backfill", "failed")
                    raise
                except ServiceError as exc:
                    self._metrics.reconciled("backfill", "failed")
                    counts.orders_read += len(orders)
                    return counts.step(key.removeprefix("order:"), "failed", exc.message)
            outcome = "changed" if reconciled.changed else "unchanged"
            self._metrics.reconciled("backfill", outcome)
            counts.orders_read += len(orders)
            return counts.step(transaction_id, outcome)

        with provider_errors(field="since"):
            pages = client.iter_orders_updated(since, until, page_size=self.backfill_page_size)
            async for page in pages:
                if page.total is not None:
                    counts.orders_total = page.total
                else:  # at least what was listed so far
                    counts.orders_total = counts.orders_read + len(page.orders)
                groups: dict[str, dict[str, OrderAnswer]] = {}
                for answer in page.orders:
                    block = answer.order.order_transaction
                    key = block.id if block is not None and block.id.strip() else None
                    key = key or f"order:{answer.order.id}"
                    if key in done:
                        counts.orders_read += 1
                        continue
                    groups.setdefault(key, {})[answer.order.id] = answer
                done.update(groups)
                if not groups:
                    yield counts.step("", "")
                    continue
                tasks = [asyncio.ensure_future(one(k, o)) for k, o in groups.items()]
                try:
                    for finished in asyncio.as_completed(tasks):
                        yield await finished
                finally:
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
        yield dataclasses.replace(counts.step("", ""), done=True)

    async def resend(self, since: datetime, until: datetime | None = None) -> int:
        """Ask Junction to re-send the latest webhook of every order updated in [since, until];
        how many it will re-send."""
        client = self.client()
        with provider_errors(field="since"):
            order_ids = await client.resend_events(start_at=since, end_at=until)
        log.info("asked Junction to re-send webhooks", extra={"fields": {"orders": len(order_ids)}})
        return len(order_ids)


def _endpoint(event: ApiEvent) -> str:
    source = event.body.get(SOURCE_FIELD)
    return str(source.get("endpoint", "")) if isinstance(source, dict) else ""
