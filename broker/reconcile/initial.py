"""Initial sync: a push domain added to a home that holds entities in its scope gets them all,
by reconciliation's ``unlinked`` (link the peer's existing account) and ``missing`` (create)
actions, users before the groups that name them. The serving broker runs it for each push
domain whose initial sync is needed; ``broker sync DOMAIN`` asks for it again."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import aiohttp
import asyncpg

from broker.config import PropagationConfig
from broker.db import query

if TYPE_CHECKING:
    from broker.db import Connection
from broker.domains import DomainStore
from broker.errors import BrokerError
from broker.home import HomeClient
from broker.reconcile.session import make_reconciler
from broker.reconcile.situations import Options

__all__ = ["INITIAL_OPTIONS", "InitialSync", "request_initial_sync"]

log = logging.getLogger(__name__)

INITIAL_OPTIONS = Options(
    actions={
        "unlinked": "link",
        "missing": "create",
        "drifted": "sync",
        "unmatched": "report",
        "deleted": "report",
    }
)
"""Existing accounts linked (and brought to home's state), the rest created; nothing deleted."""

LOCK_CLASS = 0x5EC0
"""The advisory lock class that keeps one process per domain's initial sync."""


async def request_initial_sync(pool: asyncpg.Pool, domain: str, *, actor: str) -> None:
    """Mark the push domain's initial sync as needed (the serving broker starts it)."""
    async with pool.acquire() as conn, conn.transaction():
        if await conn.fetchval(query("set_initial_sync"), domain, "needed") is None:
            raise BrokerError(
                f"{domain} is not a push peer: `broker domain list` shows which are; an initial "
                "sync provisions home's entities into a peer the broker pushes to",
                status=400,
            )
        await conn.execute(query("audit"), actor, "domain.initial_sync", domain, {})


class InitialSync:
    """Looks for push domains whose initial sync is needed, and runs each (one process per
    domain, held by an advisory lock; a run a stopped process left is resumed)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        home: HomeClient,
        session: aiohttp.ClientSession,
        settings: PropagationConfig,
        *,
        interval: float = 1.0,
        progress: Callable[[str], None] = log.info,
    ) -> None:
        self.pool = pool
        self.home = home
        self.session = session
        self.settings = settings
        self.interval = interval
        self.progress = progress

    async def run(self) -> None:
        """Until cancelled."""
        while True:
            try:
                while await self.once():
                    pass
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("initial sync: the database is not reachable (%s); retrying", exc)
            await asyncio.sleep(self.interval)

    async def once(self) -> bool:
        """Run one domain's initial sync if one is needed (and no other process runs it);
        whether one was."""
        async with self.pool.acquire() as conn:
            for record in await conn.fetch(query("initial_syncs_wanted")):
                domain_id = record["id"]
                if not await conn.fetchval(query("lock_initial_sync"), LOCK_CLASS, domain_id):
                    continue
                try:
                    state = await conn.fetchval(query("initial_sync_state"), domain_id)
                    if state in ("needed", "running"):
                        await self._sync(conn, domain_id)
                        return True
                finally:
                    await conn.fetchval(query("release_initial_sync"), LOCK_CLASS, domain_id)
        return False

    async def _sync(self, conn: Connection, domain_id: str) -> None:
        await conn.execute(query("set_initial_sync"), domain_id, "running")
        state = "failed"
        try:
            domain = await DomainStore(self.pool).get(domain_id)
            reconciler = make_reconciler(
                self.pool, self.home, self.session, domain, self.settings, progress=self.progress
            )
            run = await reconciler.start(
                INITIAL_OPTIONS, actor="broker:initial-sync", initial_sync=True
            )
            report = await reconciler.run(run)
            state = "done" if report.phase == "done" else "failed"
        except BrokerError as exc:
            log.warning("initial sync of %s failed: %s", domain_id, exc.detail)
        except Exception:
            log.exception("initial sync of %s failed", domain_id)
        finally:
            await conn.execute(query("set_initial_sync"), domain_id, state)
