"""The background chores that keep the store in shape: trimming the change log, erasing expired
bodies and results (privacy), and probing a store that cannot write so that its recovery is
noticed without traffic. Each loop runs until cancelled and survives its own failures."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

from transaction_service.store.base import BatchWriter, Housekeeping

log = logging.getLogger(__name__)

STORE_PROBE_SECONDS = 2.0


async def housekeeping_forever(
    store: Housekeeping, *, change_retention: timedelta, body_retention: timedelta, interval: float
) -> None:
    """Trim the change log and erase expired bodies, every `interval` seconds."""
    while True:
        now = datetime.now(UTC)
        try:
            compacted = await store.trim_changes(now - change_retention)
            log.debug("change log compacted through revision %d", compacted)
            if erased := await store.erase_bodies(now - body_retention):
                log.info("erased %d webhook bodies older than the body retention", erased)
            if erased := await store.erase_results(now - body_retention):
                log.info("erased %d combined results older than the body retention", erased)
        except Exception:
            log.exception("housekeeping failed; will retry")
        await asyncio.sleep(interval)


async def probe_store_forever(store: BatchWriter, *, interval: float = STORE_PROBE_SECONDS) -> None:
    """A store that cannot write reports NOT_SERVING, so balancers send no more traffic, and
    without traffic nothing would notice the fault is fixed: try a tiny write now and then."""
    while True:
        await asyncio.sleep(interval)
        if not store.health.healthy:
            await store.probe()
