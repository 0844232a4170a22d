"""The write journal: one place that records a :class:`~broker.propagation.writes.HomeWrite`.

On the caller's transaction, so that a write and everything it implies commit together or not at
all: the externalId values the writing domain gave, the entities home wrote or deleted, the syncs
toward every push peer but the writer (carrying the write-only values, sealed), the changes the
SETs will report to the domains subscribed to events, and a row in each entity's history.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import asyncpg

from broker.db import query
from broker.events.record import record_changes
from broker.mapping.accounts import journal_write, record_entities
from broker.mapping.store import set_domain_external_ids
from broker.propagation.writes import HomeWrite
from broker.secrets import SecretBox

if TYPE_CHECKING:
    from broker.db import Connection

__all__ = ["Journal", "record", "record_alone"]

log = logging.getLogger(__name__)

DEADLOCK_ATTEMPTS = 3
"""How many times :meth:`Journal.record` records a write PostgreSQL rolled back in a deadlock."""


async def record(
    conn: Connection, write: HomeWrite, *, box: Callable[[], SecretBox] | None = None
) -> None:
    """Record ``write`` on ``conn``'s transaction (see the module doc). ``box`` seals the
    write-only values; a write that carries some without it is a programming error."""
    if write.external_ids:
        assert write.origin is not None, "an externalId belongs to the domain that gave it"
        await set_domain_external_ids(conn, write.origin, write.external_ids)
    carrying = {i: v for i, v in write.write_only.items() if v}
    if carrying and box is None:
        raise RuntimeError("write-only values to deliver, but the journal has no key")
    sealed = {i: box().seal(v) for i, v in carrying.items()} if box is not None else {}
    changed, deleted = write.written, list(write.deleted)
    subscribed = await record_entities(conn, list(changed), list(changed.values()), deleted)
    if subscribed:
        await record_changes(
            conn,
            changed,
            deleted,
            origin=write.origin,
            verb=write.verbs or None,
            documents=write.documents,
            write_only={i: list(v) for i, v in carrying.items()},
        )
    entities = list(dict.fromkeys([*changed, *deleted]))
    gone = set(deleted)
    await conn.execute(
        query("history_writes"),
        entities,
        ["delete" if i in gone else write.verbs.get(i, "changed") for i in entities],
        write.origin,
    )
    plain = [i for i in entities if i not in sealed]
    if plain:
        await conn.execute(query("enqueue_sync"), plain, write.origin)
    with_values = [i for i in entities if i in sealed]
    if with_values:
        await conn.execute(
            query("enqueue_sync_sealed"),
            with_values,
            write.origin,
            [sealed[i] for i in with_values],
        )


async def record_alone(
    conn: Connection, write: HomeWrite, *, box: Callable[[], SecretBox] | None = None
) -> bool:
    """Record ``write`` in one statement (its own transaction), as :func:`record` would, when
    it sets no externalId and no domain subscribes to SETs; False, with nothing written, when
    it cannot (the caller then uses :func:`record` in a transaction)."""
    if write.external_ids:
        return False
    carrying = {i: v for i, v in write.write_only.items() if v}
    if carrying and box is None:
        raise RuntimeError("write-only values to deliver, but the journal has no key")
    sealed = {i: box().seal(v) for i, v in carrying.items()} if box is not None else {}
    changed, deleted = write.written, list(write.deleted)
    entities = list(dict.fromkeys([*changed, *deleted]))
    gone = set(deleted)
    return await journal_write(
        conn,
        list(changed),
        list(changed.values()),
        deleted,
        entities,
        ["delete" if i in gone else write.verbs.get(i, "changed") for i in entities],
        [sealed.get(i) for i in entities],
        write.origin,
    )


class Journal:
    """:func:`record` in a transaction of its own, for writes that have none yet: one statement
    when nothing but the entities, their history and the syncs is to be written
    (:func:`record_alone`), a transaction otherwise."""

    def __init__(self, pool: asyncpg.Pool, box: Callable[[], SecretBox] | None) -> None:
        self.pool = pool
        self.box = box

    async def record(self, write: HomeWrite) -> None:
        """Record ``write``; a transaction PostgreSQL rolled back to break a deadlock (the syncs
        it enqueues wait on other transactions' enqueues of the same entities, in another
        order) is recorded again: home has taken the write, and dropping it would leave the
        peers without it."""
        if not write:
            return
        for attempt in range(1, DEADLOCK_ATTEMPTS + 1):
            try:
                await self._record(write)
                return
            except asyncpg.DeadlockDetectedError:
                if attempt == DEADLOCK_ATTEMPTS:
                    raise
                log.warning(
                    "recording a write home took ended in a deadlock (attempt %d of %d): "
                    "recording it again",
                    attempt,
                    DEADLOCK_ATTEMPTS,
                )

    async def _record(self, write: HomeWrite) -> None:
        async with self.pool.acquire() as conn:
            if await record_alone(conn, write, box=self.box):
                return
            async with conn.transaction():
                await record(conn, write, box=self.box)
