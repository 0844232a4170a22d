"""Settling the outbox's dead letters (a person's decision). Work is put in the outbox by the
write journal (``broker.propagation.journal``) and by the mapping store, always on the caller's
transaction."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

import asyncpg

from broker.db import query
from broker.domains import DomainStore
from broker.errors import BrokerError, InvalidValueError, NotFoundError
from broker.since import parse_since

__all__ = [
    "DeadLetters",
    "Settled",
    "check_expected",
    "count_dead_letters",
    "dead_letter_window",
    "settle_dead_letter",
    "settle_dead_letters",
]

Action = Literal["retry", "discard"]


@dataclass(frozen=True)
class DeadLetters:
    """The dead letters toward one peer that a bulk retry or discard acts on: those that died
    since ``since`` (None: whenever) and by ``as_of`` (when they were counted, so a letter that
    dies again meanwhile is not acted on twice)."""

    domain: str
    since: datetime | None
    as_of: datetime
    count: int


@dataclass(frozen=True)
class Settled:
    """What a bulk retry or discard did."""

    count: int = 0
    """Dead letters settled (retried, or discarded)."""
    superseded: list[int] = field(default_factory=list)
    """Syncs a retry cancelled instead: the entity had one pending already, which delivers
    home's state when it runs."""
    passwords_lost: list[int] = field(default_factory=list)
    """Of those, the ones that carried a password, now not delivered: to be set again."""


def dead_letter_window(*, everything: bool, since: str | None, now: datetime) -> datetime | None:
    """What a bulk action covers: every dead letter (``--all``), or those dead since ``since``;
    refused without one of them (a bulk action is never the default) or with both."""
    if everything and since is not None:
        raise InvalidValueError("give --all or --since, not both")
    if since is not None:
        return parse_since(since, now)
    if not everything:
        raise InvalidValueError(
            "a bulk action needs --all (every dead letter of the domain) or --since T "
            "(those that died since T, for example 2h or 2026-12-05T10:00:00Z)"
        )
    return None


def check_expected(letters: DeadLetters, expected: int | None, recount: str) -> None:
    """The ``expected`` guard of a bulk action: refused (409) when the dead letters counted now
    are not the number the operator confirmed; ``recount`` says how to count them again."""
    if expected is not None and expected != letters.count:
        raise BrokerError(
            f"{letters.count} dead letters match now, not the {expected} confirmed: "
            f"{recount} and confirm that",
            status=409,
        )


async def count_dead_letters(
    pool: asyncpg.Pool, domain: str, since: datetime | None
) -> DeadLetters:
    """The dead letters toward ``domain`` since ``since``, counted; NotFoundError for an
    unknown domain."""
    await DomainStore(pool).get(domain)
    record = await pool.fetchrow(query("count_dead_letters"), domain, since, None)
    assert record is not None
    return DeadLetters(domain, since, record["as_of"], record["dead"])


async def settle_dead_letters(
    pool: asyncpg.Pool,
    letters: DeadLetters,
    action: Action,
    actor: str,
    *,
    batch: int = 1000,
    progress: Callable[[int], None] = lambda done: None,
) -> Settled:
    """Retry or discard ``letters``, one statement per ``batch`` of them, each batch committed
    with its audit entry; calls ``progress`` with the running total."""
    settled = Settled()
    while True:
        async with pool.acquire() as conn, conn.transaction():
            if action == "retry":
                rows = await conn.fetch(
                    query("retry_dead_letters"), letters.domain, letters.since, letters.as_of, batch
                )
            else:
                rows = await conn.fetch(
                    query("discard_dead_letters"),
                    letters.domain,
                    letters.since,
                    letters.as_of,
                    batch,
                    actor,
                )
            ids = [r["id"] for r in rows]
            superseded = [r["id"] for r in rows if r.get("superseded")]
            lost = [r["id"] for r in rows if r.get("lost")]
            if ids:
                await conn.execute(
                    query("audit"),
                    actor,
                    f"deliveries_{action}",
                    None,
                    {
                        "domain": letters.domain,
                        "since": letters.since.isoformat() if letters.since else None,
                        "count": len(ids),
                        "deliveries": ids,
                        **({"superseded": superseded} if superseded else {}),
                    },
                )
        settled = Settled(
            settled.count + len(ids),
            settled.superseded + superseded,
            settled.passwords_lost + lost,
        )
        if ids:
            progress(settled.count)
        if len(ids) < batch:
            return settled


async def settle_dead_letter(
    pool: asyncpg.Pool, delivery_id: int, action: Action, actor: str
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
