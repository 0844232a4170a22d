"""The identity map's writes made on a caller's connection: the delivery worker's accounts in
peers (a create begun and finished, a primary or an alias retired) and the entities a change
records. They run on the caller's transaction, so a mapping change and the outbox rows it implies
commit together or not at all; ``MappingStore`` owns the other writes. Every statement that
writes ``id_mappings`` or ``entities`` is in ``sql/queries/mapping.sql``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeAlias

import asyncpg

from broker.db import query

if TYPE_CHECKING:
    from broker.db import Connection

    Executor: TypeAlias = asyncpg.Pool | Connection
    """A pool (one statement, its own transaction) or a connection (the caller's transaction)."""

__all__ = [
    "begin_create",
    "finish_create",
    "link_accounts",
    "record_entities",
    "register_entities",
    "retire_alias",
    "retire_primary",
]


async def begin_create(db: Executor, internal_id: str, domain: str, handle: str) -> str | None:
    """The pending row of a create of ``internal_id`` in peer ``domain`` with correlation handle
    ``handle``; the handle when the row is new (no earlier attempt can have reached the peer),
    None when one exists already (or the entity is merged or deleted)."""
    fresh: str | None = await db.fetchval(query("begin_create"), internal_id, domain, handle)
    return fresh


async def finish_create(conn: Connection, handle: str, domain: str, external_id: str) -> str | None:
    """The create of ``handle`` in peer ``domain`` succeeded as ``external_id``: the entity the
    row belongs to now (a merge may have moved it to its survivor), or None when the create is no
    longer wanted (a merge cancelled it). UniqueViolationError: the account is mapped already to
    another entity."""
    owner: str | None = await conn.fetchval(query("finish_create"), handle, domain, external_id)
    return owner


async def retire_primary(db: Executor, internal_id: str, domain: str, retention: float) -> None:
    """Peer ``domain`` no longer holds the entity: its primary is retired (kept ``retention``
    seconds so late references still resolve), or dropped if its create never finished."""
    await db.execute(query("retire_primary"), internal_id, domain, retention)


async def retire_alias(db: Executor, domain: str, alias: str, retention: float) -> None:
    """Peer ``domain`` deleted the alias ``alias``: retired for ``retention`` seconds, or removed
    at once when the retention is 0."""
    await db.execute(query("retire_alias"), domain, alias, retention)


async def record_entities(
    conn: Connection,
    changed: Sequence[str],
    resource_types: Sequence[str],
    deleted: Sequence[str] = (),
) -> bool:
    """Entities home now has (``changed``, aligned with ``resource_types``) or no longer has
    (``deleted``), recorded before their syncs are enqueued; whether any domain subscribes to
    SETs (if none, the change is not recorded for them)."""
    subscribed: bool = await conn.fetchval(
        query("record_writes"), list(changed), list(resource_types), list(deleted)
    )
    return subscribed


async def link_accounts(
    conn: Connection,
    domain: str,
    links: Sequence[tuple[str, str, str]],
    handles: Sequence[str],
) -> set[str]:
    """Existing accounts of peer ``domain`` that reconciliation found to be entities' (each
    (internal ID, resource type, the peer's ID), with a fresh correlation handle): each becomes
    the entity's peer-assigned primary there. The entities linked; one that got a primary
    meanwhile (a create under way) keeps it and is left out."""
    records = await conn.fetch(
        query("link_accounts"),
        domain,
        [internal_id for internal_id, _, _ in links],
        [external_id for _, _, external_id in links],
        [resource_type for _, resource_type, _ in links],
        list(handles),
    )
    return {r["internal_id"] for r in records}


async def register_entities(
    conn: Connection, internal_ids: Sequence[str], resource_types: Sequence[str]
) -> None:
    """Entities home has (``internal_ids``, aligned with ``resource_types``), recorded before
    their syncs are enqueued; ones recorded already are left as they are."""
    await conn.execute(query("register_entities"), list(internal_ids), list(resource_types))
