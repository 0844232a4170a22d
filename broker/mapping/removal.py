"""``broker domain remove``: a domain leaves the federation, and what becomes of its rows.

The decision (:func:`plan_removal`) is pure: refused while deliveries wait for the domain
(pending, in flight, or dead letters waiting for a person) unless forced; otherwise the list of
what happens, row kind by row kind. :func:`remove_domain` carries it out in one transaction with
its audit entry. Its mappings are deleted, or kept (``--keep-mappings``): the domain then stays as
a row in state ``removed`` with nothing but its mappings, so that adding it again under its name
gives it back the same external IDs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import asyncpg

from broker.db import query
from broker.errors import ConflictError, NotFoundError

__all__ = ["Removal", "plan_removal", "remove_domain"]


@dataclass(frozen=True)
class Removal:
    domain: str
    keep_mappings: bool
    effects: tuple[str, ...]
    """One line per kind of row: what happens to it."""
    counts: Mapping[str, int]


def plan_removal(
    domain: str, footprint: Mapping[str, int], *, keep_mappings: bool, force: bool
) -> Removal:
    """What removing ``domain`` does to its rows (``footprint``: counts by kind, as the
    ``domain_footprint`` query gives them); ConflictError while deliveries wait, unless ``force``."""
    pending = footprint.get("deliveries pending", 0)
    dead = footprint.get("dead letters", 0)
    if (pending or dead) and not force:
        raise ConflictError(
            f"domain {domain} has {pending} deliveries pending or in flight and {dead} dead "
            f"letters: let them finish (`broker deliveries list --domain {domain}`), or remove "
            "it anyway with --force (they are discarded, and the peer never gets them)"
        )
    mappings = footprint.get("mappings", 0)
    effects = (
        f"mappings: {mappings} kept; the domain stays as 'removed' with nothing else, and "
        f"`broker domain add {domain} ...` gives them back"
        if keep_mappings
        else f"mappings: {mappings} deleted (its external IDs name nothing any more)",
        f"tokens: {footprint.get('tokens', 0)} deleted (the domain can no longer call)",
        f"outbox: {pending} pending and {dead} dead discarded, "
        f"{footprint.get('deliveries finished', 0)} finished deleted",
        f"subscriptions: {footprint.get('subscriptions', 0)} deleted, with "
        f"{footprint.get('events unsettled', 0)} SETs not yet acknowledged",
        f"peer copies: {footprint.get('peer copies', 0)} deleted",
    )
    return Removal(domain, keep_mappings, effects, dict(footprint))


async def remove_domain(
    pool: asyncpg.Pool, domain: str, *, keep_mappings: bool, force: bool, actor: str
) -> Removal:
    """Remove ``domain`` as :func:`plan_removal` decides, audited, in one transaction (the
    domain's row locked first, so nothing is enqueued for it meanwhile)."""
    async with pool.acquire() as conn, conn.transaction():
        if await conn.fetchrow(query("domain_for_change"), domain) is None:
            raise NotFoundError(
                f"there is no domain {domain}: `broker domain list` shows the domains"
            )
        footprint = {r["what"]: r["n"] for r in await conn.fetch(query("domain_footprint"), domain)}
        removal = plan_removal(domain, footprint, keep_mappings=keep_mappings, force=force)
        for name in (
            "delete_domain_outbox",
            "delete_domain_copies",
            "delete_domain_events",
            "delete_domain_subscription",
            "delete_domain_tokens",
        ):
            await conn.execute(query(name), domain)
        if keep_mappings:
            await conn.execute(query("tombstone_domain"), domain)
        else:
            await conn.execute(query("drop_domain_mappings"), domain)
            await conn.execute(query("delete_domain"), domain)
        await conn.execute(
            query("audit"),
            actor,
            "domain_remove",
            domain,
            {"keep_mappings": keep_mappings, "force": force, "rows": footprint},
        )
    return removal
