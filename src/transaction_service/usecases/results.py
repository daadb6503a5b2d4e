"""Combined results: fetched from Junction's API when a transaction completes (and again when its
results are corrected), stored, reported with a RESULTS_READY change, and handed out.

How a fetch is never lost:
1. The ingest plan writes a *results marker* (`results_pending`) in the same commit as the change
   that completes the transaction or corrects its results (see `plan.py`), so the marker exists
   exactly when the change does, and survives a crash or a restart.
2. `ResultsFetcher` works through the markers that are due: it fetches
   `GET /v3/order_transaction/{id}/result` and commits, in one batch through the store's batch
   write, the results, a RESULTS_READY change (a new revision of the transaction, so watchers are
   told) and the cleared marker. A failed fetch moves the marker's due time on with exponential
   backoff (or what Junction's Retry-After asked); partial results are stored and reported, and
   fetched again with backoff until they are final.
3. A marker names the revision of the change that asked. A correction arriving while a fetch is
   under way replaces the marker, and the older fetch does not clear it: the newer results are
   fetched too.

Replicas: one fetches at a time (the store's `exclusive("results")`), and the planner drops
results whose digest is already stored, so even two fetches of the same results report once.

Results are health data: never logged (log lines carry ids, counts and status lines only), and
erased after the body retention period (`Store.erase_results`). Markers older than that period
are dropped with a warning: what they would fetch would be erased at once.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import random as _random
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from transaction_service.domain.diff import NOTHING, diff_to_json
from transaction_service.domain.explain import bounded
from transaction_service.domain.state import (
    ChangeKind,
    TransactionStatus,
    TransactionView,
    knowledge_to_json,
    view_to_json,
)
from transaction_service.errors import FailedPrecondition, Overloaded, Reason, echo
from transaction_service.junction.answers import TransactionResults
from transaction_service.junction.client import (
    JunctionClient,
    JunctionError,
    JunctionPermanentError,
    JunctionUnavailable,
)
from transaction_service.junction.errors import JunctionNotConfigured, provider_errors
from transaction_service.metrics import Metrics
from transaction_service.store.base import (
    BatchKeys,
    BatchPlan,
    BatchState,
    ChangeWrite,
    EventWrite,
    Jobs,
    PendingResults,
    PendingResultsWrite,
    Results,
    ResultsWrite,
    StoredResults,
    TransactionWrite,
)
from transaction_service.usecases.commit import CommitPath
from transaction_service.usecases.plan import Outcome

log = logging.getLogger(__name__)

# The event id of a RESULTS_READY change: the results it reports, by digest.
RESULTS_EVENT_PREFIX = "api:results:sha256:"
# How a fetch appears in the transaction's delivery history.
RESULTS_SOURCE = "results"
RESULTS_EVENT_TYPE = "results.fetched"
PARTIAL = "partial"
# Backoff of failed (or partial) fetches: 5 s doubling up to an hour, with jitter; a marker is
# retried until it succeeds or is older than the body retention.
RETRY_BASE_SECONDS = 5.0
RETRY_MAX_SECONDS = 3600.0
# Markers written by other replicas are noticed within this; this process's own completions wake
# the fetcher at once.
POLL_SECONDS = 5.0
DUE_PAGE = 20
PDF_CHUNK_BYTES = 64 * 1024


def retry_delay(
    attempts: int,
    rand: Callable[[], float] = _random.random,
    *,
    base: float = RETRY_BASE_SECONDS,
    most: float = RETRY_MAX_SECONDS,
) -> float:
    """Seconds before attempt `attempts + 1`: exponential, with "equal jitter" (half fixed, half
    random), so a retry is never immediate and many markers do not retry in step."""
    ceiling = min(most, base * 2.0 ** max(0, attempts - 1))
    return ceiling / 2 + rand() * ceiling / 2


def failure_reason(exc: JunctionError) -> str:
    """A short status line for a failed fetch, fit for a log line and the marker: never the
    provider's message, which could echo health data."""
    if isinstance(exc, JunctionUnavailable):
        return f"unavailable: {exc.last_failure}"
    if isinstance(exc, JunctionPermanentError):
        return f"refused: HTTP {exc.status}"
    return "request not sent"


# --------------------------------------------------------------------------------------------------
# Planning (pure): what a fetch writes, through the store's batch write.
# --------------------------------------------------------------------------------------------------


def results_keys(transaction_id: str) -> BatchKeys:
    """The transaction (locked, loaded) and its results state."""
    ids = frozenset({transaction_id})
    return BatchKeys(frozenset(), frozenset(), ids, results_of=ids)


