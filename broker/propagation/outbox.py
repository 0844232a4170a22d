"""Putting work in the outbox, always on the caller's transaction (so that the change that implies
it and the rows commit together or not at all)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import asyncpg

from broker.db import query
from broker.errors import BrokerError, NotFoundError
from broker.events.record import record_changes
from broker.mapping.accounts import record_entities

if TYPE_CHECKING:
    from broker.db import Connection

__all__ = ["enqueue_changes", "settle_dead_letter"]


async def enqueue_changes(
    conn: Connection,
    changed: Mapping[str, str],
    *,
    deleted: Sequence[str] = (),
    origin: str | None = None,
    sealed: Mapping[str, bytes] | None = None,
    verb: str | Mapping[str, str] | None = None,
    documents: Mapping[str, Mapping[str, Any]] | None = None,
    write_only: Mapping[str, Collection[str]] | None = None,
) -> None:
    """Record entities home changed (internal ID -> resource type) or deleted, and enqueue their
    syncs toward every push peer but ``origin`` (a change is not sent back where it came from),
    each carrying the write-only values the write set, ``sealed`` by entity; and the SETs the
    changes imply for the domains subscribed to events (``verb``, ``documents`` and the
    ``write_only`` attribute names describe the changes: see :func:`record_changes`)."""
    subscribed = await record_entities(conn, list(changed), list(changed.values()), deleted)
    if subscribed:
        await record_changes(
            conn,
            changed,
            deleted,
            origin=origin,
            verb=verb,
            documents=documents or {},
            write_only=write_only or {},
        )
    entities = list(dict.fromkeys([*changed, *deleted]))
    sealed = sealed or {}
    plain = [i for i in entities if i not in sealed]
    if plain:
        await conn.execute(query("enqueue_sync"), plain, origin)
    carrying = [i for i in entities if i in sealed]
    if carrying:
        await conn.execute(
            query("enqueue_sync_sealed"), carrying, origin, [sealed[i] for i in carrying]
        )


async def settle_dead_letter(
    pool: asyncpg.Pool, delivery_id: int, action: Literal["retry", "discard"], actor: str
) -> asyncpg.Record:
    """A dead letter queued again (attempts counted afresh) or given up, and audited; the
    delivery as it is now. NotFoundError, or a 409 when it is not a dead letter."""
    async with pool.acquire() as conn, conn.transaction():
        if action == "retry":
            changed = await conn.fetchval(query("retry_delivery"), delivery_id)
        else:
            changed = await conn.fetchval(query("discard_delivery"), delivery_id, actor)
        record = await conn.fetchrow(query("delivery_by_id"), delivery_id)
        if record is None:
            raise NotFoundError(
                f"there is no delivery {delivery_id}: `broker deliveries list` shows them"
            )
        if changed is None:
            raise BrokerError(
                f"delivery {delivery_id} is {record['state']}: only dead letters can be "
                "retried or discarded",
                status=409,
            )
        await conn.execute(
            query("audit"),
            actor,
            f"delivery_{action}",
            record["internal_id"],
            {"delivery": delivery_id, "domain": record["domain_id"]},
        )
    return record
