"""Settling the outbox's dead letters (a person's decision). Work is put in the outbox by the
write journal (``broker.propagation.journal``) and by the mapping store, always on the caller's
transaction."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import asyncpg

from broker.db import query
from broker.errors import BrokerError, NotFoundError

if TYPE_CHECKING:
    pass

__all__ = ["settle_dead_letter"]


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