def plan_fetched(
    state: BatchState,
    pending: PendingResults,
    results: TransactionResults,
    now: datetime,
    again_at: datetime,
    *,
    give_up: bool = False,
) -> tuple[BatchPlan, bool]:
    """The writes after a successful fetch, and whether they report RESULTS_READY.

    New results (a digest not stored, or stored but erased) are stored with a RESULTS_READY change
    of the transaction. The marker is cleared if it is still the one this fetch was for, unless
    the results are partial: then it is due again at `again_at` (or dropped, with `give_up`).
    """
    plan = BatchPlan()
    transaction_id = pending.transaction_id
    stored = state.transactions.get(transaction_id)
    marker = state.results_pending.get(transaction_id)
    ready = False
    digest = hashlib.sha256(results.raw_json).hexdigest()
    if stored is not None and state.results_kept.get(transaction_id) != digest:
        view_json = view_to_json(stored.view)
        plan.changes.append(
            ChangeWrite(
                transaction_id=transaction_id,
                event_id=RESULTS_EVENT_PREFIX + digest,
                order_id=None,
                kinds=(ChangeKind.RESULTS_READY,),
                view=stored.view,
                recorded_at=now,
                view_json=view_json,
                diff=NOTHING,
                diff_json=diff_to_json(NOTHING),
            )
        )
        plan.transactions[transaction_id] = TransactionWrite(
            knowledge=stored.knowledge,
            view=stored.view,
            change=0,
            revision=stored.revision,
            knowledge_json=knowledge_to_json(stored.knowledge),
            view_json=view_json,
        )
        plan.results.append(
            ResultsWrite(
                transaction_id=transaction_id,
                status=results.status,
                digest=digest,
                body=results.raw_json,
                fetched_at=now,
                change=0,
            )
        )
        ready = True
    if stored is not None:
        plan.history.append(_fetch_record(transaction_id, results.status, digest, now, ready))
    if marker is None or marker.requested_revision != pending.requested_revision:
        return plan, ready  # cleared already, or asked for again meanwhile: leave it
    if stored is None or results.status != PARTIAL or give_up:
        plan.results_done.add(transaction_id)
    else:
        plan.results_pending[transaction_id] = _again(marker, again_at, "partial results")
    return plan, ready


def _fetch_record(
    transaction_id: str, status: str, digest: str, now: datetime, ready: bool
) -> EventWrite:
    """The fetch, as a row of the transaction's delivery history: one row per version of the
    results (fetching the same again counts on it, like a retried delivery)."""
    if ready:
        reason = f"combined results fetched (`{status}`), reported with RESULTS_READY"
    else:
        reason = f"the same combined results (`{status}`) as stored already"
    return EventWrite(
        event_id=f"{RESULTS_EVENT_PREFIX}{digest}:{transaction_id}",
        event_type=RESULTS_EVENT_TYPE,
        source=RESULTS_SOURCE,
        body_format="json",
        body=None,
        digest=digest,
        order_id=None,
        transaction_id=transaction_id,
        outcome=(Outcome.APPLIED if ready else Outcome.STALE).value,
        change=0 if ready else None,
        received_at=now,
        reason=bounded(reason),
    )


def plan_missing_results(state: BatchState, transaction_id: str, now: datetime) -> BatchPlan:
    """A results marker, due now, for a COMPLETED transaction whose results were never fetched
    (it completed while no API key was configured, say), as its completing change would have
    written. Nothing if it has results kept or a marker already, or is not (or no longer)
    COMPLETED, or is a legacy stand-in."""
    plan = BatchPlan()
    stored = state.transactions.get(transaction_id)
    if (
        stored is None
        or stored.view.legacy
        or stored.view.status != TransactionStatus.COMPLETED
        or transaction_id in state.results_kept
        or transaction_id in state.results_pending
    ):
        return plan
    plan.results_pending[transaction_id] = PendingResultsWrite(
        transaction_id=transaction_id,
        change=None,
        requested_revision=stored.revision,
        requested_at=now,
        attempts=0,
        due_at=now,
    )
    return plan


def plan_failed(
    state: BatchState,
    pending: PendingResults,
    reason: str,
    again_at: datetime,
    *,
    give_up: bool = False,
) -> BatchPlan:
    """The writes after a failed fetch: the marker due again at `again_at`, or dropped."""
    plan = BatchPlan()
    transaction_id = pending.transaction_id
    marker = state.results_pending.get(transaction_id)
    if marker is None or marker.requested_revision != pending.requested_revision:
        return plan
    if give_up:
        plan.results_done.add(transaction_id)
        return plan
    plan.results_pending[transaction_id] = _again(marker, again_at, reason)
    return plan


