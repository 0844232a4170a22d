"""The home poller: finds changes made in home directly (not through the broker), by home's own
``meta.lastModified``, and deletions by a periodic sweep of the IDs home holds; each becomes a
sync toward the push peers."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime
from typing import Any

import asyncpg

from broker.db import query
from broker.home import HomeClient, HomeUnavailable
from broker.propagation.journal import record
from broker.propagation.policy import deletion_limit
from broker.propagation.writes import HomeWrite

__all__ = ["HomePoller"]

log = logging.getLogger(__name__)


class HomePoller:
    def __init__(
        self,
        pool: asyncpg.Pool,
        home: HomeClient,
        *,
        interval: float,
        sweep_interval: float,
        page_size: int = 200,
        deletion_threshold: int | None = None,
    ) -> None:
        self.deletion_threshold = deletion_threshold
        """Deletions one sweep may pass on (None: ``policy.deletion_limit``'s default)."""
        self.pool = pool
        self.home = home
        self.interval = interval
        self.sweep_interval = sweep_interval
        self.page_size = page_size

    async def run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except (HomeUnavailable, OSError, asyncpg.PostgresError) as exc:
                log.warning("home poll failed, trying again in %ss: %s", self.interval, exc)
            await asyncio.sleep(self.interval)

    async def poll_once(self) -> int:
        """One poll of every resource type; returns how many changes were enqueued."""
        schema = await self.home.schema()
        found = 0
        for resource_type, endpoint in schema.endpoints.by_type.items():
            found += await self._changes(resource_type, endpoint)
            found += await self._sweep(resource_type, endpoint)
        return found

    async def _list(self, endpoint: str, params: dict[str, str]) -> list[dict[str, Any]]:
        """Every resource a listing returns, page by page."""
        out: list[dict[str, Any]] = []
        start = 1
        while True:
            response = await self.home.request(
                "GET",
                endpoint,
                params={**params, "startIndex": str(start), "count": str(self.page_size)},
            )
            if response.status != 200 or not isinstance(response.body, dict):
                raise HomeUnavailable(
                    f"home answered HTTP {response.status} to a listing of {endpoint}"
                )
            page = [r for r in response.body.get("Resources", []) if isinstance(r, dict)]
            out += page
            total = int(response.body.get("totalResults", 0))
            start += len(page)
            if not page or start > total:
                return out

    async def _changes(self, resource_type: str, endpoint: str) -> int:
        mark = await self.pool.fetchrow(query("watermark"), resource_type)
        params = {"sortBy": "meta.lastModified", "sortOrder": "ascending", "attributes": "id,meta"}
        if await self.pool.fetchval(query("events_subscribed")):
            # SETs say what changed: whole resources, to compare with what was recorded.
            del params["attributes"]
        if mark is None:
            # The first poll starts from now: what home already holds reaches a new peer by
            # reconciliation, not as a flood of changes.
            latest = await self.home.request(
                "GET",
                endpoint,
                params={**params, "sortOrder": "descending", "count": "1"},
            )
            resources = latest.body.get("Resources", []) if isinstance(latest.body, dict) else []
            last = _last_modified(resources[0]) if resources else None
            newest_ids = (
                [resources[0]["id"]] if last and isinstance(resources[0].get("id"), str) else []
            )
            await self.pool.execute(
                query("save_watermark"), resource_type, last or "1970-01-01T00:00:00Z", newest_ids
            )
            return 0
        since, seen = mark["last_modified"], set(mark["seen_at_mark"])
        resources = await self._list(
            endpoint, {**params, "filter": f"meta.lastModified ge {json.dumps(since)}"}
        )
        changed: dict[str, str] = {}
        found: dict[str, dict[str, Any]] = {}
        newest, at_newest = since, set(seen)
        for resource in resources:
            modified, resource_id = _last_modified(resource), resource.get("id")
            if not isinstance(resource_id, str) or modified is None:
                continue
            if modified == since and resource_id in seen:
                continue
            changed[resource_id] = resource_type
            found[resource_id] = resource
            if modified > newest:
                newest, at_newest = modified, {resource_id}
            elif modified == newest:
                at_newest.add(resource_id)
        if not changed:
            return 0
        async with self.pool.acquire() as conn, conn.transaction():
            await record(conn, HomeWrite(written=changed, documents=found))
            await conn.execute(query("save_watermark"), resource_type, newest, sorted(at_newest))
        log.info("home poll: %d %s changes since %s", len(changed), resource_type, since)
        return len(changed)

    async def _sweep(self, resource_type: str, endpoint: str) -> int:
        mark = await self.pool.fetchrow(query("watermark"), resource_type)
        now = datetime.now(UTC)
        if mark is None or (
            mark["swept_at"] is not None
            and (now - mark["swept_at"]).total_seconds() < self.sweep_interval
        ):
            return 0
        live = {
            r["id"]
            for r in await self._list(endpoint, {"attributes": "id"})
            if isinstance(r.get("id"), str)
        }
        known = [
            r["internal_id"]
            for r in await self.pool.fetch(query("live_entities"), resource_type, now)
        ]
        gone = [i for i in known if i not in live]
        limit = deletion_limit(len(known), self.deletion_threshold)
        held = len(gone) > limit
        async with self.pool.acquire() as conn, conn.transaction():
            if held:
                await conn.execute(
                    query("audit"), *_held(resource_type, len(gone), len(known), limit)
                )
            elif gone:
                await record(conn, HomeWrite.of_deletion(gone))
            await conn.execute(query("swept"), resource_type)
        if held:
            log.warning(
                "home sweep: %s", _held(resource_type, len(gone), len(known), limit)[3]["reason"]
            )
            return 0
        if gone:
            log.info("home sweep: %d %s deleted in home", len(gone), resource_type)
        return len(gone)


def _held(
    resource_type: str, gone: int, known: int, limit: int
) -> tuple[str, str, str, dict[str, Any]]:
    """The audit entry of a sweep that found more deletions than the threshold and held them."""
    reason = (
        f"{gone} of {known} {resource_type} entities are gone from home, more than the deletion "
        f"threshold ({limit}): their accounts in push peers are kept. If home meant it, run "
        f"`broker reconcile PEER --on-deleted deprovision --confirm-deletions N` for each push "
        f"peer (its --dry-run shows N), or raise [propagation] deletion_threshold"
    )
    details = {
        "resource_type": resource_type,
        "gone": gone,
        "known": known,
        "limit": limit,
        "reason": reason,
    }
    return "broker:sweep", "sweep.held", resource_type, details


def _last_modified(resource: dict[str, Any]) -> str | None:
    meta = resource.get("meta")
    value = meta.get("lastModified") if isinstance(meta, dict) else None
    return value if isinstance(value, str) else None
