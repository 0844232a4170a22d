"""A run's actions, taken in batches: each batch's mapping rows (links, through the mapping
store's writes) and outbox rows (syncs, creates, deprovisionings) commit in one transaction with
the items marked done, so a run resumed after a crash takes each action once."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import asyncpg

from broker.db import query

if TYPE_CHECKING:
    from broker.db import Connection
from broker.mapping import accounts
from broker.mapping.store import mint_ids
from broker.reconcile.situations import Options

__all__ = ["take_actions"]

BATCH = 500


async def take_actions(pool: asyncpg.Pool, run_id: uuid.UUID, domain: str, options: Options) -> int:
    """Take every action of the run not yet taken; how many were taken."""
    taken = 0
    while True:
        items = await pool.fetch(query("actionable_items"), run_id, BATCH)
        if not items:
            return taken
        async with pool.acquire() as conn, conn.transaction():
            await _batch(conn, domain, items, options)
            await conn.execute(query("items_done"), run_id, [i["seq"] for i in items])
        taken += len(items)


async def _batch(
    conn: Connection, domain: str, items: Sequence[asyncpg.Record], options: Options
) -> None:
    """One batch: links first, then the syncs (drifted, missing, deleted, and linked accounts
    that differ from home), then orphans deleted."""
    links = [i for i in items if i["action"] == "link"]
    linked: set[str] = set()
    if links:
        linked = await accounts.link_accounts(
            conn,
            domain,
            [(i["internal_id"], i["resource_type"], i["external_id"]) for i in links],
            mint_ids(len(links)),
        )
    drifted_after_link = [
        i["internal_id"]
        for i in links
        if i["internal_id"] in linked
        and i["detail"].get("attributes")
        and options.action("drifted") == "sync"
    ]
    syncs = [
        i
        for i in items
        if i["action"] in ("sync", "create") or (i["action"] == "deprovision" and i["internal_id"])
    ]
    entities = [i["internal_id"] for i in syncs]
    if syncs:
        await accounts.register_entities(conn, entities, [i["resource_type"] for i in syncs])
    targets = list(dict.fromkeys([*entities, *drifted_after_link]))
    if targets:
        # What the peer last received no longer describes its account: the sync sends the whole
        # resource (a PUT; a 404 there creates it again).
        await conn.execute(query("drop_copies"), domain, targets)
        await conn.execute(query("enqueue_sync_to"), domain, targets, datetime.now(UTC))
    orphans = [i for i in items if i["action"] == "deprovision" and not i["internal_id"]]
    if orphans:
        await conn.execute(
            query("enqueue_orphan_deletes"),
            domain,
            [i["external_id"] for i in orphans],
            [i["resource_type"] for i in orphans],
        )
