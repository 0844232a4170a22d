"""Provisioning on demand (RFC 7642 section 2.3.4, just in time): one entity into one push peer
now, for an identity provider that needs the account at sign-in, or for a split-off held back
until something needs it (seed 002).

It goes through the outbox like every other change: a ``provision`` delivery is enqueued (or
the one on its way is joined), the delivery worker delivers it with the same policy, scope,
translation and leak guard as any sync, and this waits until the peer's ID is recorded. Asking
again is harmless: an entity provisioned already answers with its account at once.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import asyncpg

from broker.db import query
from broker.domains import DomainStore
from broker.errors import (
    BrokerError,
    ConflictError,
    InvalidValueError,
    NotFoundError,
)
from broker.mapping.store import MappingStore

__all__ = ["Provisioned", "StillQueued", "provision"]


@dataclass(frozen=True)
class Provisioned:
    """The entity's account in the peer."""

    domain: str
    internal_id: str
    external_id: str
    """The peer's own ID of the account."""
    created: bool
    """False when the entity was provisioned there already."""


class StillQueued(BrokerError):
    """The delivery did not finish in time; it goes on, and asking again is harmless."""

    status = 503


async def provision(
    pool: asyncpg.Pool, *, domain: str, entity: str, wait: float = 30.0
) -> Provisioned:
    """Provision ``entity`` (an internal ID, or ``DOMAIN:EXTERNAL_ID`` of any domain) into push
    peer ``domain`` now, and answer with the peer's ID."""
    peer = await DomainStore(pool).get(domain)
    if peer.kind != "peer" or not peer.push:
        raise InvalidValueError(
            f"{domain} is not a push peer: the broker provisions only into peers with a SCIM URL "
            "(a pull domain gets a minted ID the first time it reads the entity)"
        )
    if peer.status == "disabled":
        raise ConflictError(f"{domain} is disabled: broker domain enable {domain} first")
    internal_id = await _internal_id(pool, entity)
    target = await pool.fetchrow(query("provision_target"), domain, internal_id)
    if target is None:
        raise NotFoundError(
            f"the broker has never seen entity {internal_id}: check the ID, or let a domain "
            "read it through the broker first"
        )
    if target["state"] != "active":
        hint = f"; use {target['merged_into']}" if target["merged_into"] else ""
        raise ConflictError(f"entity {internal_id} is {target['state']}{hint}")
    if target["external_id"] is not None:
        return Provisioned(domain, internal_id, target["external_id"], created=False)
    delivery = await pool.fetchval(query("enqueue_provision_now"), domain, internal_id)
    return await _outcome(pool, domain, internal_id, delivery, wait)


async def _internal_id(pool: asyncpg.Pool, entity: str) -> str:
    """The internal ID ``entity`` names (``DOMAIN:EXTERNAL_ID`` when DOMAIN is a domain)."""
    prefix, sep, external_id = entity.partition(":")
    if not sep or prefix not in {d.id for d in await DomainStore(pool).list()}:
        return entity
    rows = await MappingStore(pool).rows_by_external(prefix, external_id)
    if not rows:
        raise NotFoundError(f"{prefix} has no ID {external_id}: check it with broker mappings")
    return rows[0].internal_id


async def _outcome(
    pool: asyncpg.Pool, domain: str, internal_id: str, delivery: int, wait: float
) -> Provisioned:
    deadline = time.monotonic() + wait
    while True:
        record = await pool.fetchrow(query("provision_progress"), domain, internal_id, delivery)
        assert record is not None, "finished deliveries are purged only after done_retention"
        if record["external_id"] is not None:
            return Provisioned(domain, internal_id, record["external_id"], created=True)
        if record["state"] == "done":
            raise InvalidValueError(
                f"{internal_id} was not provisioned into {domain}: it is outside {domain}'s "
                f"scope, or gone from home (check with broker domain show {domain})"
            )
        if record["state"] in ("dead", "cancelled"):
            reason = (record["last_error"] or {}).get("reason", record["state"])
            raise ConflictError(
                f"provisioning {internal_id} into {domain} failed: {reason} "
                f"(delivery {delivery}: see broker deliveries list --domain {domain})"
            )
        if time.monotonic() >= deadline:
            raise StillQueued(
                f"provisioning into {domain} is queued as delivery {delivery} but not done "
                f"within {wait:g} s: is broker serve running and {domain} reachable? It goes "
                "on; ask again (it is idempotent)"
            )
        await asyncio.sleep(0.05)
