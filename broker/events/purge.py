"""The purge of what change notification has finished with: SETs acknowledged (or skipped) more
than ``[events] acknowledged_retention`` ago, and home changes recorded more than ``[events]
changes_retention`` ago that no SET names any more (the last one of each entity stays, as the
base its next change is compared with). Like the outbox's purge (``broker.propagation.claims``),
a batch per statement, so no transaction holds many rows, and ``SKIP LOCKED``, so several
processes purge side by side."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import asyncpg

from broker.db import query

__all__ = ["EventRetention", "purge_events", "purging"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EventRetention:
    acknowledged: float = 7 * 86400.0
    """Seconds an acknowledged or skipped SET is kept (0: for ever)."""
    changes: float = 30 * 86400.0
    """Seconds a home change is kept once no SET names it (0: for ever)."""


async def _purge(pool: asyncpg.Pool, name: str, retention: float, batch: int) -> int:
    if retention <= 0:
        return 0
    purged = 0
    while True:
        status = await pool.execute(query(name), retention, batch)
        deleted = int(status.split()[-1])
        purged += deleted
        if deleted < batch:
            return purged


async def purge_events(
    pool: asyncpg.Pool, retention: EventRetention, batch: int = 5000
) -> tuple[int, int]:
    """Delete settled SETs, then the changes they named; how many of each went."""
    events = await _purge(pool, "purge_settled_events", retention.acknowledged, batch)
    changes = await _purge(pool, "purge_home_changes", retention.changes, batch)
    if events or changes:
        log.info("purged %d settled SETs and %d recorded home changes", events, changes)
    return events, changes


async def purging(pool: asyncpg.Pool, retention: EventRetention, every: float) -> None:
    """Purge every ``every`` seconds, for as long as the task runs."""
    while True:
        await asyncio.sleep(every)
        try:
            await purge_events(pool, retention)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("the SET purge cannot reach the database: %s", exc)