def _again(marker: PendingResults, again_at: datetime, reason: str) -> PendingResultsWrite:
    """The marker rewritten after an attempt that did not finish it: one attempt more, due again
    at `again_at`, saying why."""
    return PendingResultsWrite(
        transaction_id=marker.transaction_id,
        change=None,
        requested_revision=marker.requested_revision,
        requested_at=marker.requested_at,
        attempts=marker.attempts + 1,
        due_at=again_at,
        last_failure=reason,
    )


# --------------------------------------------------------------------------------------------------
# Fetching: the background worker.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchOutcome:
    transaction_id: str
    # "ready" (new results reported), "unchanged", "partial", "failed" or "gave_up".
    outcome: str


class ResultsStore(Results, Jobs, Protocol):
    """What the fetcher reads: due markers, under the job lock that one replica holds."""


class ResultsFetcher:
    """Works through due results markers until cancelled; a commit that marks results due
    (`CommitPath.results_wanted`) makes it look at once."""

    def __init__(
        self,
        store: ResultsStore,
        commits: CommitPath,
        client: JunctionClient,
        *,
        retention: timedelta,
        metrics: Metrics | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        rand: Callable[[], float] = _random.random,
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self._store = store
        self._commits = commits
        self._client = client
        self._retention = retention
        self._metrics = metrics if metrics is not None else Metrics()
        self._clock = clock
        self._rand = rand
        self._poll_seconds = poll_seconds
        self._wakeup = commits.results_wanted

    async def run(self) -> None:
        while True:
            self._wakeup.clear()
            try:
                async with self._store.exclusive("results") as mine:
                    if mine:
                        await self.fetch_due()
            except Exception:
                log.exception("fetching combined results failed; will retry")
            try:
                async with asyncio.timeout(self._poll_seconds):
                    await self._wakeup.wait()
            except TimeoutError:
                pass

    async def fetch_due(self) -> list[FetchOutcome]:
        """Fetch every marker due now, a page at a time (the client caps the requests in
        flight); each marker at most once per call."""
        now = self._clock()
        done: list[FetchOutcome] = []
        seen: set[str] = set()
        while True:
            page = await self._store.results_due(now, DUE_PAGE)
            due = [p for p in page if p.transaction_id not in seen]
            if not due:
                return done
            seen.update(p.transaction_id for p in due)
            done += await asyncio.gather(*(self.fetch(p) for p in due))

    async def fetch(self, pending: PendingResults) -> FetchOutcome:
        """Fetch one transaction's results and commit what that means."""
        transaction_id = pending.transaction_id
        now = self._clock()
        give_up = now - pending.requested_at > self._retention
        try:
            results = await self._client.get_transaction_results(transaction_id)
        except JunctionError as exc:
            reason = failure_reason(exc)
            delay = retry_delay(pending.attempts + 1, self._rand)
            if isinstance(exc, JunctionUnavailable) and exc.retry_after is not None:
                delay = max(delay, exc.retry_after)
            again_at = now + timedelta(seconds=delay)
            await self._commits.commit(
                results_keys(transaction_id),
                lambda state: (
                    plan_failed(state, pending, reason, again_at, give_up=give_up),
                    None,
                ),
            )
            outcome = "gave_up" if give_up else "failed"
            log.warning(
                "combined results not fetched (%s); %s",
                reason,
                "giving up: older than the body retention"
                if give_up
                else f"attempt {pending.attempts + 1}, next in {delay:.0f} s",
                extra={"fields": {"transaction_id": transaction_id}},
            )
            self._metrics.results_fetched(outcome)
            return FetchOutcome(transaction_id, outcome)

        again_at = now + timedelta(seconds=retry_delay(pending.attempts + 1, self._rand))
        applied, ready = await self._commits.commit(
            results_keys(transaction_id),
            lambda state: plan_fetched(state, pending, results, now, again_at, give_up=give_up),
        )
        if ready:
            outcome = "ready"
        elif results.status == PARTIAL:
            outcome = "partial"
        else:
            outcome = "unchanged"
        # Counts and status only: the results are health data.
        log.info(
            "combined results fetched",
            extra={
                "fields": {
                    "transaction_id": transaction_id,
                    "status": results.status,
                    "outcome": outcome,
                    "revision": applied.changes[-1].revision if applied.changes else None,
                }
            },
        )
        self._metrics.results_fetched(outcome)
        return FetchOutcome(transaction_id, outcome)


# --------------------------------------------------------------------------------------------------
# Reading: what GetTransactionResults and GetTransactionResultsPdf hand out.
# --------------------------------------------------------------------------------------------------


async def stored_results(store: Results, view: TransactionView) -> StoredResults:
    """The transaction's stored results with their body; FailedPrecondition saying why not."""
    results, pending = await store.get_results(view.id)
    if results is not None and results.body is not None:
        return results
    if results is not None:
        raise FailedPrecondition(
            f"the results of transaction {echo(view.id)} were erased: they are kept for the "
            "body retention period (TRANSACTION_SERVICE_BODY_RETENTION_SECONDS)",
            reason=Reason.RESULTS_ERASED,
        )
    if pending is not None:
        detail = f"{pending.attempts} attempt(s) so far"
        if pending.last_failure:
            detail += f", the last: {pending.last_failure}"
        message = (
            f"the results of transaction {echo(view.id)} are being fetched from Junction "
            f"({detail}); watch for RESULTS_READY"
        )
    elif view.legacy:
        message = (
            f"transaction {echo(view.id)} stands in for a legacy order, which has no order "
            "transaction at Junction and so no combined results"
        )
    elif view.status != TransactionStatus.COMPLETED:
        message = (
            f"transaction {echo(view.id)} is {view.status.value.upper()}: combined results are "
            "fetched once it is COMPLETED; watch for RESULTS_READY"
        )
    else:
        message = (
            f"no results are stored for transaction {echo(view.id)}: it completed while "
            "Junction's API was not configured, or fetching them gave up after the body "
            "retention; ReconcileTransaction fetches them"
        )
    raise FailedPrecondition(message, reason=Reason.RESULTS_NOT_READY)


class PdfBudget:
    """What interactive GetTransactionResultsPdf calls may use of Junction's API, apart from the
    requests reconcile, the sweep and the results fetcher make: at most `max_calls` in progress
    at once (fetching from Junction, then sending the PDF from memory) and `per_minute` started
    in any minute. Past either: Overloaded (RESOURCE_EXHAUSTED) with when to retry."""

    def __init__(
        self, max_calls: int, per_minute: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_calls = max_calls
        self.per_minute = per_minute
        self._clock = clock
        self._in_progress = 0
        self._started: collections.deque[float] = collections.deque()

    @property
    def in_progress(self) -> int:
        return self._in_progress

    @contextmanager
    def seat(self) -> Iterator[None]:
        """A call's place in the budget, held until it ends; Overloaded if there is none."""
        now = self._clock()
        while self._started and self._started[0] <= now - 60.0:
            self._started.popleft()
        if self._in_progress >= self.max_calls:
            raise Overloaded(
                f"{self._in_progress} results PDFs are being fetched or sent already, as many "
                "as this server allows at once (TRANSACTION_SERVICE_RESULTS_PDF_MAX_CALLS); "
                "retry in a moment",
                reason=Reason.PDF_BUDGET_EXHAUSTED,
                metadata={"limit": "results_pdf_max_calls", "value": str(self.max_calls)},
                retry_after=1.0,
            )
        if len(self._started) >= self.per_minute:
            wait = max(0.1, self._started[0] + 60.0 - now)
            raise Overloaded(
                f"{len(self._started)} results PDFs were asked for in the last minute, as many "
                "as this server allows (TRANSACTION_SERVICE_RESULTS_PDF_CALLS_PER_MINUTE); "
                f"retry in {wait:.0f} s",
                reason=Reason.PDF_BUDGET_EXHAUSTED,
                metadata={
                    "limit": "results_pdf_calls_per_minute",
                    "value": str(self.per_minute),
                },
                retry_after=wait,
            )
        self._started.append(now)
        self._in_progress += 1
        try:
            yield
        finally:
            self._in_progress -= 1


async def results_pdf(
    client: JunctionClient | None,
    view: TransactionView,
    budget: PdfBudget,
    *,
    max_bytes: int,
) -> AsyncGenerator[bytes]:
    """The results PDF, fetched whole from Junction (at most `max_bytes`) within the budget's
    place for this call, then handed out in chunks; errors mapped to service errors. The place
    is held until the iterator ends (or is closed): use `aclosing` when you may stop early."""
    if client is None:
        raise JunctionNotConfigured
    if view.legacy:
        raise FailedPrecondition(
            f"transaction {echo(view.id)} stands in for a legacy order, which has no order "
            "transaction at Junction and so no combined results",
            reason=Reason.RESULTS_NOT_READY,
        )
    with budget.seat():
        with provider_errors():
            chunks = await client.fetch_transaction_results_pdf(
                view.id, max_bytes=max_bytes, chunk_size=PDF_CHUNK_BYTES
            )
        # Junction's request (and its slot) is over: the caller may read as slowly as it likes.
        # Each chunk is let go of once handed out.
        chunks.reverse()
        while chunks:
            yield chunks.pop()
